"""The loss registry and the pieces every loss shares: argument checks, log-ratios with their implicit rewards,
f-divergence scores."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses.implicit import implicit_rewards

LossOutput = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what a trainer must know about it besides its formula."""

    fn: Callable[..., LossOutput]
    needs_reference: bool = True
    """It reads ``ref_chosen_logps``/``ref_rejected_logps``; False: they may be None and no reference is needed."""
    f_divergence: bool = False
    """A loss of the reward margin alone, so it accepts ``f_divergence_type`` and ``f_alpha_divergence_coef``."""
    batch_mean: bool = False
    """One number for the whole batch, spread over the pairs (trl's ``sft``); WPO weighs it by the mean weight."""
    token_inputs: tuple[str, ...] = ()
    """Per-token keyword inputs the trainer must compute for it (e.g. ``rejected_token_logps``)."""


LOSSES: dict[str, Callable[..., LossOutput]] = {}
"""Name -> loss function; :data:`LOSS_SPECS` holds the same losses with their properties."""
LOSS_SPECS: dict[str, LossSpec] = {}
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""trl 1.16's ``DPOConfig.loss_type`` values; each is registered here under that name with trl's formula."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES: set[str] = set()
"""Losses of the reward margin alone, where the f-DPO substitution is valid (filled in by :func:`register`)."""


def register(name: str, *, needs_reference: bool = True, f_divergence: bool = False, batch_mean: bool = False,
             token_inputs: tuple[str, ...] = ()):
    """Add a loss function to :data:`LOSSES` and its :class:`LossSpec` to :data:`LOSS_SPECS` under ``name``."""

    def add(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        LOSS_SPECS[name] = LossSpec(fn, needs_reference, f_divergence, batch_mean, tuple(token_inputs))
        if f_divergence:
            F_DIVERGENCE_LOSSES.add(name)
        return fn

    return add


def needs_reference(name: str) -> bool:
    """True when the registered loss ``name`` reads reference log-probs (a reference must be built for it)."""
    get_loss(name)
    return LOSS_SPECS[name].needs_reference


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The registered loss called ``name``; the error lists the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


@functools.cache
def loss_parameters(name: str) -> frozenset[str]:
    """The keyword names the registered loss ``name`` accepts."""
    return frozenset(inspect.signature(get_loss(name)).parameters)


def logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> tuple[Tensor, Tensor]:
    """log π_θ(y|x) − log π_ref(y|x) of the chosen and the rejected responses, after shape checks. Shape: (B,)."""
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


def need_lengths(loss: str, chosen_lengths, rejected_lengths) -> tuple[Tensor, Tensor]:
    """The response token counts, at least 1; raise naming ``loss`` when they were not passed."""
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"loss {loss!r} normalises by length: pass chosen_lengths and rejected_lengths")
    return chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)


def check_label_smoothing(label_smoothing: float, name: str = "label_smoothing") -> None:
    """Raise unless ε is in [0, 0.5): a label flipped with probability ½ or more carries no preference."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5), got {label_smoothing}")


def logratios_and_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What the losses of each response's own reward start from: the log-ratios s(y_w), s(y_l) of
    :func:`logratios` (with gradient) and the implicit rewards β s(y) that every loss returns (detached,
    :func:`dpolab.rewards.implicit_rewards`). Shape: all (B,) -> four (B,)."""
    chosen, rejected = logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (chosen, rejected, implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
            implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta))


def f_divergence_scores(logratio: Tensor, f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f'(π_θ/π_ref) of f-DPO (Wang et al. 2023, arXiv 2309.16240, Thm. 1), from the log-ratio u = log t.

    With a general f-divergence in place of the reverse KL, the implicit reward becomes β f'(t) and the margin
    β [f'(t_w) − f'(t_l)]:

        reverse_kl        f'(t) = log t + 1            ->  u        (the constant cancels in the margin)
        forward_kl        f'(t) = 1 − 1/t              ->  1 − e^{−u}
        js_divergence     f'(t) = log(2t / (1 + t))    ->  log 2 + log σ(u)
        alpha_divergence  f'(t) = (t^{α−1} − 1)/(α − 1) ->  (e^{(α−1)u} − 1)/(α − 1), u itself at α = 1

    The exponent (α − 1)u is clamped at 80 in float32 (11 in float16), as trl does, so the score stays finite.

    Shape: (B,) -> (B,).
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the limit α → 1 is the reverse KL
            return logratio
        clamp = {torch.float16: 11.0}.get(logratio.dtype, 80.0)
        exponent = ((alpha - 1.0) * logratio).clamp(max=clamp)
        return torch.expm1(exponent) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
