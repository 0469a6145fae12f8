"""The fast sampling engine (dpolab.sample.decode) against the slow reference built on ``model.generate``.

Both engines draw row (p, i)'s t-th token from the t-th uniform of the stream seeded by (seed, p, i), by the same
inverse-CDF rule, from logits of the same model; so on the same request they must return the same token ids, and
log-probs that agree up to float32 rounding of the summed per-token values (about 1e-5 for sums near −70).
"""

import sys
from pathlib import Path

import pytest
import torch

from dpolab.models.tiny import tiny_causal_lm
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.decode import inverse_cdf
from dpolab.sample.generate import sample

PROMPTS = ["The movie was", "A dull, plodding film that never", "Hello!", "My name is Ada and my favourite colour"]
SETTINGS = [{}, {"temperature": 0.7, "top_k": 40}, {"top_p": 0.9}, {"temperature": 1.3, "top_k": 60, "top_p": 0.8}]


def eos_biased(kind, bias=3.0):
    """A tiny model whose EOS logit is raised by ``bias``: with ~500 near-flat logits, e^3 / (e^3 + 500) ≈ 4% per
    step at temperature 1 (far more with temperature < 1 or top-k), so some of 12 rows × 12 tokens stop early."""
    model, tok = tiny_causal_lm(kind, seed=1)
    shift = torch.zeros(len(tok))
    shift[tok.eos_token_id] = bias
    # a bias of the output layer, not a forward hook: teacher-forced scoring then sees it too (dpolab.logprobs
    # computes the head itself only for a bias-free output layer)
    model.lm_head.bias = torch.nn.Parameter(shift, requires_grad=False)
    return model.eval(), tok


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def biased(request):
    return eos_biased(request.param)


def assert_same_samples(a, b):
    assert a.token_ids == b.token_ids
    assert torch.equal(a.finished, b.finished)
    assert a.texts == b.texts
    torch.testing.assert_close(a.model_logps, b.model_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(a.sampling_logps, b.sampling_logps, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "temp-topk", "topp", "all"])
def test_fast_engine_equals_generate_engine(biased, settings):
    model, tok = biased
    kw = dict(max_new_tokens=12, seed=4, progress=False, **settings)
    slow = sample(model, tok, PROMPTS, 3, engine="generate", batch_size=5, **kw)
    fast = sample(model, tok, PROMPTS, 3, engine="fast", batch_size=7, **kw)
    assert_same_samples(slow, fast)
    # EOS really happened: some rows stopped early, with EOS kept as their last token
    ended = [(ids[-1] == tok.eos_token_id, len(ids)) for row in fast.token_ids for ids in row]
    assert any(eos and n < 12 for eos, n in ended)
    if not settings:  # at temperature 1 some rows also run to max_new_tokens
        assert not fast.finished.all()
    for row, done in zip(fast.token_ids, fast.finished.tolist()):
        for ids, d in zip(row, done):
            assert (tok.eos_token_id in ids) == d and (not d or ids.index(tok.eos_token_id) == len(ids) - 1)


def test_fast_engine_is_independent_of_batch_size(biased):
    model, tok = biased
    kw = dict(max_new_tokens=10, seed=9, progress=False, temperature=0.8, top_k=50, engine="fast")
    reference = sample(model, tok, PROMPTS, 3, batch_size=1, **kw)
    for batch_size in (2, 5, 64):
        assert_same_samples(reference, sample(model, tok, PROMPTS, 3, batch_size=batch_size, **kw))
    # a prompt's completions do not depend on the other prompts either (prompt index kept)
    alone = sample(model, tok, PROMPTS[:1], 3, batch_size=64, **kw)
    assert alone.token_ids[0] == reference.token_ids[0]


def test_fast_model_logps_equal_teacher_forced_scoring(biased):
    model, tok = biased
    s = sample(model, tok, PROMPTS, 4, max_new_tokens=12, seed=2, progress=False, top_k=30, temperature=0.9)
    assert s.finished.any()
    scored = completion_logprobs(model, s, tok.pad_token_id)
    torch.testing.assert_close(s.model_logps, scored, atol=1e-4, rtol=0)


def test_fast_engine_with_chat_prompts():
    model, tok = eos_biased("llama")
    chats = [[{"role": "user", "content": "Hello! How are you?"}], [{"role": "user", "content": "Name?"}]]
    kw = dict(max_new_tokens=8, seed=1, chat=True, progress=False)
    assert_same_samples(sample(model, tok, chats, 2, engine="generate", **kw), sample(model, tok, chats, 2, **kw))


def test_inverse_cdf_is_the_float64_cumulative_rule():
    """Against the one-level rule ``searchsorted(cumsum(w.double()), u·total, right=True)`` on rows with zeros
    (truncated tokens), a vocabulary that is not a multiple of the block, and uniforms at the ends of [0, 1)."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(64, 1000, generator=gen) ** 8
    weights[weights < 0.05] = 0.0
    weights[0, :] = 0.0
    weights[0, 999] = 1.0  # one token left: always drawn
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    u[1], u[2] = 0.0, 1.0 - 2**-53
    cdf = weights.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    drawn = inverse_cdf(weights, u)
    assert torch.equal(drawn, expected)
    assert (weights.gather(-1, drawn[:, None]) > 0).all()


def test_unknown_engine_is_refused():
    model, tok = tiny_causal_lm("gpt2")
    with pytest.raises(ValueError, match="engine"):
        sample(model, tok, ["Hi"], 1, max_new_tokens=2, engine="beam", progress=False)


def test_benchmark_quick_mode_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sampling

    measured = sampling.run(quick=True, prompts=4, n=2, max_new_tokens=4, repeats=1)
    rates = measured["rates"]
    assert set(rates) == set(sampling.ARMS) and all(r[0] > 0 for r in rates.values())
    assert set(sampling.BASELINES) <= set(rates)  # generate as a user writes it (top_k=0) and the top_k=vocab call
    assert measured["floor"] > 0 and measured["gflop_per_token"] > 0
    table = sampling.table(measured, "python benchmarks/sampling.py --quick")
    assert "ratio to the faster model.generate" in table and "share of FLOP floor" in table
