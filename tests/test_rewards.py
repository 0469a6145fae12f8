"""Implicit rewards over (prompt, response) lists, accuracy and margins, distributions, and sequence KL."""

import copy
import math

import pytest
import torch

from dpolab.data.batch import collate_sequences
from dpolab.data.tokenize import tokenize_response
from dpolab.models.tiny import tiny_causal_lm
from dpolab.rewards import (
    batch_implicit_rewards,
    implicit_reward,
    implicit_rewards,
    pair_accuracies,
    pair_metrics,
    response_logps,
    reward_accuracy,
    reward_distribution,
    reward_distribution_from_rewards,
    reward_margins,
    sequence_kl,
)

PROMPTS = ["The movie was", "Hello! How are you", "The movie was", "It is a mess", "My name is"]
RESPONSES = [" a delight.", " today? I am fine.", " dull", " too long, too loud, and too pleased.", " Ada"]


@pytest.fixture(scope="module")
def models():
    policy, tokenizer = tiny_causal_lm("gpt2", seed=0)
    reference, _ = tiny_causal_lm("gpt2", seed=1)
    return policy, reference, tokenizer


def _slow_logp(model, tokenizer, prompt, response):
    """One unpadded sequence at a time, log-softmax over the full logits, summed over the response tokens."""
    prompt_ids, response_ids, mask = tokenize_response(prompt, response, tokenizer)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = len(prompt_ids)
    return sum(logprobs[start + k - 1, tok].item() for k, (tok, m) in enumerate(zip(response_ids, mask)) if m)


def test_implicit_rewards_formula():
    """β (log π_θ − log π_ref): 0.5 × ((−3) − (−5)) = 1 and 0.5 × ((−4) − (−2)) = −1."""
    rewards = implicit_rewards(torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -2.0]), 0.5)
    assert rewards.tolist() == [1.0, -1.0]
    # without a reference r̂ = β log π_θ; a (X, K) table works like (N,); the result carries no gradient
    assert implicit_rewards(torch.tensor([-3.0, -4.0]), None, 0.5).tolist() == [-1.5, -2.0]
    table = implicit_rewards(torch.zeros(2, 3, requires_grad=True), torch.full((2, 3), -1.0), 2.0)
    assert table.tolist() == [[2.0] * 3] * 2 and not table.requires_grad
    with pytest.raises(ValueError, match="differ"):
        implicit_rewards(torch.zeros(2), torch.zeros(3), 0.5)


def test_implicit_reward_over_lists_equals_one_sequence_at_a_time(models):
    """Batching by length (batch_size 2), padding and reordering must not change any reward."""
    policy, reference, tokenizer = models
    rewards = implicit_reward(policy, reference, tokenizer, PROMPTS, RESPONSES, beta=0.1, batch_size=2)
    expected = [
        0.1 * (_slow_logp(policy, tokenizer, p, r) - _slow_logp(reference, tokenizer, p, r))
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(abs(e) for e in expected) > 0.05  # the two models differ, so the check has teeth


def test_reference_variants_agree(models):
    """Same model as reference: all zero. Precomputed reference log-probs: same as passing the model.
    A SequenceBatch gives the same rewards as the lists."""
    policy, reference, tokenizer = models
    assert implicit_reward(policy, policy, tokenizer, PROMPTS, RESPONSES, beta=0.1).abs().max() == 0
    ref_logps, lengths = response_logps(reference, tokenizer, PROMPTS, RESPONSES, batch_size=3)
    from_model = implicit_reward(policy, reference, tokenizer, PROMPTS, RESPONSES, beta=0.1)
    from_cache = implicit_reward(policy, ref_logps, tokenizer, PROMPTS, RESPONSES, beta=0.1)
    torch.testing.assert_close(from_cache, from_model, atol=1e-6, rtol=0)
    tokens = [tokenize_response(p, r, tokenizer) for p, r in zip(PROMPTS, RESPONSES)]
    assert lengths.tolist() == [len(t[1]) for t in tokens]
    batch = collate_sequences([t[0] for t in tokens], [t[1] for t in tokens], [t[2] for t in tokens], 0)
    torch.testing.assert_close(batch_implicit_rewards(policy, reference, batch, 0.1), from_model, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(5,\)"):
        implicit_reward(policy, ref_logps[:2], tokenizer, PROMPTS, RESPONSES, beta=0.1)


def test_peft_policy_with_adapter_disabled_is_the_reference():
    peft = pytest.importorskip("peft")
    base, tokenizer = tiny_causal_lm("llama", seed=0)
    frozen = copy.deepcopy(base)
    policy = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with_none = implicit_reward(policy, None, tokenizer, PROMPTS, RESPONSES, beta=0.1)
    with_copy = implicit_reward(policy, frozen, tokenizer, PROMPTS, RESPONSES, beta=0.1)
    torch.testing.assert_close(with_none, with_copy, atol=1e-5, rtol=0)
    assert with_copy.abs().max() > 1e-3
    with pytest.raises(ValueError, match="has no adapter"):
        implicit_reward(frozen, None, tokenizer, PROMPTS, RESPONSES, beta=0.1)


def test_accuracy_margins_and_metrics():
    """Pairs (1 vs 0), (2 vs 2), (3 vs 4), (0 vs −1): win, tie, loss, win -> (1 + ½ + 0 + 1)/4 = 0.625,
    or 0.5 if ties count 0; margins (1, 0, −1, 1), mean 0.25."""
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert reward_margins(chosen, rejected).tolist() == [1.0, 0.0, -1.0, 1.0]
    assert reward_accuracy(chosen, rejected) == 0.625
    assert reward_accuracy(chosen, rejected, ties=0.0) == 0.5
    assert pair_accuracies(chosen, rejected).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert pair_accuracies(chosen, rejected).dtype == torch.float64
    assert pair_metrics(chosen, rejected) == {
        "rewards/chosen": 1.5,
        "rewards/rejected": 1.25,
        "rewards/margins": 0.25,
        "rewards/accuracies": 0.625,
    }


def test_reward_distribution_hand_values():
    """Rewards c + (ln 1, ln 2, ln 5): choice probabilities (1, 2, 5)/8 for any constant c;
    P(y_2 ≻ y_0) = 5/(5 + 1) = 5/6; best first: 2, 1, 0."""
    for constant in (0.0, -7.0):
        dist = reward_distribution_from_rewards(torch.log(torch.tensor([1.0, 2.0, 5.0])) + constant)
        assert dist.choice_probs.tolist() == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=1e-6)
        assert dist.pairwise[2, 0].item() == pytest.approx(5 / 6, abs=1e-6)
        assert dist.order == [2, 1, 0]


def test_reward_distribution_over_model_responses(models):
    policy, reference, tokenizer = models
    responses = [" a delight.", " dull", " superb"]
    dist = reward_distribution(policy, reference, tokenizer, "The movie was", responses, beta=0.1)
    direct = implicit_reward(policy, reference, tokenizer, ["The movie was"] * 3, responses, beta=0.1)
    torch.testing.assert_close(dist.rewards.float(), direct, atol=0, rtol=0)
    assert dist.order == torch.argsort(direct, descending=True).tolist()


def test_sequence_kl_hand_value():
    """Differences (1, 2, 3, 6): mean 3; sample variance (4 + 1 + 0 + 9)/3 = 14/3; s.e. √(14/3)/2 = 1.0801."""
    mean, se = sequence_kl(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.zeros(4))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2, abs=1e-12)


def test_sequence_kl_estimates_the_exact_kl():
    """Samples y ~ p of a categorical: mean log p(y) − log q(y) within 4 s.e. of Σ p log(p/q)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 20_000, replacement=True, generator=generator)
    mean, se = sequence_kl(p.log()[samples], q.log()[samples])
    assert abs(mean - exact) < 4 * se
    backwards, _ = sequence_kl(q.log()[samples], p.log()[samples])
    assert backwards == pytest.approx(-mean)
    with pytest.raises(ValueError, match="must both be"):
        sequence_kl(torch.zeros(3), torch.zeros(4))
