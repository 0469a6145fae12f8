"""Losses that score each response's implicit reward on its own: NCA, BCO, SPPO (hard), APO-zero, APO-down.

Unlike the margin losses these see r̂_w = β s(y_w) and r̂_l = β s(y_l) separately, with s the log-ratio
log π_θ(y|x) − log π_ref(y|x), so they also control the *absolute* likelihood of each response (whether the
chosen one goes up or down), not only the gap. Names and formulas are trl 1.16's; no f-divergence variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses.registry import LossOutput, logratios_and_rewards, register


@register("nca_pair")
def nca_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, eq. 11): noise-contrastive alignment on absolute rewards,

        L = −log σ(r̂_w) − ½ log σ(−r̂_w) − ½ log σ(−r̂_l)

    The first term raises the chosen reward, the two halves pull both rewards down, so the chosen likelihood
    does not fall the way it can under DPO.

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    rw, rl = beta * chosen, beta * rejected
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return (losses, *rewards)


@register("bco_pair")
def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656, eq. 4 without the reward shift δ): a binary classifier
    with logit r̂ that labels chosen responses 1 and rejected ones 0,

        L = −log σ(r̂_w) − log σ(−r̂_l)

    (trl's ``bco_pair``, the BCO term of MPO, Wang et al. 2024, arXiv 2411.10442).

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return (losses, *rewards)


@register("sppo_hard")
def sppo_hard_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                   ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                   rejected_lengths: Tensor | None = None) -> LossOutput:
    """SPPO with hard probabilities (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P(y_w ≻ π) = 1, P(y_l ≻ π) = 0):
    squared errors pulling each log-ratio to ±1/(2β),

        L = (s(y_w) − 1/(2β))² + (s(y_l) + 1/(2β))²

    (the paper regresses s(y) onto (P(y ≻ π) − ½)/β; the soft probabilities are estimated outside the trainer).

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return (losses, *rewards)


@register("apo_zero")
def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): anchored to reward 0, raise the chosen
    likelihood and lower the rejected one, for chosen outputs better than the model's own,

        L = (1 − σ(r̂_w)) + σ(r̂_l)

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return (losses, *rewards)


@register("apo_down")
def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8): lower both likelihoods, the rejected more,
    for chosen outputs worse than the model's own,

        L = σ(r̂_w) + (1 − σ(r̂_w − r̂_l))

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return (losses, *rewards)
