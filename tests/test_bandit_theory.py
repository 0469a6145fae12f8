"""The derivation's quantities on the bandit: eq. 3, the §4 gradient, and the error bars of a DPO fit."""

import math

import pytest
import torch

from dpolab.experiments.bandit import Bandit, log_partition, optimal_policy
from dpolab.experiments.bandit_theory import (
    dpo_gradient,
    expected_reward,
    kl_divergence,
    kl_regularised_objective,
    logprob_standard_errors,
    minimiser_distance_bound,
    tabular_logprob_grad,
)
from dpolab.losses import dpo_loss


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_objective_hand_value():
    """π = (1/2, 1/2), π_ref = (3/4, 1/4), r = (1, 0), β = 1/2.

    E_π r = 1/2; KL = ½ log(½ / ¾) + ½ log(½ / ¼) = ½ log(4/3); J = 1/2 − ½ · ½ log(4/3) = 1/2 − ¼ log(4/3).
    """
    policy, ref, rewards = _t([[0.5, 0.5]]).log(), _t([[0.75, 0.25]]).log(), _t([[1.0, 0.0]])
    assert expected_reward(policy, rewards).item() == pytest.approx(0.5, abs=1e-15)
    assert kl_divergence(policy, ref).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-15)
    assert kl_regularised_objective(policy, rewards, ref, 0.5).item() == pytest.approx(
        0.5 - 0.25 * math.log(4 / 3), abs=1e-15)


def test_objective_is_log_partition_minus_kl_to_the_optimum():
    """Appendix A.1: J(π) = β log Z(x) − β KL(π ‖ π*) for every π, so J(π*) = β log Z and J(π) ≤ J(π*)."""
    bandit, beta = Bandit.random(3, 5, seed=1), 0.7
    star = optimal_policy(bandit.rewards, bandit.ref_logprobs, beta)
    log_z = log_partition(bandit.rewards, bandit.ref_logprobs, beta)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        policy = torch.log_softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), -1)
        value = kl_regularised_objective(policy, bandit.rewards, bandit.ref_logprobs, beta)
        assert torch.allclose(value, beta * log_z - beta * kl_divergence(policy, star), atol=1e-12)
        assert bool((value < beta * log_z).all())


def test_tabular_logprob_grad_matches_autograd():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    prompt, response = torch.tensor([0, 2, 2, 1]), torch.tensor([3, 0, 1, 1])
    logprobs = torch.log_softmax(logits, -1)
    closed = tabular_logprob_grad(logprobs, prompt, response)
    for b in range(4):
        (auto,) = torch.autograd.grad(logprobs[prompt[b], response[b]], logits, retain_graph=True)
        assert torch.allclose(closed[b], auto, atol=1e-14)


def test_dpo_gradient_at_the_reference_hand_value():
    """At π_θ = π_ref both implicit rewards are 0, the weight is σ(0) = ½, and ∇log π(y_w) − ∇log π(y_l) =
    (e_w − π) − (e_l − π) = e_w − e_l, so the gradient is −β/2 on (x, y_w) and +β/2 on (x, y_l)."""
    beta = 0.3
    ref = _t([[0.2, 0.3, 0.5]]).log()
    prompt, chosen, rejected = torch.tensor([0]), torch.tensor([2]), torch.tensor([0])
    zero = torch.zeros(1, dtype=torch.float64)
    grad = dpo_gradient(zero, zero, tabular_logprob_grad(ref, prompt, chosen),
                        tabular_logprob_grad(ref, prompt, rejected), beta)
    assert grad[0, 0].tolist() == pytest.approx([beta / 2, 0.0, -beta / 2], abs=1e-15)


def test_dpo_gradient_matches_autograd_of_the_loss():
    """The §4 closed form, summed over pairs, equals autograd of the summed sigmoid DPO loss (eq. 7)."""
    bandit, beta = Bandit.random(3, 4, seed=4), 0.4
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0, 1, 2, 2, 1])
    w, lo = torch.tensor([1, 0, 3, 2, 3]), torch.tensor([2, 3, 0, 1, 0])
    logprobs = torch.log_softmax(logits, -1)
    ref = bandit.ref_logprobs
    losses, chosen_rewards, rejected_rewards = dpo_loss(logprobs[x, w], logprobs[x, lo], ref[x, w], ref[x, lo], beta)
    (auto,) = torch.autograd.grad(losses.sum(), logits)
    closed = dpo_gradient(chosen_rewards, rejected_rewards, tabular_logprob_grad(logprobs, x, w),
                          tabular_logprob_grad(logprobs, x, lo), beta)
    assert torch.allclose(closed.sum(0), auto, atol=1e-14)


def test_minimiser_distance_bound_is_exact_for_a_quadratic():
    """L = ½ a Σ_x (θ_x0 − θ_x1 − t_x)²: curvature 2a along (1, −1)/√2 and 0 along the shift (1, 1).

    With gap d_x = θ_x0 − θ_x1 − t_x the gradient norm is a √(2 Σ d²), so the bound is √(Σ d² / 2), which is
    exactly the distance to the nearest minimiser (move each row by ∓d/2)."""
    a, target = 3.0, _t([0.5, -1.0])

    def loss(theta):
        return 0.5 * a * ((theta[:, 0] - theta[:, 1] - target) ** 2).sum()

    theta = _t([[1.0, 0.0], [0.0, 0.25]])
    gaps = theta[:, 0] - theta[:, 1] - target
    assert minimiser_distance_bound(loss, theta) == pytest.approx(math.sqrt((gaps**2).sum().item() / 2), rel=1e-12)


def test_minimiser_distance_bound_refuses_a_non_convex_loss():
    with pytest.raises(ValueError, match="not strictly convex"):
        minimiser_distance_bound(lambda t: -((t[:, 0] - t[:, 1]) ** 2).sum(), _t([[1.0, 0.0]]))


def test_logprob_standard_errors_hand_value():
    """One prompt, two responses: every pair is (0, 1), with P = P(0 ≻ 1) = σ(r_0 − r_1).

    The loss depends on d = θ_0 − θ_1 through h = β(d − d_ref); its curvature in d is β² P(1 − P), so
    Var(d̂) = 1 / (N β² P(1 − P)); log π_0 = log σ(d) has slope 1 − π*_0, and log π_1 = log σ(−d) slope −π*_1:
    SE(log π̂_0) = (1 − π*_0) / √(N β² P(1 − P)), SE(log π̂_1) = π*_0 / √(N β² P(1 − P)).
    """
    beta, n = 0.5, 400
    bandit = Bandit(_t([[0.8, -0.4]]), _t([[0.3, 0.7]]).log())
    p = torch.sigmoid(_t(1.2)).item()
    star0 = optimal_policy(bandit.rewards, bandit.ref_logprobs, beta).exp()[0, 0].item()
    scale = 1 / math.sqrt(n * beta**2 * p * (1 - p))
    se = logprob_standard_errors(bandit, beta, n)
    assert se[0].tolist() == pytest.approx([(1 - star0) * scale, star0 * scale], rel=1e-9)
    assert torch.allclose(logprob_standard_errors(bandit, beta, 4 * n), se / 2, rtol=1e-12)
