"""A closed-form bandit where the DPO solution is known exactly (the derivation notebook and the tests).

Prompts x ∈ {0..X-1}, responses y ∈ {0..K-1}, a known reward r(x, y) and a reference policy π_ref(y|x).
The KL-constrained reward maximisation problem (paper eq. 3) has the solution (eq. 4)

    π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x),   Z(x) = Σ_y π_ref(y|x) exp(r(x, y)/β),

so r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x) (eq. 5). Preferences follow Bradley–Terry (eq. 1),
P(y_1 ≻ y_2 | x) = σ(r(x, y_1) − r(x, y_2)), over pairs drawn from π_ref as in the paper. A tabular policy
(one logit per (x, y)) trained with the DPO loss on those preferences must reach π*, and its implicit
reward β log π_θ/π_ref (:func:`dpolab.rewards.implicit_rewards`, which takes the (X, K) tables as they are)
must equal r up to the per-prompt constant −β log Z(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpolab.losses import get_loss


@dataclass
class Bandit:
    """A contextual bandit with a known reward.

    Attributes:
        rewards: (X, K) r(x, y).
        ref_logprobs: (X, K) log π_ref(y|x); each row normalised.
    """

    rewards: Tensor
    ref_logprobs: Tensor

    def __post_init__(self):
        if self.rewards.shape != self.ref_logprobs.shape or self.rewards.dim() != 2:
            raise ValueError(
                f"rewards {tuple(self.rewards.shape)} and ref_logprobs {tuple(self.ref_logprobs.shape)} must both be (X, K)"
            )
        total = self.ref_logprobs.logsumexp(-1)
        if not torch.allclose(total, torch.zeros_like(total), atol=1e-5):
            row = int((total.abs() > 1e-5).nonzero()[0])
            raise ValueError(f"ref_logprobs row {row} is not normalised: logsumexp = {total[row].item():.6f}")

    @classmethod
    def random(
        cls, num_prompts: int = 3, num_responses: int = 4, *, reward_scale: float = 1.0, seed: int = 0
    ) -> Bandit:
        """Rewards ~ N(0, reward_scale²) and a reference drawn from a Dirichlet(1) per prompt, in float64."""
        generator = torch.Generator().manual_seed(seed)
        rewards = reward_scale * torch.randn(num_prompts, num_responses, generator=generator, dtype=torch.float64)
        gamma = -torch.rand(num_prompts, num_responses, generator=generator, dtype=torch.float64).log()
        return cls(rewards, (gamma / gamma.sum(-1, keepdim=True)).log())

    @property
    def num_prompts(self) -> int:
        return self.rewards.size(0)

    @property
    def num_responses(self) -> int:
        return self.rewards.size(1)


def optimal_policy(rewards: Tensor, ref_logprobs: Tensor, beta: float) -> Tensor:
    """log π*(y|x) = log π_ref(y|x) + r(x, y)/β − log Z(x) (paper eq. 4). Shape: (X, K) -> (X, K)."""
    return torch.log_softmax(ref_logprobs + rewards / beta, dim=-1)


def log_partition(rewards: Tensor, ref_logprobs: Tensor, beta: float) -> Tensor:
    """log Z(x) = log Σ_y π_ref(y|x) exp(r(x, y)/β). Shape: (X, K) -> (X,)."""
    return torch.logsumexp(ref_logprobs + rewards / beta, dim=-1)


def preference_probability(rewards: Tensor) -> Tensor:
    """Bradley–Terry P(y_i ≻ y_j | x) = σ(r(x, y_i) − r(x, y_j)) (paper eq. 1). Shape: (X, K) -> (X, K, K)."""
    return torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])


@dataclass
class Preferences:
    """Sampled preference pairs: indices of the prompt, the chosen and the rejected response, each (N,)."""

    prompt: Tensor
    chosen: Tensor
    rejected: Tensor


def sample_preferences(bandit: Bandit, num_pairs: int, *, seed: int = 0) -> Preferences:
    """Draw x uniformly, two distinct responses from π_ref(·|x), and label them by Bradley–Terry.

    Identical responses would carry no preference signal, so each pair is drawn without replacement.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(bandit.num_prompts, (num_pairs,), generator=generator)
    probs = bandit.ref_logprobs.exp()[prompt]
    two = torch.multinomial(probs, 2, replacement=False, generator=generator)
    first, second = two[:, 0], two[:, 1]
    p_first = torch.sigmoid(bandit.rewards[prompt, first] - bandit.rewards[prompt, second])
    first_wins = torch.rand(num_pairs, generator=generator, dtype=p_first.dtype) < p_first
    return Preferences(prompt, torch.where(first_wins, first, second), torch.where(first_wins, second, first))


class TabularPolicy(nn.Module):
    """π_θ(y|x) = softmax(θ[x])_y with one free logit per (prompt, response)."""

    def __init__(self, logits: Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def log_probs(self) -> Tensor:
        """log π_θ(y|x). Shape: (X, K)."""
        return torch.log_softmax(self.logits, dim=-1)


def _one_token(n: int) -> dict[str, Tensor]:
    """Response lengths for losses that normalise by length: a bandit response is one action, one token."""
    ones = torch.ones(n, dtype=torch.long)
    return {"chosen_lengths": ones, "rejected_lengths": ones}


def empirical_dpo_loss(
    policy_logprobs: Tensor, bandit: Bandit, preferences: Preferences, beta: float, loss: str = "sigmoid", **params
) -> Tensor:
    """Mean loss over sampled pairs, with the registered loss ``loss``. Shape: (X, K) -> scalar."""
    x, win, lose = preferences.prompt, preferences.chosen, preferences.rejected
    losses, _, _ = get_loss(loss)(
        policy_logprobs[x, win],
        policy_logprobs[x, lose],
        bandit.ref_logprobs[x, win],
        bandit.ref_logprobs[x, lose],
        beta,
        **_one_token(len(x)),
        **params,
    )
    return losses.mean()


def expected_dpo_loss(policy_logprobs: Tensor, bandit: Bandit, beta: float, loss: str = "sigmoid", **params) -> Tensor:
    """The loss in expectation over the pairs of :func:`sample_preferences`, computed exactly.

        E = 1/X Σ_x Σ_{i≠j} q_x(i, j) P(y_i ≻ y_j | x) ℓ(y_w = i, y_l = j),

    where q_x(i, j) = π_ref(i|x) π_ref(j|x) / (1 − π_ref(i|x)) + (i ↔ j) is the probability that the
    two responses drawn without replacement are {i, j}; the weights sum to one per prompt.

    Shape: (X, K) -> scalar.
    """
    ref = bandit.ref_logprobs
    p = ref.exp()
    # P(first = i, second = j) without replacement; the pair {i, j} comes from either order
    ordered = p[:, :, None] * p[:, None, :] / (1 - p[:, :, None])
    pair = ordered + ordered.transpose(1, 2)
    pair = pair * (1 - torch.eye(bandit.num_responses, dtype=pair.dtype))
    weight = pair * preference_probability(bandit.rewards) / bandit.num_prompts
    k = bandit.num_responses
    losses, _, _ = get_loss(loss)(
        policy_logprobs[:, :, None].expand(-1, -1, k).reshape(-1),
        policy_logprobs[:, None, :].expand(-1, k, -1).reshape(-1),
        ref[:, :, None].expand(-1, -1, k).reshape(-1),
        ref[:, None, :].expand(-1, k, -1).reshape(-1),
        beta,
        **_one_token(policy_logprobs.size(0) * k * k),
        **params,
    )
    return (weight.reshape(-1) * losses).sum()


def train_tabular_policy(
    bandit: Bandit,
    beta: float,
    *,
    preferences: Preferences | None = None,
    loss: str = "sigmoid",
    max_iter: int = 200,
    **params,
) -> TabularPolicy:
    """Minimise the DPO loss over a tabular policy, full batch, with L-BFGS, starting from π_ref.

    The sigmoid loss is convex in the logits (a logistic regression on logit differences), so L-BFGS
    reaches the global minimum. With ``preferences=None`` the exact :func:`expected_dpo_loss` is
    minimised, otherwise the mean over the sampled pairs.
    """
    policy = TabularPolicy(bandit.ref_logprobs.detach())
    optimiser = torch.optim.LBFGS(
        policy.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure():
        optimiser.zero_grad()
        logprobs = policy.log_probs()
        if preferences is None:
            value = expected_dpo_loss(logprobs, bandit, beta, loss, **params)
        else:
            value = empirical_dpo_loss(logprobs, bandit, preferences, beta, loss, **params)
        value.backward()
        return value

    optimiser.step(closure)
    return policy
