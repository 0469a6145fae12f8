"""The speed paths on a CUDA device, each against the readable path on the same device (skipped without CUDA).

dpolab.fast.paths.CUDA_STATUS lists what runs on CUDA; every "runs on CUDA" entry has its test here. None of these
has run on a GPU yet (README, "GPU runs"): ``pytest tests/test_cuda_paths.py`` on a CUDA machine is the first check.
"""

import pytest
import torch

from dpolab.data.batch import collate_pairs, to_device
from dpolab.fast.paths import FastPaths, model_paths
from dpolab.logprobs import concatenated_forward
from dpolab.models.tiny import tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _pairs(model):
    from test_pairtree import _random_pairs

    return collate_pairs(_random_pairs(torch.Generator().manual_seed(7), 6, model.config.vocab_size), 0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pair_tree_and_output_layer_on_cuda(kind, attention, fused):
    """Pair tree + scored logits (+ the fused output layer): values and gradients of the readable path on CUDA, and
    the CPU's values."""
    model, _ = tiny_causal_lm(kind, seed=0)
    model.config._attn_implementation = attention
    batch = _pairs(model)
    on_cpu = concatenated_forward(model, batch, fast=FastPaths.off())
    model = model.to(CUDA)
    batch = to_device(batch, CUDA)
    paths = model_paths(model, FastPaths(fused_output_layer=fused))
    assert paths.pair_tree and (paths.output_weight is not None) == fused and paths.sparse_embedding is None
    fast = concatenated_forward(model, batch, fast=FastPaths(fused_output_layer=fused))
    slow = concatenated_forward(model, batch, fast=FastPaths.off())
    params = list(model.parameters())
    g_fast = torch.autograd.grad((fast.chosen - 0.5 * fast.rejected).sum(), params)
    g_slow = torch.autograd.grad((slow.chosen - 0.5 * slow.rejected).sum(), params)
    for a, b in ((fast.chosen, slow.chosen), (fast.rejected, slow.rejected), (slow.chosen.cpu(), on_cpu.chosen)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_fast_sampler_on_cuda():
    """The fast engine equals the model.generate engine on CUDA; log-probs come back on the CPU."""
    from dpolab.sample.completions import completion_logprobs
    from dpolab.sample.generate import sample

    model, tok = tiny_causal_lm("gpt2", seed=1)
    model = model.to(CUDA).eval()
    prompts = ["The movie was", "A dull, plodding film that never", "Hello!"]
    kw = dict(max_new_tokens=10, seed=4, progress=False)
    fast = sample(model, tok, prompts, 3, engine="fast", **kw)
    slow = sample(model, tok, prompts, 3, engine="generate", **kw)
    assert fast.token_ids == slow.token_ids
    torch.testing.assert_close(fast.model_logps, slow.model_logps, atol=1e-4, rtol=0)
    scored = completion_logprobs(model, fast, tok.pad_token_id)
    assert scored.device.type == "cpu"
    torch.testing.assert_close(scored, fast.model_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda(tmp_path, precision):
    """A few DPO steps with device=cuda: the policy lives on the GPU, the loss is finite and falls."""
    from dpolab.data.tokenize import TokenizedPair
    from dpolab.train.trainer import train

    model, tok = tiny_causal_lm("gpt2", seed=0)
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10], [1, 1], [1]), TokenizedPair([11, 12], [13], [14, 15], [1], [1, 1])]
    result = train({"device": "cuda", "precision": precision, "max_steps": 6, "micro_batch_size": 2, "lr": 1e-3,
                    "kl_samples": 0, "progress": False, "output_dir": str(tmp_path)}, model=model, tokenizer=tok,
                   train_pairs=pairs * 4)
    assert next(result.model.parameters()).device.type == "cuda"
    losses = [r["loss"] for r in result.history]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
