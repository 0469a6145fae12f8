"""Device choice without a GPU: the config fields ``device`` / ``use_cpu``, and that CPU-only settings stay off on
any other device (checked with mocks and a model on the ``meta`` device; tests/test_cuda_paths.py runs on a GPU)."""

from types import SimpleNamespace

import pytest
import torch

from dpolab.data.device import check_device, resolve_device
from dpolab.fast.paths import CUDA_STATUS, FastPaths, model_paths
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.config import TrainConfig
from dpolab.train.overrides import ConfigError


@pytest.mark.parametrize(("device", "use_cpu", "cuda", "expected"), [
    ("auto", False, False, "cpu"), ("auto", False, True, "cuda"), ("auto", True, True, "cpu"),
    ("cpu", False, True, "cpu"), ("cuda", False, True, "cuda"), ("cuda:1", False, True, "cuda:1")])
def test_resolve_device(monkeypatch, device, use_cpu, cuda, expected):
    """auto follows torch.cuda.is_available, as a transformers Trainer does; use_cpu (HF's name) wins over it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(device, use_cpu) == torch.device(expected)


def test_cuda_asked_for_but_absent_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cuda' but CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize(("fields", "message"), [({"device": "gpu"}, "'auto', 'cpu' or 'cuda"),
                                                 ({"device": "cuda:x"}, "'auto', 'cpu' or 'cuda"),
                                                 ({"device": "cuda", "use_cpu": True}, "disagree")])
def test_config_refuses_bad_device(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, fields)
    with pytest.raises(ValueError, match=message):
        check_device(fields["device"], fields.get("use_cpu", False))


@pytest.mark.parametrize(("fields", "device", "allocator"), [
    ({}, "cpu", True), ({}, "cuda", False), ({"use_cpu": True}, "cpu", True),
    ({"keep_freed_memory": False}, "cpu", False)])
def test_allocator_tuning_only_on_cpu(monkeypatch, tmp_path, fields, device, allocator):
    """The trainer asks for glibc's allocator setting only when its device is the CPU (mocked device context)."""
    from dpolab.train import trainer

    asked = {}

    def setup(name):
        asked["setup"] = name
        return SimpleNamespace(device=torch.device(device))

    class Recorder:
        def __init__(self, enabled):
            asked["allocator"] = enabled

        def __enter__(self):
            return False

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(trainer.dist, "setup", setup)
    monkeypatch.setattr(trainer.dist, "teardown", lambda ctx, synchronize: None)
    monkeypatch.setattr(trainer, "keep_freed_memory", Recorder)
    monkeypatch.setattr(trainer, "_run", lambda *args: "ran")
    assert trainer.train({"output_dir": str(tmp_path), **fields}) == "ran"
    assert asked["allocator"] is allocator
    assert asked["setup"] == ("cpu" if fields.get("use_cpu") else "auto")


def test_sparse_embedding_is_cpu_only():
    """A tied GPT-2 off the CPU (here on the meta device, no memory) gets no sparse lookup; the other paths stay."""
    model, _ = tiny_causal_lm("gpt2", seed=0)
    on_cpu = model_paths(model, FastPaths())
    assert on_cpu.sparse_embedding is not None and on_cpu.output_weight is not None and on_cpu.pair_tree
    # (the fused layer's autocast check knows no meta device: it is decided apart, and runs on CUDA)
    elsewhere = model_paths(model.to("meta"), FastPaths(fused_output_layer=False))
    assert elsewhere.sparse_embedding is None
    assert elsewhere.pair_tree and elsewhere.scored_logits


def test_every_speed_path_has_a_cuda_status():
    """Each FastPaths field (but the caller-owned grad_into_weight), the sampler and the allocator say what they do
    on CUDA."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(FastPaths)} - {"grad_into_weight"}
    assert names | {"fast_sampler", "keep_freed_memory"} == set(CUDA_STATUS)
    assert all(("runs on CUDA" in why) != why.startswith("off on CUDA") for why in CUDA_STATUS.values())


def test_reward_model_follows_the_policy_device():
    """reward_model_from_causal_lm builds the head on the causal LM's device and dtype (meta: no memory)."""
    from dpolab.train.reward import reward_model_from_causal_lm

    model, tok = tiny_causal_lm("gpt2", seed=0)
    model = model.to(torch.float64)
    reward_model = reward_model_from_causal_lm(model, tok)
    first = next(reward_model.parameters())
    assert first.dtype == torch.float64 and first.device.type == "cpu"
