"""Fixtures shared by the test files: one CPU thread, and the tokenizers the tokenization tests run on.

Shared plain helpers (synthetic pairs, the fast run config) are in tests/tiny_runs.py.
"""

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from dpolab.models import default_model_dir
from dpolab.models.tiny import tiny_tokenizer


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread: on a shared two-core machine more threads mostly wait for each other.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol():
    """The embedded SmolLM2 tokenizer: ``<|im_start|>`` is its BOS, ``<|im_end|>`` its EOS and pad."""
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module", params=["gpt2", "llama", "smol"])
def tok(request, smol):
    """Each of the three tokenizers in turn: tiny GPT-2 (no BOS), tiny Llama (``<s>``, ChatML) and SmolLM2."""
    return smol if request.param == "smol" else tiny_tokenizer(request.param)


@pytest.fixture(scope="module", params=["llama", "smol"])
def chat_tok(request, smol):
    """The two tokenizers with a chat template: tiny Llama and SmolLM2."""
    return smol if request.param == "smol" else tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with no network at all (the slow page tests: notebooks and the course book)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):  # no network at all
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    session.set_script_timeout(120)
    yield session
    session.quit()
