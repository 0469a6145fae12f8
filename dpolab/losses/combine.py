"""Weighted sums of registered losses (trl's ``loss_type`` list with ``loss_weights``), and the two per-pair
reweightings of trl: WPO's weights (``use_weighting``) and LD-DPO's length-desensitised log-probs (``ld_alpha``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dpolab.losses.registry import F_DIVERGENCE_LOSSES, LOSS_SPECS, LossOutput, get_loss, loss_parameters


def combined_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    *,
    loss_type: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    pair_weights: Tensor | None = None,
    mean_pair_weight: float | Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **params: Any,
) -> LossOutput:
    """trl's combined objective, per pair: Σ_k w_k c_i L_k,i (e.g. MPO: sigmoid, bco_pair, sft with 0.8, 0.2, 1).

    Args:
        loss_type: names in :data:`LOSSES`, trl's ``loss_type`` list.
        loss_weights: one weight per name (trl's ``loss_weights``); None weighs each 1.
        pair_weights: c_i, per-pair weights without gradient (WPO, :func:`wpo_weights`); None is 1. A loss that is
            one number for the whole batch (``sft``, marked ``batch_mean``) is weighted by the mean weight c̄ instead,
            as trl does (it scales the batch's token-mean NLL by each pair's weight, then averages).
        mean_pair_weight: c̄ over the *global* batch (exact accumulation); None takes this batch's mean.
        f_divergence_type, f_alpha_divergence_coef: passed to the losses of the margin (and ``sft``, which ignores
            them); a divergence other than the reverse KL with any other loss is an error, as in trl.
        **params: each keyword goes to every loss in ``loss_type`` that takes it (``label_smoothing`` to robust,
            exo_pair, aot and sigmoid's cDPO; ``mean_chosen_length`` to sft; ...); one that none takes is an error.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``; rewards of the first loss in the list.

    Shape: all (B,) -> three (B,) tensors.
    """
    names = list(loss_type)
    if not names:
        raise ValueError("loss_type is empty: name at least one loss")
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} losses in loss_type {names}")
    if f_divergence_type != "reverse_kl":
        unsupported = [n for n in names if n not in F_DIVERGENCE_LOSSES]
        if unsupported:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is defined only for losses of the reward margin "
                             f"{sorted(F_DIVERGENCE_LOSSES)}, not {unsupported}")
    unused = [key for key in params if not any(key in loss_parameters(n) for n in names)]
    if unused:
        raise ValueError(f"no loss in {names} takes the parameter(s) {unused}")
    total, rewards = torch.zeros_like(policy_chosen_logps), None
    for name, weight in zip(names, weights):
        accepted = loss_parameters(name)
        kwargs = {k: v for k, v in params.items() if k in accepted}
        if name in F_DIVERGENCE_LOSSES:
            kwargs.update(f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
        losses, chosen_rewards, rejected_rewards = get_loss(name)(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **kwargs)
        if pair_weights is not None:
            if LOSS_SPECS[name].batch_mean:
                losses = losses * (pair_weights.detach().mean() if mean_pair_weight is None else mean_pair_weight)
            else:
                losses = losses * pair_weights.detach()
        total = total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    return (total, *rewards)


def wpo_weights(chosen_token_logps: Tensor, chosen_log_sum_sq: Tensor, chosen_mask: Tensor,
                rejected_token_logps: Tensor, rejected_log_sum_sq: Tensor, rejected_mask: Tensor) -> Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, arXiv 2406.11827, eq. 2 with trl's aligned normalisation):

        w(y) = exp( (1/|y|) Σ_t [log π_θ(y_t | x, y_<t) − log Σ_v π_θ(v | x, y_<t)²] ),   c = w(y_w) · w(y_l)

    The per-token probability is divided by the probability of a sample from the same distribution matching a
    second sample (Σ_v π²), so a greedy-looking token weighs ~1 whatever the entropy; the weight simulates
    on-policy data from off-policy pairs. No gradient flows through it.

    Args:
        *_token_logps: (B, T) log π_θ of each response token; *_log_sum_sq: (B, T) log Σ_v π_θ(v|·)² at the same
            positions; *_mask: (B, T) 1 on the scored tokens.

    Shape: six (B, T) tensors (T may differ between sides) -> (B,).
    """
    def side(token_logps, log_sum_sq, mask):
        mask = mask.to(token_logps.dtype)
        return ((token_logps - log_sum_sq).detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    return torch.exp(side(chosen_token_logps, chosen_log_sum_sq, chosen_mask)
                     + side(rejected_token_logps, rejected_log_sum_sq, rejected_mask))


def length_desensitised_logps(token_logps: Tensor, mask: Tensor, other_lengths: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's log-probs (Liu et al. 2024, arXiv 2409.06411, eq. 9): the first min(|y_w|, |y_l|) response tokens
    count fully, the verbose tail beyond them with weight α,

        log π̃(y|x) = Σ_{t ≤ l_p} log π(y_t|·) + α Σ_{t > l_p} log π(y_t|·),   l_p = min(|y_w|, |y_l|)

    α = 1 is the plain sum; α = 0 drops the tail. Apply it to the policy and the reference alike.

    Args:
        token_logps: (B, T) log-probs at the positions of ``mask``.
        mask: (B, T) 1 on the scored response tokens (counted in order along T).
        other_lengths: (B,) the scored-token count of the *other* response of each pair.
        ld_alpha: α in [0, 1].

    Shape: (B, T), (B, T), (B,) -> (B,).
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    mask = mask.bool()
    position = mask.long().cumsum(-1)  # 1-based index of each scored token
    shared = torch.minimum(mask.sum(-1), other_lengths.to(position.device))
    weight = torch.where(position <= shared[:, None], 1.0, ld_alpha).to(token_logps.dtype) * mask
    return (token_logps * weight).sum(-1)
