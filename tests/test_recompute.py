"""Precision and memory: the loading dtype, and gradient checkpointing with the same loss and gradients."""

import pytest
import torch
from test_trainer import weights
from tiny_runs import FAST, make_examples

from dpolab.data.batch import collate_pairs
from dpolab.data.prepare import prepare_pairs, tokenize_config
from dpolab.models import load_model, load_policy
from dpolab.models.lora import add_lora
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.config import TrainConfig
from dpolab.train.objective import Objective
from dpolab.train.recompute import checkpointed_layers, enable_gradient_checkpointing, recomputing
from dpolab.train.reference import make_reference
from dpolab.train.step import accumulate_gradients
from dpolab.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _step_grads(kind: str, stage: str, checkpointing: bool, lora: bool = False):
    """Loss sums and gradients of one trainer step (two micro-batches) on a fresh tiny model, through the trainer's
    own path: fused output layer, pair tree (DPO), sparse tied embedding (GPT-2)."""
    model, tokenizer = tiny_causal_lm(kind, num_layers=3, seed=1)
    model.eval()
    reference = make_reference("copy", model)
    if lora:
        model = add_lora(model, 4, 8.0).eval()
    config = TrainConfig.load(None, {"stage": stage, "micro_batch_size": 3, "grad_accum_steps": 2})
    pairs = prepare_pairs(make_examples(6), tokenizer, tokenize_config(config)).pairs
    pad = tokenizer.pad_token_id
    batches = [collate_pairs(pairs[i:i + 3], pad, index=list(range(i, i + 3))) for i in (0, 3)]
    if checkpointing:
        enable_gradient_checkpointing(model)
    calls = []  # runs of the first layer's MLP (module hooks do not fire in the recompute: count the forward)
    first_mlp = [m for n, m in model.named_modules() if n.endswith("0.mlp")][0]
    forward = first_mlp.forward
    first_mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    with recomputing(model):
        totals, bad = accumulate_gradients(model, None if stage == "sft" else reference, batches,
                                           objective=Objective.from_config(config), scale=1 / 6)
    assert bad is None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return totals, grads, len(calls)


@pytest.mark.parametrize("kind, stage, lora", [("gpt2", "dpo", False), ("llama", "dpo", False),
                                               ("gpt2", "sft", False), ("llama", "dpo", True)],
                         ids=["gpt2-dpo", "llama-dpo", "gpt2-sft", "llama-dpo-lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, stage, lora):
    plain_totals, plain, plain_calls = _step_grads(kind, stage, False, lora)
    ckpt_totals, ckpt, ckpt_calls = _step_grads(kind, stage, True, lora)
    assert ckpt_calls == 2 * plain_calls  # each layer ran again in the backward pass: checkpointing was on
    assert torch.allclose(ckpt_totals, plain_totals, rtol=1e-6, atol=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        assert torch.allclose(ckpt[name], plain[name], rtol=1e-5, atol=1e-7), name


def test_recomputing_marks_only_the_layers_and_restores_eval_mode():
    model, _ = tiny_causal_lm("gpt2", num_layers=2)
    model.eval()
    assert checkpointed_layers(model) == []
    enable_gradient_checkpointing(model)
    layers = checkpointed_layers(model)
    assert len(layers) == 2
    with recomputing(model):
        assert all(m.training for m in layers)
        assert not any(m.training for m in model.modules() if m not in layers)  # dropout, attention stay off
    assert not any(m.training for m in model.modules())


def test_a_run_with_gradient_checkpointing_matches_one_without(tmp_path):
    config = {**FAST, "max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 1}
    plain = train({**config, "output_dir": str(tmp_path / "plain")}, train_pairs=make_examples(8))
    recomputed = train({**config, "gradient_checkpointing": True, "output_dir": str(tmp_path / "ckpt")},
                       train_pairs=make_examples(8))
    assert [r["loss"] for r in recomputed.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-6)
    a, b = weights(plain.model), weights(recomputed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                         ("fp16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_loads_the_weights_in_that_dtype(tmp_path, name, dtype):
    model, _ = load_policy("tiny-llama", dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    tiny, tokenizer = tiny_causal_lm("gpt2")
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype=name)
    assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_a_bf16_loaded_run_trains_in_bf16_and_saves_bf16_weights(tmp_path):
    result = train({**FAST, "dtype": "bf16", "max_steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1,
                    "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    reloaded, _ = load_model(str(result.checkpoint), dtype="bf16")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values()))
