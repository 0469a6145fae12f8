"""The closed-form bandit: DPO on Bradley–Terry preferences reaches π* ∝ π_ref exp(r/β) (paper eqs. 4–5)."""

import math

import pytest
import torch

from dpolab.experiments.bandit import (
    Bandit,
    empirical_dpo_loss,
    expected_dpo_loss,
    log_partition,
    optimal_policy,
    preference_probability,
    sample_preferences,
    train_tabular_policy,
)
from dpolab.rewards import implicit_rewards


def test_optimal_policy_hand_value():
    """π_ref = (1/2, 1/2), r = (β ln 3, 0): π* ∝ (1/2 · 3, 1/2 · 1) = (3/4, 1/4); Z = (3 + 1)/2 = 2."""
    beta = 0.2
    rewards = torch.tensor([[beta * math.log(3), 0.0]], dtype=torch.float64)
    ref = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert optimal_policy(rewards, ref, beta).exp().tolist()[0] == pytest.approx([0.75, 0.25], abs=1e-12)
    assert log_partition(rewards, ref, beta).item() == pytest.approx(math.log(2), abs=1e-12)
    assert preference_probability(rewards)[0, 0, 1].item() == pytest.approx(1 / (1 + 3**-beta), abs=1e-12)


def test_optimal_policy_maximises_the_kl_regularised_reward():
    """π* maximises E_π[r] − β KL(π‖π_ref) (eq. 3): every perturbed policy scores lower."""
    bandit, beta = Bandit.random(2, 5, seed=3), 0.3

    def objective(logprobs):
        return ((logprobs.exp() * (bandit.rewards - beta * (logprobs - bandit.ref_logprobs))).sum(-1)).sum()

    best = optimal_policy(bandit.rewards, bandit.ref_logprobs, beta)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.log_softmax(best + 0.1 * torch.randn(best.shape, generator=generator, dtype=best.dtype), -1)
        assert objective(other) < objective(best)


def test_expected_loss_equals_the_mean_over_sampled_preferences():
    """The exact expectation must lie within 4 standard errors of a 100,000-pair Monte Carlo mean."""
    bandit, beta = Bandit.random(3, 4, seed=0), 0.5
    generator = torch.Generator().manual_seed(5)
    policy = torch.log_softmax(bandit.ref_logprobs + torch.randn(3, 4, generator=generator, dtype=torch.float64), -1)
    prefs = sample_preferences(bandit, 100_000, seed=1)
    assert bool((prefs.chosen != prefs.rejected).all())
    from dpolab.losses import dpo_loss

    x, w, lo = prefs.prompt, prefs.chosen, prefs.rejected
    per_pair, _, _ = dpo_loss(policy[x, w], policy[x, lo], bandit.ref_logprobs[x, w], bandit.ref_logprobs[x, lo], beta)
    standard_error = per_pair.std().item() / math.sqrt(per_pair.numel())
    exact = expected_dpo_loss(policy, bandit, beta).item()
    assert empirical_dpo_loss(policy, bandit, prefs, beta).item() == pytest.approx(per_pair.mean().item(), abs=1e-12)
    assert abs(per_pair.mean().item() - exact) < 4 * standard_error


def test_minimising_the_expected_dpo_loss_reaches_the_optimal_policy():
    """The expected loss is minimised by L-BFGS to float64 loss precision, which pins the logits to about
    √ε_machine ≈ 1e-7 (the loss is flat to second order at its minimum); 1e-5 leaves two orders of margin.
    The implicit reward is then r − β log Z(x): r up to a per-prompt constant (eq. 5)."""
    bandit, beta = Bandit.random(3, 4, seed=0), 0.5
    policy = train_tabular_policy(bandit, beta)
    target = optimal_policy(bandit.rewards, bandit.ref_logprobs, beta)
    torch.testing.assert_close(policy.log_probs().detach(), target, atol=1e-5, rtol=0)
    shift = implicit_rewards(policy.log_probs().detach(), bandit.ref_logprobs, beta) - bandit.rewards
    expected_shift = -beta * log_partition(bandit.rewards, bandit.ref_logprobs, beta)
    torch.testing.assert_close(shift, expected_shift[:, None].expand_as(shift), atol=1e-5, rtol=0)
    assert (policy.log_probs() - bandit.ref_logprobs).abs().max() > 0.5  # it had far to travel from π_ref


def test_minimising_dpo_on_sampled_bradley_terry_preferences_recovers_the_reward():
    """From 20,000 sampled pairs, each reward difference r(y_i) − r(y_j) is estimated with standard error
    about 1/√(n_ij p_ij (1 − p_ij)) (the Bradley–Terry Fisher information of the n_ij direct comparisons;
    indirect comparisons only shrink it). Every estimated difference must lie within 4 of those."""
    bandit, beta = Bandit.random(2, 3, reward_scale=1.0, seed=4), 0.5
    prefs = sample_preferences(bandit, 20_000, seed=2)
    policy = train_tabular_policy(bandit, beta, preferences=prefs)
    estimated = implicit_rewards(policy.log_probs().detach(), bandit.ref_logprobs, beta)
    p = preference_probability(bandit.rewards)
    for x in range(2):
        for i in range(3):
            for j in range(i + 1, 3):
                in_pair = (prefs.prompt == x) & (
                    ((prefs.chosen == i) & (prefs.rejected == j)) | ((prefs.chosen == j) & (prefs.rejected == i))
                )
                n = int(in_pair.sum())
                standard_error = 1 / math.sqrt(n * p[x, i, j].item() * (1 - p[x, i, j].item()))
                error = (estimated[x, i] - estimated[x, j]) - (bandit.rewards[x, i] - bandit.rewards[x, j])
                assert abs(error.item()) < 4 * standard_error, (x, i, j, n)


def test_bandit_validates_its_reference():
    with pytest.raises(ValueError, match="ref_logprobs row 1 is not normalised"):
        Bandit(torch.zeros(2, 2), torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.6]])))
