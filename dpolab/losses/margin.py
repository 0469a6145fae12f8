"""Losses of the reward margin: sigmoid (DPO, cDPO), robust, hinge, IPO, EXO, DiscoPOP, length-normalised sigmoid.

Each is a function of one number per pair, the margin

    Δ = s(y_w) − s(y_l),   s(y) = log π_θ(y|x) − log π_ref(y|x)   (the log-ratio; paper eq. 5 without β),

or, with ``f_divergence_type`` other than the reverse KL, s(y) = f'(π_θ/π_ref) of f-DPO
(:func:`dpolab.losses.registry.f_divergence_scores`). The names and formulas are trl 1.16's, except
``ipo_sum`` (the kit's IPO on summed log-ratios). h = βΔ is the reward margin the sigmoid losses push up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses.registry import (
    LossOutput,
    check_label_smoothing,
    f_divergence_scores,
    logratios_and_rewards,
    need_lengths,
    register,
)


def reward_margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float, f_divergence_type: str = "reverse_kl",
                  f_alpha_divergence_coef: float = 0.5, *,
                  lengths: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The margin every loss of this module is a function of, and the implicit rewards it logs:

        Δ = s(y_w) − s(y_l),   or with ``lengths`` the per-token  Δ̄ = s(y_w)/|y_w| − s(y_l)/|y_l|,

    with s = f'(π_θ/π_ref) of :func:`~dpolab.losses.registry.f_divergence_scores` (the log-ratio for the reverse KL).
    The rewards are β · log-ratio, detached, whatever the divergence
    (:func:`~dpolab.losses.registry.logratios_and_rewards`).

    Shape: all (B,) -> (margin, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen, rejected, *rewards = logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                       ref_rejected_logps, beta)
    score_w = f_divergence_scores(chosen, f_divergence_type, f_alpha_divergence_coef)
    score_l = f_divergence_scores(rejected, f_divergence_type, f_alpha_divergence_coef)
    margin = score_w - score_l if lengths is None else score_w / lengths[0] - score_l / lengths[1]
    return (margin, *rewards)


def smoothed_sigmoid_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """ℓ_ε(h) = −(1 − ε) log σ(h) − ε log σ(−h): the Bradley–Terry NLL of a label flipped with probability ε
    (cDPO); ε = 0 is −log σ(h). Shape: any -> the same."""
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


@register("sigmoid", f_divergence=True)
def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0, *,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), and conservative DPO when ``label_smoothing`` > 0.

        L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)

    ε = 0 is eq. 7 and trl's ``sigmoid``: the negative log-likelihood of the preferences under Bradley–Terry with
    the implicit reward. ε > 0 (cDPO, Mitchell 2023) assumes each label is flipped with probability ε, so the
    target preference probability is 1 − ε and the loss is minimised at the finite margin βΔ = log((1 − ε)/ε).
    (trl 1.16's ``sigmoid`` ignores ``label_smoothing``; it is the kit's cDPO switch.)

    Args:
        beta: β, strength of the KL penalty to the reference (smaller β lets the policy move further).
        label_smoothing: ε in [0, 0.5), the assumed probability that a preference label is wrong.
        f_divergence_type, f_alpha_divergence_coef: the divergence to the reference (f-DPO); default reverse KL.

    Shape: all (B,) -> three (B,) tensors.
    """
    check_label_smoothing(label_smoothing)
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef)
    return (smoothed_sigmoid_loss(beta * margin, label_smoothing), *rewards)


@register("robust", f_divergence=True)
def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, beta: float = 0.1, *, label_smoothing: float = 0.0,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409, eq. 8): unbiased under labels flipped w.p. ε.

        L = [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)

    Its expectation over the noisy label equals the clean sigmoid loss, unlike cDPO which changes the target.
    ε = 0 gives eq. 7.

    Args:
        label_smoothing: ε in [0, 0.5), the preference-label flip rate.

    Shape: all (B,) -> three (B,) tensors.
    """
    check_label_smoothing(label_smoothing, "label_smoothing (flip rate)")
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef)
    h, eps = beta * margin, label_smoothing
    return ((-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps), *rewards)


@register("hinge", f_divergence=True)
def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
               rejected_lengths: Tensor | None = None, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Hinge (calibration) loss of SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, eq. 1) on the reference-corrected
    margin: L = max(0, 1 − βΔ).

    Equivalently max(0, δ − Δ)/δ with margin δ = 1/β: pairs whose log-ratio margin already exceeds 1/β nats
    contribute no gradient.

    Shape: all (B,) -> three (B,) tensors.
    """
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef)
    return (torch.relu(1 - beta * margin), *rewards)


@register("ipo", f_divergence=True)
def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17) on per-token-mean log-ratios, as trl's ``ipo``:

        Δ̄ = s(y_w)/|y_w| − s(y_l)/|y_l|,   L = (Δ̄ − 1/(2β))²

    |y| is the number of scored tokens. β is the paper's τ: the optimum per-token margin is 1/(2β) nats, so no
    pair is pushed to infinity. trl normalises by length (confirmed with the IPO authors); the summed form is
    :func:`ipo_sum_loss`. Needs ``chosen_lengths`` and ``rejected_lengths``; rewards are β · summed log-ratio.

    Shape: all (B,) -> three (B,) tensors.
    """
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef,
                                     lengths=need_lengths("ipo", chosen_lengths, rejected_lengths))
    return ((margin - 1 / (2 * beta)) ** 2, *rewards)


@register("ipo_sum")
def ipo_sum_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                 rejected_lengths: Tensor | None = None) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17) on *summed* log-ratios, the kit's own variant: L = (Δ − 1/(2β))².

    The target margin 1/(2β) is then per response, not per token, so the loss depends on length. A difference
    of sums, it is unchanged by tokens the two responses share (multi-turn history); trl's ``ipo`` is not.

    Shape: all (B,) -> three (B,) tensors.
    """
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta)
    return ((margin - 1 / (2 * beta)) ** 2, *rewards)


@register("sigmoid_norm", f_divergence=True)
def sigmoid_norm_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, beta: float = 0.1, *, chosen_lengths: Tensor | None = None,
                      rejected_lengths: Tensor | None = None, f_divergence_type: str = "reverse_kl",
                      f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """Length-normalised sigmoid DPO (trl's ``sigmoid_norm``; the length-normalised DPO of Tülu 3, Lambert et al.
    2024, arXiv 2411.15124, §5): L = −log σ(β Δ̄),  Δ̄ = s(y_w)/|y_w| − s(y_l)/|y_l|.

    Needs ``chosen_lengths`` and ``rejected_lengths``; rewards are β · summed log-ratio.

    Shape: all (B,) -> three (B,) tensors.
    """
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef,
                                     lengths=need_lengths("sigmoid_norm", chosen_lengths, rejected_lengths))
    return (-F.logsigmoid(beta * margin), *rewards)


@register("exo_pair", f_divergence=True)
def exo_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, label_smoothing: float = 1e-3,
                  chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, eq. 16): the reverse KL from the policy's preference
    distribution to the smoothed label distribution (1 − ε, ε) over {y_w, y_l}:

        q_w = σ(βΔ), q_l = σ(−βΔ),   L = q_w [log q_w − log(1 − ε)] + q_l [log q_l − log ε]

    Mode-seeking where DPO's forward KL is mean-seeking; minimised at βΔ = log((1 − ε)/ε).

    Args:
        label_smoothing: ε in (0, 0.5); must be > 0 (trl raises too). The paper recommends 1e-3.

    Shape: all (B,) -> three (B,) tensors.
    """
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 0.5) (the paper uses 1e-3), got {label_smoothing}")
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef)
    h, eps = beta * margin, label_smoothing
    losses = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
              + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))
    return (losses, *rewards)


@register("discopop", f_divergence=True)
def discopop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, *, discopop_tau: float = 0.05,
                  chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss found by LLM-driven search (Lu et al. 2024, arXiv 2406.08414,
    eq. 5): a blend of the logistic and the exponential loss, weighted by the margin itself,

        h = βΔ,   m = σ(h/τ),   L = (1 − m) · (−log σ(h)) + m · e^{−h}

    Args:
        discopop_tau: τ, the temperature of the blend (the paper's default 0.05).

    Shape: all (B,) -> three (B,) tensors.
    """
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    margin, *rewards = reward_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     beta, f_divergence_type, f_alpha_divergence_coef)
    h = beta * margin
    m = torch.sigmoid(h / discopop_tau)
    return ((1 - m) * -F.logsigmoid(h) + m * torch.exp(-h), *rewards)
