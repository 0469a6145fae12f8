"""Likelihood terms: trl's per-token SFT (``sft``), the kit's per-sequence SFT (``sft_per_sequence``), and the
Unlikelihood baseline of the DPO paper (``unlikelihood``).

The two SFT forms differ in what they average: trl's ``sft`` is the mean NLL over every chosen *token* of the batch
(a long response weighs more), the kit's is the mean over *sequences* of each sequence's per-token NLL. They agree
when all chosen responses have the same length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses.implicit import implicit_rewards
from dpolab.losses.registry import LossOutput, need_lengths, register


def likelihood_rewards(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
                       ref_rejected_logps: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit rewards the losses without a reference log: β log π_θ/π_ref when both reference log-probs are
    given, else β log π_θ (:func:`dpolab.rewards.implicit_rewards`). Shape: four (B,) or None -> two (B,)."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        ref_chosen_logps = ref_rejected_logps = None
    return (implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
            implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta))


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each chosen response: −log π_θ(y_w|x) / |y_w|.

    ``policy_chosen_logps`` are summed log-probs. Each sequence counts once whatever its length (trl's
    ``sft`` instead averages over all tokens of the batch).

    Shape: (B,), (B,) -> (B,).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


@register("sft", needs_reference=False, f_divergence=True, batch_mean=True)
def sft_token_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                   ref_rejected_logps: Tensor | None = None, beta: float = 0.1, *,
                   chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                   mean_chosen_length: float | Tensor | None = None, unweighted_chosen_logps: Tensor | None = None,
                   f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """trl's ``sft``: the NLL of the chosen responses averaged over all their tokens in the batch (the RPO term,
    Pang et al. 2024, arXiv 2404.19733, eq. 3; the SFT term of MPO),

        L = −Σ_i log π_θ(y_w,i|x_i) / Σ_i |y_w,i|,   per pair  L_i = −log π_θ(y_w,i|x_i) / n̄

    where n̄ is the mean chosen length, so that the mean of the per-pair losses is L. For exact gradient
    accumulation n̄ must be the mean over the *global* batch (``mean_chosen_length``); by default it is this
    batch's, which is trl's value for one batch. The reference and the f-divergence play no part.

    Args:
        mean_chosen_length: n̄ of the global batch (tokens of the chosen responses / pairs).
        unweighted_chosen_logps: the plain sums log π_θ(y_w|x) when ``policy_chosen_logps`` are reweighted for the
            other losses (LD-DPO); trl's NLL always uses the plain per-token log-probs.

    Shape: all (B,) -> three (B,) tensors.
    """
    need_lengths("sft", chosen_lengths, chosen_lengths)
    if mean_chosen_length is None:
        mean_chosen_length = chosen_lengths.to(policy_chosen_logps.dtype).sum().clamp(min=1) / chosen_lengths.numel()
    nll_logps = policy_chosen_logps if unweighted_chosen_logps is None else unweighted_chosen_logps
    losses = -nll_logps / mean_chosen_length
    return (losses, *likelihood_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta))


@register("sft_per_sequence", needs_reference=False)
def sft_per_sequence_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                          ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                          beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                          rejected_lengths: Tensor | None = None) -> LossOutput:
    """The kit's SFT term (and its SFT stage): each chosen response's per-token NLL, L_i = −log π_θ(y_w,i|x_i)/|y_w,i|.

    Every sequence counts once whatever its length (see :func:`sft_loss`); trl's ``sft`` weighs tokens instead.

    Shape: all (B,) -> three (B,) tensors.
    """
    n_chosen, _ = need_lengths("sft_per_sequence", chosen_lengths, chosen_lengths)
    losses = sft_loss(policy_chosen_logps, n_chosen)
    return (losses, *likelihood_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta))


@register("unlikelihood", needs_reference=False,
          token_inputs=("rejected_token_logps", "rejected_token_mask"))
def unlikelihood_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                           ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                           beta: float = 0.1, *, rejected_token_logps: Tensor | None = None,
                           rejected_token_mask: Tensor | None = None, unlikelihood_alpha: float = 1.0,
                           chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> LossOutput:
    """Unlikelihood training (Welleck et al. 2019, arXiv 1908.04319), the DPO paper's baseline (§6.1): likelihood on
    the chosen response, *unlikelihood* on every token of the rejected one,

        L = −log π_θ(y_w|x)/|y_w| − α · (1/|y_l|) Σ_t log(1 − π_θ(y_l,t | x, y_l,<t))

    The second term needs per-token probabilities, not a sum: pass ``rejected_token_logps`` and
    ``rejected_token_mask`` (the trainer does: they are this loss's ``token_inputs`` in
    :data:`~dpolab.losses.registry.LOSS_SPECS`). No reference is used.

    Args:
        rejected_token_logps: (B, T) log π_θ of each rejected-response token, any value where the mask is 0.
        rejected_token_mask: (B, T) 1 on the tokens that count.
        unlikelihood_alpha: α, the weight of the unlikelihood term (1 in Welleck et al.).

    Shape: (B,) sums and (B, T) token tensors -> three (B,) tensors.
    """
    if rejected_token_logps is None or rejected_token_mask is None:
        raise ValueError("loss 'unlikelihood' needs per-token log-probs: pass rejected_token_logps and "
                         "rejected_token_mask")
    n_chosen, _ = need_lengths("unlikelihood", chosen_lengths, chosen_lengths)
    mask = rejected_token_mask.to(rejected_token_logps.dtype)
    # log(1 − p) = log(−expm1(log p)) is exact for small p; log p is capped just below 0 so that p = 1 stays finite
    log_one_minus = torch.log(-torch.expm1(rejected_token_logps.clamp(max=-1e-6)))
    unlikely = -(log_one_minus * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    losses = sft_loss(policy_chosen_logps, n_chosen) + unlikelihood_alpha * unlikely
    return (losses, *likelihood_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta))

