"""Foundation: the cache's atomic build, the tiny models, the embedded data parser, loader errors."""

import os

import pytest
import torch

from dpolab.data.cache import REPO_ROOT, atomic_write_text, build_artifact, from_repo_root, is_complete
from dpolab.models.tiny import tiny_causal_lm, tiny_tokenizer
from dpolab.sample.sentiment import parse_snippets


def test_build_artifact_interrupted_leaves_nothing_usable(tmp_path):
    target = tmp_path / "artifact"

    def crash(out):
        (out / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # a conversion killed half-way

    with pytest.raises(KeyboardInterrupt):
        build_artifact(target, crash)
    assert not target.exists() and not list(tmp_path.glob("artifact.tmp-*"))

    calls = []

    def good(out):
        calls.append(1)
        (out / "weights.bin").write_bytes(b"full")

    assert build_artifact(target, good) == target
    assert is_complete(target) and (target / "weights.bin").read_bytes() == b"full"
    build_artifact(target, good)  # reused, not rebuilt
    assert len(calls) == 1


def test_build_artifact_rebuilds_folder_without_marker(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"stale")  # e.g. copied by hand, never marked complete
    build_artifact(target, lambda out: (out / "weights.bin").write_bytes(b"new"))
    assert (target / "weights.bin").read_bytes() == b"new"


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_models_are_deterministic_and_small(kind):
    m1, tok = tiny_causal_lm(kind, seed=3)
    m2, _ = tiny_causal_lm(kind, seed=3)
    ids = tok("The movie was good", return_tensors="pt").input_ids
    assert m1.config.vocab_size == len(tok) == 512
    torch.testing.assert_close(m1(ids).logits, m2(ids).logits, rtol=0, atol=0)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_tiny_tokenizer_conventions():
    gpt2, llama = tiny_tokenizer("gpt2"), tiny_tokenizer("llama")
    assert gpt2("hi").input_ids[0] != gpt2.bos_token_id  # GPT-2 adds no BOS
    assert llama("hi").input_ids[0] == llama.bos_token_id  # Llama adds exactly one
    assert llama("hi").input_ids.count(llama.bos_token_id) == 1
    assert "<|im_start|>assistant" in llama.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_parse_snippets_names_row_and_field():
    good = b"1\t2.5\tA fine film.\r\n2\t-1\tA dull one.\r\n"
    assert [r["human_rating"] for r in parse_snippets(good)] == [2.5, -1.0]
    with pytest.raises(ValueError, match="row 2, field 'rating'"):
        parse_snippets(b"1\t2.5\tok\n2\tbad\tnot ok\n", source="f.txt")
    with pytest.raises(ValueError, match="row 1: expected 3"):
        parse_snippets(b"1 2.5 no tabs\n")


def test_load_model_wrong_folder_says_what_was_expected(tmp_path):
    from dpolab.models import load_model

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_model_unknown_id_is_one_clear_message(monkeypatch):
    from dpolab.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_embedded_default_model_and_data_load():
    from dpolab.models import load_model
    from dpolab.sample.sentiment import N_SNIPPETS, review_snippets, vader_reward

    model, tok = load_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template is not None
    ds = review_snippets()
    assert len(ds) == N_SNIPPETS and set(ds.column_names) == {"id", "text", "human_rating"}
    assert vader_reward(["a wonderful, moving film"])[0] > 0.5


def test_from_repo_root(tmp_path):
    """A relative path resolves under the repository root whatever the working folder; an absolute one stays."""
    assert (REPO_ROOT / "dpolab" / "data" / "cache.py").is_file()
    assert from_repo_root("results/x.json") == REPO_ROOT / "results" / "x.json"
    assert from_repo_root(tmp_path) == tmp_path and from_repo_root(str(tmp_path)) == tmp_path
