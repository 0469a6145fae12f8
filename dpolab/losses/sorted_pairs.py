"""AOT: distributional alignment by optimal transport, which pairs the batch's sorted margins (trl's ``aot``,
``aot_unpaired``; Melnyk et al. 2024, arXiv 2406.05882).

AOT asks for first-order stochastic dominance of the chosen over the rejected distribution. In one dimension the
optimal transport plan matches order statistics, so the loss compares the k-th smallest of one quantity with the
k-th smallest of the other, over the *whole batch*. That couples the pairs: a micro-batch alone sorts differently.
Here each pair carries its *partners* — the value it faces in the sorted order of the global batch — so the
per-pair losses of any split into micro-batches add up to the loss of the global batch, value and gradient
(:func:`aot_partners` computes them from the global batch's detached values; without them the batch sorts itself,
as trl does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.losses.margin import smoothed_sigmoid_loss
from dpolab.losses.registry import LossOutput, check_label_smoothing, logratios_and_rewards, register


def aot_partners(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """For each element of ``first``, the element of ``second`` with the same rank, and vice versa.

    ``sorted(first)[k]`` faces ``sorted(second)[k]``; the result is aligned with the input order (detached).

    Shape: (N,), (N,) -> (N,), (N,).
    """
    first, second = first.detach(), second.detach()
    order_first, order_second = torch.argsort(first, stable=True), torch.argsort(second, stable=True)
    facing_first = torch.empty_like(second)
    facing_first[order_first] = second[order_second]  # the k-th smallest of first meets the k-th smallest of second
    facing_second = torch.empty_like(first)
    facing_second[order_second] = first[order_first]
    return facing_first, facing_second


def _sorted_smoothed_sigmoid(first: Tensor, second: Tensor, beta: float, label_smoothing: float,
                             partners: tuple[Tensor, Tensor] | None) -> Tensor:
    """Σ_k ℓ(β(first_(k) − second_(k))) spread over the pairs: pair i holds the term of first_i's rank, plus a term of
    value zero that carries the gradient of second_i. ℓ(h) = −(1 − ε) log σ(h) − ε log σ(−h)."""
    check_label_smoothing(label_smoothing)
    facing_first, facing_second = partners if partners is not None else aot_partners(first, second)
    if facing_first.shape != first.shape or facing_second.shape != second.shape:
        raise ValueError(f"aot partners of shapes {tuple(facing_first.shape)}, {tuple(facing_second.shape)} do not "
                         f"match the batch's {tuple(first.shape)}")

    own = smoothed_sigmoid_loss(beta * (first - facing_first), label_smoothing)
    carried = smoothed_sigmoid_loss(beta * (facing_second - second), label_smoothing)
    return own + (carried - carried.detach())


@register("aot")
def aot_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, *, label_smoothing: float = 0.0,
             partners: tuple[Tensor, Tensor] | None = None, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, eq. 9 with the logistic loss): the sorted policy margins
    must dominate the sorted reference margins,

        u = log π_θ(y_w) − log π_θ(y_l),   v = log π_ref(y_w) − log π_ref(y_l),
        L = (1/B) Σ_k [−(1 − ε) log σ(β(u_(k) − v_(k))) − ε log σ(−β(u_(k) − v_(k)))]

    Args:
        label_smoothing: ε in [0, 0.5).
        partners: ``aot_partners(u, v)`` of the global batch, restricted to these pairs (exact accumulation);
            None sorts this batch alone.

    Returns:
        Per-pair losses whose sum is the batch sum of the sorted terms (pair i holds the term of u_i's rank).

    Shape: all (B,) -> three (B,) tensors.
    """
    _, _, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                           ref_rejected_logps, beta)
    u = policy_chosen_logps - policy_rejected_logps
    v = ref_chosen_logps - ref_rejected_logps
    return (_sorted_smoothed_sigmoid(u, v, beta, label_smoothing, partners), *rewards)


@register("aot_unpaired")
def aot_unpaired_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, beta: float = 0.1, *, label_smoothing: float = 0.0,
                      partners: tuple[Tensor, Tensor] | None = None, chosen_lengths: Tensor | None = None,
                      rejected_lengths: Tensor | None = None) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, eq. 8): the sorted chosen log-ratios must dominate the sorted rejected ones,

        L = (1/B) Σ_k [−(1 − ε) log σ(β(s_w,(k) − s_l,(k))) − ε log σ(−β(s_w,(k) − s_l,(k)))]

    with s the log-ratio; chosen and rejected need not come in pairs.

    Args:
        label_smoothing: ε in [0, 0.5).
        partners: ``aot_partners(s_w, s_l)`` of the global batch, restricted to these pairs; None sorts this
            batch alone.

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    return (_sorted_smoothed_sigmoid(chosen, rejected, beta, label_smoothing, partners), *rewards)


def aot_sorted_values(loss: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """The two quantities that ``loss`` ("aot" or "aot_unpaired") sorts, for :func:`aot_partners`. Shape: (B,)."""
    if loss == "aot":
        return policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps
    if loss == "aot_unpaired":
        return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    raise ValueError(f"aot_sorted_values: {loss!r} is not a sorted loss")
