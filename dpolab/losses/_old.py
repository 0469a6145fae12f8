"""The DPO loss family: one pure function per loss, registered by name in :data:`LOSSES`.

Every registered loss takes the four per-sequence log-prob tensors (B,) and keyword parameters::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
       beta=0.1, *, chosen_lengths=None, rejected_lengths=None, **its_own_params)
        -> (losses, chosen_rewards, rejected_rewards)      # all (B,), rewards detached

Log-probs are summed over the response tokens (:func:`dpolab.logprobs.concatenated_forward` with
``average=False``). Throughout, the *log-ratio* of a response is log π_θ(y|x) − log π_ref(y|x), its
implicit reward is r̂(x, y) = β · log-ratio (paper §4 and eq. 5), and

    h = r̂(x, y_w) − r̂(x, y_l) = β [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]

is the reward margin that the sigmoid losses push up. Losses are per example; the trainer averages them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]
LOSSES: dict[str, Callable[..., LossOutput]] = {}


def register(name: str):
    """Add a loss function to :data:`LOSSES` under ``name``."""

    def add(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The registered loss called ``name``; the error lists the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


def _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    if policy_chosen_logps.shape != policy_rejected_logps.shape:
        raise ValueError(
            f"policy_chosen_logps {tuple(policy_chosen_logps.shape)} and policy_rejected_logps "
            f"{tuple(policy_rejected_logps.shape)} must have the same shape (B,)"
        )
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None:
            raise ValueError(f"{name} is None: this loss needs reference log-probs")
        if ref.shape != policy_chosen_logps.shape:
            raise ValueError(f"{name} has shape {tuple(ref.shape)}, expected {tuple(policy_chosen_logps.shape)}")
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _need_lengths(loss: str, chosen_lengths, rejected_lengths) -> tuple[Tensor, Tensor]:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"loss {loss!r} normalises by length: pass chosen_lengths and rejected_lengths")
    return chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)


def _rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register("sigmoid")
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO (paper eq. 7), and conservative DPO when ``label_smoothing`` > 0.

        L = −(1 − ε) log σ(h) − ε log σ(−h)

    ε = 0 is eq. 7, the negative log-likelihood of the preferences under the Bradley–Terry model with the
    implicit reward. ε > 0 (cDPO, Mitchell 2023) assumes each label is flipped with probability ε, so the
    target preference probability is 1 − ε and the loss is minimised at a finite margin h = log((1 − ε)/ε).

    Args:
        beta: β, strength of the KL penalty to the reference (smaller β lets the policy move further).
        label_smoothing: ε in [0, 0.5), the assumed probability that a preference label is wrong.

    Shape: all (B,) -> three (B,) tensors.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return (losses, *_rewards(beta, chosen, rejected))


@register("robust")
def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409): unbiased under labels flipped with prob. ε.

        L = [(1 − ε) ℓ(h) − ε ℓ(−h)] / (1 − 2ε),   ℓ(h) = −log σ(h)

    Its expectation over the noisy label equals the clean sigmoid loss ℓ(h), unlike cDPO which changes
    the target. ε = 0 gives eq. 7.

    Args:
        beta: β of the implicit reward.
        label_smoothing: ε in [0, 0.5), the preference-label flip rate.

    Shape: all (B,) -> three (B,) tensors.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (flip rate) must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    return (losses, *_rewards(beta, chosen, rejected))


@register("ipo")
def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17) on summed log-probs: a squared loss with a target log-ratio margin.

        ρ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)),   L = (ρ − 1/(2β))²

    β plays the role of the paper's τ: the optimum margin is 1/(2β) nats, so no pair is pushed to infinity.
    The margin scales with response length here; :func:`ipo_mean_loss` is the per-token form.

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, chosen, rejected))


@register("ipo_mean")
def ipo_mean_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """IPO with per-token-mean log-ratios (the form trl calls ``ipo``): L = (ρ̄ − 1/(2β))², where

        ρ̄ = (log π_θ(y_w) − log π_ref(y_w)) / |y_w| − (log π_θ(y_l) − log π_ref(y_l)) / |y_l|

    and |y| is the number of scored tokens. Needs ``chosen_lengths`` and ``rejected_lengths``. The rewards
    returned are the usual summed β · log-ratios.

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    n_chosen, n_rejected = _need_lengths("ipo_mean", chosen_lengths, rejected_lengths)
    losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, chosen, rejected))


@register("hinge")
def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Hinge (calibration) loss of SLiC-HF (Zhao et al. 2023, arXiv 2305.10425) on the reference-corrected margin.

        L = max(0, 1 − h) = max(0, 1 − β ρ)

    Equivalently max(0, δ − ρ) / δ with margin δ = 1/β: pairs whose log-ratio margin already exceeds 1/β
    nats contribute no gradient.

    Shape: all (B,) -> three (B,) tensors.
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return (losses, *_rewards(beta, chosen, rejected))


@register("simpo")
def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    *,
    gamma: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Length-normalised sigmoid loss without a reference (SimPO, Meng et al. 2024, eq. 6).

        r̃(y) = β/|y| · log π_θ(y|x),   L = −log σ(r̃(y_w) − r̃(y_l) − γ)

    The reference log-probs are ignored (they may be None). The rewards returned are r̃, the average
    per-token log-likelihood scaled by β (SimPO's implicit reward, eq. 4).

    Args:
        beta: β, the reward scale (SimPO uses 2 to 10, much larger than DPO's).
        gamma: γ, the target reward margin; the paper sets γ/β between 0.3 and 1.6.

    Shape: all (B,) -> three (B,) tensors.
    """
    n_chosen, n_rejected = _need_lengths("simpo", chosen_lengths, rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / n_chosen
    rejected_rewards = beta * policy_rejected_logps / n_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("reference_free")
def reference_free_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO against a uniform reference: L = −log σ(β (log π_θ(y_w) − log π_θ(y_l))).

    A uniform π_ref assigns every response of a given length the same probability, so its terms cancel
    between equal-length responses; the reference log-probs are ignored (they may be None). Rewards are
    β log π_θ(y).

    Shape: all (B,) -> three (B,) tensors.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps))


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each chosen response: −log π_θ(y_w|x) / |y_w|.

    ``policy_chosen_logps`` are summed log-probs. Each sequence counts once whatever its length (trl's
    ``sft`` term instead averages over all tokens of the batch).

    Shape: (B,), (B,) -> (B,).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


def weighted_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    *,
    weights: Mapping[str, float],
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    params: Mapping[str, Mapping[str, float]] | None = None,
) -> LossOutput:
    """A weighted sum of registered losses and the SFT term, per example: Σ_k w_k L_k + w_sft · L_sft.

    Args:
        weights: loss name -> weight, e.g. ``{"sigmoid": 1.0, "sft": 0.1}`` (RPO-style DPO + NLL);
            ``"sft"`` is :func:`sft_loss`, every other name a key of :data:`LOSSES`.
        params: loss name -> its own keyword parameters, e.g. ``{"simpo": {"gamma": 0.5}}``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``; the rewards are those of the first non-SFT loss
        in ``weights`` (β · log-ratio when only SFT is given and reference log-probs exist).

    Shape: all (B,) -> three (B,) tensors.
    """
    if not weights:
        raise ValueError("weights is empty: name at least one loss")
    params = params or {}
    total = torch.zeros_like(policy_chosen_logps)
    rewards = None
    for name, weight in weights.items():
        if name == "sft":
            if chosen_lengths is None:
                raise ValueError("the sft term averages over tokens: pass chosen_lengths")
            total = total + weight * sft_loss(policy_chosen_logps, chosen_lengths)
            continue
        losses, chosen_rewards, rejected_rewards = get_loss(name)(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **params.get(name, {}),
        )
        total = total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    if rewards is None:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            rewards = _rewards(beta, policy_chosen_logps, policy_rejected_logps)
        else:
            rewards = _rewards(
                beta, policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
            )
    return (total, *rewards)
