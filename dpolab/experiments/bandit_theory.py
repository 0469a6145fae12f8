"""The derivation's quantities on the tabular bandit: the objective (eq. 3), the DPO gradient (§4), error bars.

:mod:`dpolab.experiments.bandit` holds the bandit, π* (eq. 4) and the DPO fit; this module holds what the derivation
notebook checks them with. The tabular policy is π_θ(y|x) = softmax(θ[x])_y, so

    ∇_θ log π_θ(y|x) = e_(x, y) − π_θ(·|x) on row x, 0 on the other rows,

and the paper's gradient of the DPO loss (§4, "What does the DPO update do?") is, per pair,

    ∇_θ L = −β σ(r̂(x, y_l) − r̂(x, y_w)) [∇_θ log π_θ(y_w|x) − ∇_θ log π_θ(y_l|x)],   r̂ = β log π_θ/π_ref.

The error bars of a DPO fit come from the loss itself: the expected loss is the negative log-likelihood of
one Bradley–Terry preference, so its Hessian at π* is the Fisher information of one pair, and a fit on N
sampled pairs has covariance ≈ H⁺/N (:func:`logprob_standard_errors`); an optimiser's remaining distance
to the minimiser is bounded by the gradient norm over the smallest curvature (:func:`minimiser_distance_bound`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpolab.experiments.bandit import Bandit, expected_dpo_loss, optimal_policy


def expected_reward(policy_logprobs: Tensor, rewards: Tensor) -> Tensor:
    """E_{y~π(·|x)} r(x, y) per prompt. Shape: (X, K), (X, K) -> (X,)."""
    return (policy_logprobs.exp() * rewards).sum(-1)


def kl_divergence(policy_logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """KL(π(·|x) ‖ π_ref(·|x)) = Σ_y π (log π − log π_ref) per prompt. Shape: (X, K), (X, K) -> (X,)."""
    return (policy_logprobs.exp() * (policy_logprobs - ref_logprobs)).sum(-1)


def kl_regularised_objective(policy_logprobs: Tensor, rewards: Tensor, ref_logprobs: Tensor, beta: float) -> Tensor:
    """The paper's eq. 3 per prompt: E_{y~π}[r(x, y)] − β KL(π(·|x) ‖ π_ref(·|x)). Shape: (X, K) x3 -> (X,).

    It equals β log Z(x) − β KL(π ‖ π*) (Appendix A.1), so π* of eq. 4 is its unique maximiser.
    """
    return expected_reward(policy_logprobs, rewards) - beta * kl_divergence(policy_logprobs, ref_logprobs)


def tabular_logprob_grad(policy_logprobs: Tensor, prompt: Tensor, response: Tensor) -> Tensor:
    """∇_θ log π_θ(y|x) of the softmax-tabular policy for each (x, y): e_(x, y) − π_θ(·|x) on row x.

    Shape: policy_logprobs (X, K), prompt (B,), response (B,) -> (B, X, K).
    """
    num_prompts, num_responses = policy_logprobs.shape
    grad = torch.zeros(len(prompt), num_prompts, num_responses, dtype=policy_logprobs.dtype)
    rows = torch.arange(len(prompt))
    grad[rows, prompt] = -policy_logprobs.detach().exp()[prompt]
    grad[rows, prompt, response] += 1.0
    return grad


def dpo_gradient(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logp_grads: Tensor, rejected_logp_grads: Tensor, beta: float
) -> Tensor:
    """The paper's closed-form gradient of the sigmoid DPO loss (§4), one per pair.

        ∇_θ L = −β σ(r̂_l − r̂_w) (∇_θ log π_θ(y_w|x) − ∇_θ log π_θ(y_l|x))

    The weight σ(r̂_l − r̂_w) is large when the implicit reward ranks the pair the wrong way round.

    Args:
        chosen_rewards, rejected_rewards: r̂(x, y_w), r̂(x, y_l). Shape: (B,).
        chosen_logp_grads, rejected_logp_grads: ∇_θ log π_θ(y|x) of each pair's responses. Shape: (B, ...).
        beta: β of the loss.

    Returns:
        Per-pair gradients of the loss. Shape: (B, ...).
    """
    weight = torch.sigmoid(rejected_rewards - chosen_rewards)
    weight = weight.reshape(-1, *([1] * (chosen_logp_grads.dim() - 1)))
    return -beta * weight * (chosen_logp_grads - rejected_logp_grads)


def _shift_free_eigenvalues(hessian: Tensor, num_prompts: int) -> Tensor:
    """Eigenvalues of a Hessian in the logits with the per-prompt shifts (its exact null space) removed."""
    return torch.linalg.eigvalsh(hessian)[num_prompts:]


def minimiser_distance_bound(loss_fn: Callable[[Tensor], Tensor], logits: Tensor) -> float:
    """‖∇L(θ)‖ / λ_min: how far θ can be from the minimiser of a loss that is convex in the logits.

    Softmax policies ignore a per-prompt shift of the logits, so the Hessian has one zero eigenvalue per
    prompt (X of them); λ_min is the smallest of the others. For a strongly convex function,
    ‖θ − θ*‖ ≤ ‖∇L(θ)‖ / μ; μ is taken as the curvature at θ, which is exact to first order near θ*.
    Every log-prob moves by at most twice the largest logit change, so 2 × the bound limits the
    error of log π_θ.

    Args:
        loss_fn: logits (X, K) -> scalar loss (e.g. the expected DPO loss of their log-softmax).
        logits: where to evaluate it. Shape: (X, K).
    """
    theta = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(theta), theta)
    hessian = torch.autograd.functional.hessian(lambda t: loss_fn(t.reshape(logits.shape)), logits.detach().reshape(-1))
    smallest = _shift_free_eigenvalues(hessian, logits.shape[0])[0]
    if smallest <= 0:
        raise ValueError(f"the loss is not strictly convex at these logits (smallest curvature {smallest.item():.3g})")
    return float(grad.norm() / smallest)


def logprob_standard_errors(bandit: Bandit, beta: float, num_pairs: int) -> Tensor:
    """Asymptotic standard errors of log π̂(y|x) for DPO fitted on ``num_pairs`` sampled preferences.

    The expected DPO loss (:func:`dpolab.experiments.bandit.expected_dpo_loss`) is the negative log-likelihood of one
    preference drawn as :func:`dpolab.experiments.bandit.sample_preferences` draws it, and the model is well specified
    (labels follow Bradley–Terry with the true reward, which the implicit reward of π* reproduces). So its
    Hessian H at θ* = log π* is the Fisher information per pair, the maximum-likelihood logits have covariance
    ≈ H⁺ / N, and log π̂ = log_softmax(θ̂) has covariance J H⁺ Jᵀ / N with J the Jacobian of log_softmax.

    Shape: -> (X, K).
    """
    shape = bandit.rewards.shape
    theta_star = optimal_policy(bandit.rewards, bandit.ref_logprobs, beta).reshape(-1)

    def loss(flat):
        return expected_dpo_loss(torch.log_softmax(flat.reshape(shape), -1), bandit, beta)

    hessian = torch.autograd.functional.hessian(loss, theta_star)
    jacobian = torch.autograd.functional.jacobian(lambda t: torch.log_softmax(t.reshape(shape), -1).reshape(-1),
                                                  theta_star)
    # pinv drops the per-prompt shifts, the directions that log_softmax ignores (J maps them to 0)
    cutoff = 1e-9 * float(hessian.abs().max())
    covariance = jacobian @ torch.linalg.pinv(hessian, atol=cutoff, hermitian=True) @ jacobian.T / num_pairs
    return covariance.diagonal().clamp(min=0).sqrt().reshape(shape)
