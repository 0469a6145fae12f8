"""PPO (dpolab.baselines.ppo): per-token rewards, GAE, the clipped losses against hand-derived values; training on tiny models."""

import math

import numpy as np
import pytest
import torch
from tiny_runs import letter_e_reward, rl_reward_gain

from dpolab.baselines.ppo import ValueHead, gae, policy_and_values, ppo_loss, ppo_train, token_rewards, whiten
from dpolab.baselines.rollout import RolloutSettings
from dpolab.models.tiny import tiny_causal_lm
from dpolab.sample.completions import completion_batch, completion_logprobs, completion_token_logprobs
from dpolab.sample.generate import sample


def test_token_rewards_by_hand():
    """Row: prompt position, two response tokens, padding. log π_old (−1, −2), log π_ref (−1.5, −1), β = 0.5,
    score 2: r = (−0.5·0.5, −0.5·(−1) + 2) = (−0.25, 2.5) on the response, 0 elsewhere."""
    mask = torch.tensor([[False, True, True, False]])
    old = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    r = token_rewards(torch.tensor([2.0]), old, ref, mask, 0.5)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.25, 2.5, 0.0]]))
    # the sum over tokens is RLOO's penalised sequence reward r − β log π/π_ref
    assert r.sum().item() == pytest.approx(2.0 - 0.5 * ((-1 - -1.5) + (-2 - -1)))
    with pytest.raises(ValueError, match="row 0"):
        token_rewards(torch.tensor([1.0]), old, ref, torch.zeros_like(mask), 0.5)


def test_gae_by_hand():
    """Rewards (1, 2), values (0.5, 1.0), γ = 1, λ = 0.5, after a masked prompt position and before padding.

    δ_2 = 2 + 0 − 1 = 1 → A_2 = 1; δ_1 = 1 + 1.0 − 0.5 = 1.5 → A_1 = 1.5 + 0.5·1 = 2. Returns A + V = (2.5, 2).
    """
    mask = torch.tensor([[False, True, True, False]])
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 0.0]])  # the prompt position's value is never used
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 2.5, 2.0, 0.0]]))


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    """γ = λ = 1: A_t = Σ_{s≥t} r_s − V_t exactly (the telescoping sum), for rows of different lengths."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv, _ = gae(rewards * mask, values * mask, mask, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    torch.testing.assert_close(adv, (to_go - values) * mask)


def test_ppo_loss_by_hand():
    """Two tokens. Token 1: A = 1, log ρ = 0.5 (ρ = 1.6487 > 1.2): max(−1.6487, −1.2) = −1.2, clipped.
    Token 2: A = −1, log ρ = −0.5 (ρ = 0.6065 < 0.8): max(0.6065, 0.8) = 0.8, clipped. pg = (−1.2 + 0.8)/2 = −0.2.
    Value: V = 1, V_old = 0, G = 2, ε_v = 0.2: max((1 − 2)², (0.2 − 2)²) = 3.24, ½ · 3.24 = 1.62 per token."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    logps = torch.tensor([[0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo_loss(logps, old, torch.ones(1, 2), torch.zeros(1, 2), adv, torch.full((1, 2), 2.0), mask,
                           cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    assert stats["pg_loss"] == pytest.approx(-0.2, abs=1e-6)
    assert stats["vf_loss"] == pytest.approx(1.62, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1.0)
    assert stats["approx_kl"] == pytest.approx(0.125)
    assert loss.item() == pytest.approx(-0.2 + 0.1 * 1.62, abs=1e-6)


def test_ppo_loss_at_ratio_one_has_the_policy_gradient():
    """At π = π_old the clipped surrogate's gradient is −E_t[A_t ∇ log π_t] (the ratio's gradient is ∇ log π)."""
    mask = torch.tensor([[True, True, False]])
    logps = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[0.7, -0.3, 5.0]])
    zeros = torch.zeros(1, 3)
    loss, _ = ppo_loss(logps, logps.detach(), zeros, zeros, adv, zeros, mask, vf_coef=0.0)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.35, 0.15, 0.0]]))


def test_whiten():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]])
    w = whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]) * math.sqrt(1.5), rtol=1e-4,
                               atol=1e-4)


def test_per_token_scores_sum_to_the_sequence_scores():
    """The per-token reference log-probs PPO uses sum to the fast path's sequence log-probs, row by row."""
    model, tok = tiny_causal_lm("gpt2", seed=1)
    samples = sample(model, tok, ["The movie", "A dull"], 3, max_new_tokens=6, top_k=len(tok), seed=0, progress=False)
    per_token = completion_token_logprobs(model, samples, tok.pad_token_id, batch_size=4)
    torch.testing.assert_close(per_token.sum(-1).view(2, 3), completion_logprobs(model, samples, tok.pad_token_id),
                               rtol=1e-5, atol=1e-4)
    head = ValueHead(model.config.hidden_size)
    with torch.no_grad():
        logps, values, mask = policy_and_values(model, head, completion_batch(samples, tok.pad_token_id))
    torch.testing.assert_close(logps, per_token, rtol=1e-5, atol=1e-5)
    assert values.abs().sum() == 0 and mask.sum() == sum(max(len(i), 1) for row in samples.token_ids for i in row)


def test_ppo_raises_the_reward_and_starts_at_zero_kl():
    """Reward = number of letters 'e' in the completion; PPO must raise its mean by more than three standard errors
    of the difference (a policy that did not move fails with probability about 0.1%). At the first rollout the
    policy is π_ref, so its KL is 0 up to float error."""
    history, gain, se = rl_reward_gain(ppo_train)
    assert len(history) == 20 and all(np.isfinite(h["loss"]) for h in history)
    assert abs(history[0]["kl"]) < 1e-4
    assert gain > 3 * se, (gain, se)
    policy, tok = tiny_causal_lm("gpt2", seed=2)
    with pytest.raises(ValueError, match="num_ppo_epochs"):
        ppo_train(policy, policy, tok, ["It is"], letter_e_reward, RolloutSettings(steps=1, progress=False),
                  num_ppo_epochs=0)
