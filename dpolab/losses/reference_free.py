"""Losses without a reference model: SimPO and the sigmoid loss against a uniform reference (the kit's own names)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpolab.losses.implicit import implicit_rewards
from dpolab.losses.registry import LossOutput, need_lengths, register


@register("simpo", needs_reference=False)
def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
               ref_rejected_logps: Tensor | None = None, beta: float = 0.1, *, gamma: float = 0.0,
               chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossOutput:
    """Length-normalised sigmoid loss without a reference (SimPO, Meng et al. 2024, arXiv 2405.14734, eq. 6).

        r̃(y) = β/|y| · log π_θ(y|x),   L = −log σ(r̃(y_w) − r̃(y_l) − γ)

    The reference log-probs are ignored (they may be None). The rewards returned are r̃, the average
    per-token log-likelihood scaled by β (SimPO's implicit reward, eq. 4).

    Args:
        beta: β, the reward scale (SimPO uses 2 to 10, much larger than DPO's).
        gamma: γ, the target reward margin; the paper sets γ/β between 0.3 and 1.6.

    Shape: all (B,) -> three (B,) tensors.
    """
    n_chosen, n_rejected = need_lengths("simpo", chosen_lengths, rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / n_chosen
    rejected_rewards = beta * policy_rejected_logps / n_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("reference_free", needs_reference=False)
def reference_free_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                        ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                        beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                        rejected_lengths: Tensor | None = None) -> LossOutput:
    """Sigmoid DPO against a uniform reference: L = −log σ(β (log π_θ(y_w) − log π_θ(y_l))).

    A uniform π_ref assigns every response of a given length the same probability, so its terms cancel
    between equal-length responses; the reference log-probs are ignored (they may be None). Rewards are
    β log π_θ(y).

    Shape: all (B,) -> three (B,) tensors.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return (losses, implicit_rewards(policy_chosen_logps, None, beta),
            implicit_rewards(policy_rejected_logps, None, beta))
