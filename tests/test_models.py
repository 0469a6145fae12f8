"""Model loading options (issue 23 item 1): the hub revision and trust_remote_code reach transformers for the model
and the tokenizer, from load_model and from a training config; a revision is refused where there is no hub
repository (a local folder, the embedded default, a tiny model). No network: hub loads are stood in for by a
tiny model, and only the arguments are checked."""

import sys
from pathlib import Path

import pytest
import transformers

import dpolab.models.loading as models
from dpolab.models import DEFAULT_MODEL, load_model, load_policy
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.config import TrainConfig
from dpolab.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import FAST, make_examples  # noqa: E402


@pytest.fixture
def hub(monkeypatch):
    """A reachable hub whose every repo is the tiny GPT-2; records the keyword arguments of each from_pretrained."""
    calls = []
    model, tokenizer = tiny_causal_lm("gpt2", seed=0)

    def fake(kind, result):
        def from_pretrained(name, **kwargs):
            calls.append((kind, name, kwargs))
            return result
        return from_pretrained

    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model", model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", tokenizer))
    return calls


def test_revision_and_trust_remote_code_reach_the_model_and_the_tokenizer(hub):
    load_model("someone/some-model", revision="v1.2", trust_remote_code=True)
    assert [(kind, name) for kind, name, _ in hub] == [("tokenizer", "someone/some-model"),
                                                       ("model", "someone/some-model")]
    for _, _, kwargs in hub:
        assert kwargs["revision"] == "v1.2" and kwargs["trust_remote_code"] is True


def test_the_defaults_are_transformers_defaults(hub):
    load_model("someone/some-model")
    assert all(kwargs["revision"] is None and kwargs["trust_remote_code"] is False for _, _, kwargs in hub)


def test_a_training_config_passes_model_revision_and_trust_remote_code(hub, tmp_path):
    train({**FAST, "model": "someone/some-model", "model_revision": "a1b2c3d", "trust_remote_code": True,
           "max_steps": 1, "micro_batch_size": 4, "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    assert {kind for kind, _, _ in hub} == {"model", "tokenizer"}
    assert all(kwargs["revision"] == "a1b2c3d" and kwargs["trust_remote_code"] for _, _, kwargs in hub)


def test_a_local_folder_takes_trust_remote_code_but_no_revision(tmp_path, monkeypatch):
    model, tokenizer = tiny_causal_lm("gpt2", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="which is a local folder: a revision is a branch, tag or commit of a Hugging "
                                         "Face hub repository, and a folder holds one version"):
        load_model(str(tmp_path), revision="main")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kwargs: seen.append(kwargs) or real(name, **kwargs))
    load_model(str(tmp_path), trust_remote_code=True)
    assert seen[0]["trust_remote_code"] is True and seen[0]["revision"] is None


def test_no_revision_for_the_embedded_default_or_a_tiny_model(monkeypatch):
    monkeypatch.setattr(models, "default_model_dir", lambda: pytest.fail("converted the default model"))
    with pytest.raises(ValueError, match="which is the embedded default model"):
        load_model(DEFAULT_MODEL, revision="main")
    with pytest.raises(ValueError, match="'tiny-gpt2', a tiny model built in memory"):
        load_policy("tiny-gpt2", revision="main")


def test_model_revision_is_text_as_given():
    assert TrainConfig.load(None, ["model_revision=2024"]).model_revision == "2024"
    assert TrainConfig.load(None, ["model_revision=null"]).model_revision is None
    assert TrainConfig().trust_remote_code is False
