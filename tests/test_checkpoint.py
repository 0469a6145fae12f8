"""Checkpoints: exact round trip (tied weights, optimiser, RNG), atomic writes, last-N pruning, config diffs."""

import json
import random

import numpy as np
import pytest
import torch

from dpolab.models.tiny import tiny_causal_lm
from dpolab.train import checkpoint as ckpt
from dpolab.train.resume import config_differences

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(tmp_path, model, optimizer, step, keep_last=2, metrics=None):
    return ckpt.save_checkpoint(
        tmp_path, step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
        config={"beta": 0.1, "lr": 1e-3}, metrics=metrics or {"loss": 0.5}, seed=3,
        rng_states=[ckpt.capture_rng_state()], keep_last=keep_last,
    )


def _trained_tiny():
    model, tok = tiny_causal_lm("gpt2", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tok("The movie was good", return_tensors="pt").input_ids
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_is_exact_and_keeps_tied_weights(tmp_path):
    model, optimizer = _trained_tiny()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them; stored once
    folder = _save(tmp_path, model, optimizer, step=1, metrics={"loss": np.float32(0.25), "step": 1})
    loaded = ckpt.load_checkpoint(folder)
    state = model.state_dict()
    assert loaded.model_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded.model_state[name], tensor), name
    fresh, _ = tiny_causal_lm("gpt2", seed=2)
    fresh.load_state_dict(loaded.model_state)
    assert torch.equal(fresh.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer_state)
    for a, b in zip(optimizer.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    meta = json.loads((folder / ckpt.STATE).read_text())
    assert meta["step"] == 1 and meta["seed"] == 3 and meta["config"]["beta"] == 0.1 and meta["metrics"]["loss"] == 0.25
    assert {"torch", "transformers", "dpolab", "python"} <= set(meta["versions"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ckpt.WEIGHTS, ckpt.STATE, ckpt.OPTIMIZER, ckpt.RNG, "COMPLETE"])


def test_rng_state_round_trip_replays_the_same_draws():
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    state = ckpt.capture_rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ckpt.restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_keeps_only_the_last_n(tmp_path):
    model, optimizer = _trained_tiny()
    for step in (2, 4, 6, 8):
        _save(tmp_path, model, optimizer, step=step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000008"
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir()) == [
        "step-000006", "step-000006.lock", "step-000008", "step-000008.lock"]


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch):
    model, optimizer = _trained_tiny()
    _save(tmp_path, model, optimizer, step=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is interrupted while writing optimizer.pt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, optimizer, step=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    assert not (tmp_path / ckpt.CHECKPOINTS / "step-000002").exists()
    assert not list((tmp_path / ckpt.CHECKPOINTS).glob("*.tmp-*"))
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))  # still loads


def test_incomplete_or_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "half")


def test_config_differences_name_fields_that_change_the_run():
    saved = {"beta": 0.1, "lr": 1e-3, "max_steps": 10, "progress": True}
    now = {"beta": 0.2, "lr": 1e-3, "max_steps": 20, "progress": False}
    assert config_differences(saved, now) == ["beta: checkpoint 0.1, now 0.2"]
