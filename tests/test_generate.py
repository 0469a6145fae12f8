"""Sampling: log-probs against a teacher-forced forward pass, determinism, the sampled distribution, bad input."""

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dpolab.models.tiny import tiny_causal_lm
from dpolab.sample.generate import check_sampling_request, sample
from dpolab.sample.warp import warp_logits

PROMPTS = ["The movie was", "A dull, plodding film that never", "Hello!"]  # three lengths: left padding in a batch


def eos_biased(kind, bias=1.0):
    """A tiny model whose EOS logit is raised by ``bias``, so that some completions stop before max_new_tokens.

    The random model's logits are nearly flat; at temperature 0.7 within the top 40 tokens, EOS gets about
    e^(1/0.7) / (e^(1/0.7) + 39) ≈ 10% per step, so roughly 1 − 0.9^10 ≈ 65% of 10-token completions stop early.
    """
    model, tok = tiny_causal_lm(kind, seed=1)
    shift = torch.zeros(len(tok))
    shift[tok.eos_token_id] = bias
    model.lm_head.register_forward_hook(lambda module, args, out: out + shift)
    return model, tok


def teacher_forced_logps(model, prompt_ids, completion_ids, temperature=1.0, top_k=None, top_p=1.0):
    """Reference: score one unpadded prompt+completion in a single forward pass (no cache, no batch)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1]
    logits = warp_logits(logits, temperature, top_k, top_p)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None]).sum().item()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logps_equal_a_teacher_forced_forward_pass(kind):
    model, tok = eos_biased(kind)
    settings = dict(temperature=0.7, top_k=40, top_p=0.9)
    s = sample(model, tok, PROMPTS, 4, max_new_tokens=10, seed=3, batch_size=5, progress=False, **settings)
    assert s.model_logps.shape == s.sampling_logps.shape == s.finished.shape == (3, 4)
    assert 0 < s.finished.sum() < 12  # both stopped-at-EOS and cut-at-length completions are covered
    for p in range(3):
        assert s.prompt_ids[p] == tok(PROMPTS[p]).input_ids
        for i in range(4):
            ids = s.token_ids[p][i]
            if s.finished[p, i]:
                assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
                assert s.texts[p][i] == tok.decode(ids[:-1], skip_special_tokens=True)
            else:
                assert len(ids) == 10 and tok.eos_token_id not in ids
            raw = teacher_forced_logps(model, s.prompt_ids[p], ids)
            warped = teacher_forced_logps(model, s.prompt_ids[p], ids, **settings)
            assert s.model_logps[p, i].item() == pytest.approx(raw, abs=1e-4)
            assert s.sampling_logps[p, i].item() == pytest.approx(warped, abs=1e-4)
    # temperature 0.7 sharpens and truncation renormalises: each drawn token is likelier under q than under π
    assert (s.sampling_logps > s.model_logps).all()


def test_untruncated_temperature_one_sampling_logps_are_the_model_logps():
    model, tok = tiny_causal_lm("llama")
    s = sample(model, tok, PROMPTS, 2, max_new_tokens=5, progress=False)
    torch.testing.assert_close(s.sampling_logps, s.model_logps, rtol=0, atol=0)
    full_k = sample(model, tok, PROMPTS, 2, max_new_tokens=5, top_k=len(tok), progress=False)
    assert full_k.token_ids == s.token_ids  # top_k = vocabulary size truncates nothing
    torch.testing.assert_close(full_k.sampling_logps, s.model_logps, rtol=0, atol=0)


def test_same_seed_same_samples_whatever_the_batch_size():
    model, tok = eos_biased("gpt2")
    a = sample(model, tok, PROMPTS, 3, max_new_tokens=8, seed=7, batch_size=4, progress=False)
    b = sample(model, tok, PROMPTS, 3, max_new_tokens=8, seed=7, batch_size=4, progress=False)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    torch.testing.assert_close(a.model_logps, b.model_logps, rtol=0, atol=0)
    one_by_one = sample(model, tok, PROMPTS, 3, max_new_tokens=8, seed=7, batch_size=1, progress=False)
    assert one_by_one.token_ids == a.token_ids  # each row has its own random stream; padding does not matter
    torch.testing.assert_close(one_by_one.model_logps, a.model_logps, rtol=0, atol=1e-4)
    other = sample(model, tok, PROMPTS, 3, max_new_tokens=8, seed=8, batch_size=4, progress=False)
    assert other.token_ids != a.token_ids


def test_first_tokens_follow_the_warped_distribution():
    """3000 one-token samples at temperature 0.8, top-k 5: frequencies match softmax(warp(logits)).

    Each frequency is binomial with standard error sqrt(q(1-q)/3000) <= 0.0092; allow 4.5 of them.
    """
    model, tok = tiny_causal_lm("gpt2", seed=2)
    n = 3000
    s = sample(model, tok, ["The movie"], n, max_new_tokens=1, temperature=0.8, top_k=5, seed=0, batch_size=1000,
               progress=False)
    with torch.no_grad():
        logits = model(torch.tensor([s.prompt_ids[0]])).logits[0, -1]
    q = torch.softmax(warp_logits(logits, 0.8, 5), -1)
    counts = torch.bincount(torch.tensor([ids[0] for ids in s.token_ids[0]]), minlength=len(tok)).double()
    assert set(counts.nonzero().flatten().tolist()) <= set(q.nonzero().flatten().tolist())
    freq = counts / n
    se = (q * (1 - q) / n).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all()
    first = torch.tensor([ids[0] for ids in s.token_ids[0]])
    torch.testing.assert_close(s.sampling_logps[0], q.log()[first].float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (1.0, 7, 1.0),
                                                      (1.0, None, 0.6), (1.3, 12, 0.8), (0.5, 1, 0.3)])
def test_warp_logits_matches_the_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 2
    expected = logits.clone()
    for warper in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1 else []):
        expected = warper(None, expected)
    actual = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual[~actual.isinf()], expected[~expected.isinf()])


def test_chat_prompts_get_the_template_and_generation_prompt():
    model, tok = eos_biased("llama")
    chats = [[{"role": "user", "content": "Hello! How are you?"}],
             [{"role": "system", "content": "Be polite."}, {"role": "user", "content": "What is your name?"}]]
    s = sample(model, tok, chats, 2, max_new_tokens=6, chat=True, progress=False)
    for p, chat in enumerate(chats):
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n")
        assert s.prompt_ids[p] == tok(rendered, add_special_tokens=False).input_ids
        for i in range(2):
            assert s.model_logps[p, i].item() == pytest.approx(
                teacher_forced_logps(model, s.prompt_ids[p], s.token_ids[p][i]), abs=1e-4)


@pytest.mark.parametrize("args,kwargs,message", [
    (([], 2), {"max_new_tokens": 4}, "prompt set is empty"),
    ((["a"], 0), {"max_new_tokens": 4}, r"n \(completions per prompt\) must be an integer >= 1, got 0"),
    ((["a"], 2), {"max_new_tokens": 0}, r"max_new_tokens \(generation length\) must be an integer >= 1, got 0"),
    (("a prompt", 2), {"max_new_tokens": 4}, "single string"),
    ((["fine", "  "], 2), {"max_new_tokens": 4}, "prompt 1: empty text"),
    ((["a", [{"role": "user", "content": "hi"}]], 2), {"max_new_tokens": 4}, "prompt 1: .*pass chat=True"),
    (([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]], 2),
     {"max_new_tokens": 4, "chat": True}, "prompt 0, turn 1: the conversation ends with an assistant turn"),
    (([[{"content": "hi"}]], 2), {"max_new_tokens": 4, "chat": True}, "prompt 0, turn 0: expected a dict with 'role'"),
    ((["a"], 2), {"max_new_tokens": 4, "temperature": 0}, "temperature must be > 0"),
    ((["a"], 2), {"max_new_tokens": 4, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ((["a"], 2), {"max_new_tokens": 4, "top_k": 0}, "top_k must be None"),
])
def test_bad_requests_fail_before_any_model_work(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_request(*args, **kwargs)
    with pytest.raises(ValueError, match=message):  # model=None: the check runs before the model is touched
        sample(None, None, *args, **kwargs)


@pytest.mark.slow
def test_default_model_logps_equal_teacher_forced_scoring():
    """The same check on the embedded SmolLM2-135M, plain and chat prompts (loads the model; minutes on two shared cores)."""
    from dpolab.models import load_model

    model, tok = load_model()
    for prompts, chat in [(["The movie was", "An utterly charming and"], False),
                          ([[{"role": "user", "content": "Describe a film in one sentence."}]], True)]:
        s = sample(model, tok, prompts, 2, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1, chat=chat,
                   progress=False)
        for p in range(len(prompts)):
            for i in range(2):
                ids = s.token_ids[p][i]
                assert s.model_logps[p, i].item() == pytest.approx(
                    teacher_forced_logps(model, s.prompt_ids[p], ids), abs=2e-3)
                assert s.sampling_logps[p, i].item() == pytest.approx(
                    teacher_forced_logps(model, s.prompt_ids[p], ids, 0.9, None, 0.95), abs=2e-3)
