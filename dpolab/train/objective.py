"""The training objective on one batch of pairs, and the metric sums that travel with it.

SFT (the paper's first stage) minimises the per-token NLL of the chosen responses; DPO minimises a registered
loss of the policy and reference log-probs (paper Eq. 7 for "sigmoid"), or trl's weighted list of losses
(``loss_type``, ``loss_weights``), with trl's options: WPO weights (``use_weighting``), LD-DPO log-probs
(``ld_alpha``) and f-divergences; optionally plus ``sft_weight`` times the kit's per-sequence NLL. Both return
*per-pair* losses: the trainer sums them and divides by the number of pairs of the whole global batch, so k
micro-batches of b pairs give the same gradient as one batch of k·b pairs (exact accumulation).

A few losses are not sums of per-pair terms: trl's ``sft`` averages over the tokens of the batch, AOT sorts the
batch, and under WPO the ``sft`` term is scaled by the batch's mean weight. For them :func:`global_contexts`
computes the global batch's numbers first (token counts from the labels; sorted values and weights from a
forward pass without gradient) and hands each micro-batch its share, so accumulation stays exact for every loss.

Metrics are kept as sums over pairs (:data:`STATS`), which add across micro-batches and processes and
are divided by the pair count only when logged; trl's ``logits/chosen``, ``logits/rejected`` (the mean logit over
the vocabulary) and ``entropy`` (of π) are sums over response tokens, divided by the token count, as trl does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dpolab.data.batch import IGNORE_INDEX, PairBatch, SequenceBatch
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths
from dpolab.logprobs import concatenated_forward, sequence_forward, shift_labels
from dpolab.losses import (
    LOSS_SPECS,
    SORTED_LOSSES,
    aot_partners,
    aot_sorted_values,
    combined_loss,
    length_desensitised_logps,
    loss_parameters,
    sft_loss,
    wpo_weights,
)
from dpolab.train.token_scores import token_scores

if TYPE_CHECKING:
    from dpolab.train.config import TrainConfig
    from dpolab.train.reference import Reference

# Sums over pairs (plus counts, and sums over response tokens) that one batch contributes to a step's metrics.
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "lengths/chosen", "lengths/rejected", "pairs", "tokens", "nonfinite", "logits/chosen",
         "logits/rejected", "entropy")
_PAIR_MEANS = STATS[:9]
_SFT_STATS = ("loss", "logps/chosen", "lengths/chosen")
# token sums -> the token counts (sums of response lengths) they are divided by (trl: chosen, rejected, both sides)
_TOKEN_MEANS = {"logits/chosen": ("lengths/chosen",), "logits/rejected": ("lengths/rejected",),
                "entropy": ("lengths/chosen", "lengths/rejected")}


@dataclass(frozen=True)
class Objective:
    """What a batch's loss is: built once from the config (:meth:`from_config`) and passed down to the loss.

    The names are the :class:`~dpolab.train.config.TrainConfig` fields it comes from (trl's where trl has them),
    except that ``losses`` and ``weights`` are the resolved list of losses: trl's ``loss_type`` and
    ``loss_weights``, or the single ``loss`` with no weights.
    """

    stage: str = "dpo"
    """``"sft"`` (the per-token NLL of the chosen responses) or ``"dpo"`` (the losses below)."""
    losses: tuple[str, ...] = ("sigmoid",)
    """Names in :data:`dpolab.losses.LOSSES`; several are added with ``weights``."""
    weights: tuple[float, ...] | None = None
    """One weight per loss, or None for weight 1 each."""
    beta: float = 0.1
    """β of every loss (paper Eq. 7)."""
    loss_params: Mapping[str, Any] = field(default_factory=dict)
    """The losses' own keyword arguments (``label_smoothing``, ``delta``, ...); held read-only."""
    sft_weight: float = 0.0
    """Weight of the kit's per-sequence NLL of the chosen responses added to the loss."""
    use_weighting: bool = False
    """trl's WPO: each pair's loss weighted by its (length-normalised) probability under the policy."""
    ld_alpha: float | None = None
    """trl's LD-DPO: the weight of the log-probs of the tokens past the shorter response's length."""
    f_divergence_type: str = "reverse_kl"
    """trl's f-DPO: the divergence whose derivative replaces the log-ratio."""
    f_alpha_divergence_coef: float = 0.5
    """α of ``f_divergence_type="alpha_divergence"``."""

    def __post_init__(self):
        object.__setattr__(self, "losses", tuple(self.losses))
        object.__setattr__(self, "weights", tuple(self.weights) if self.weights else None)
        object.__setattr__(self, "loss_params", MappingProxyType(dict(self.loss_params or {})))

    @classmethod
    def from_config(cls, config: TrainConfig) -> Objective:
        """The objective that ``config`` (a validated TrainConfig) asks for."""
        return cls(stage=config.stage, losses=tuple(config.loss_type) or (config.loss,),
                   weights=tuple(config.loss_weights) or None, beta=config.beta, loss_params=config.loss_params,
                   sft_weight=config.sft_weight, use_weighting=config.use_weighting, ld_alpha=config.ld_alpha,
                   f_divergence_type=config.f_divergence_type,
                   f_alpha_divergence_coef=config.f_alpha_divergence_coef)


def chosen_rows(batch: PairBatch) -> SequenceBatch:
    """The prompt+chosen rows of a pair batch, trimmed to their own longest length. Shape: (2B, T) -> (B, T')."""
    b = batch.num_pairs
    width = int(batch.attention_mask[:b].sum(-1).max())
    return SequenceBatch(batch.input_ids[:b, :width], batch.attention_mask[:b, :width], batch.labels[:b, :width])


def _needs_tokens(objective: Objective) -> bool:
    return (objective.use_weighting or objective.ld_alpha is not None
            or any(LOSS_SPECS[n].token_inputs for n in objective.losses))


def _pair_inputs(model, reference: Reference | None, batch: PairBatch, objective: Objective, *,
                 fast: FastPaths = DEFAULT_FAST_PATHS, with_stats: bool = False):
    """Policy and reference log-probs (2B,) as the losses see them, response lengths (2B,), WPO pair weights (B,)
    or None, and the extra per-pair inputs some losses take (unweighted NLL log-probs, rejected-token log-probs);
    with ``with_stats`` the extras hold the policy's ``logit_stats`` (2B, 2) (:class:`dpolab.logprobs.PairLogps`)."""
    b, use_weighting, ld_alpha = batch.num_pairs, objective.use_weighting, objective.ld_alpha
    extra = {}
    if not _needs_tokens(objective):
        policy = concatenated_forward(model, batch, fast=fast, with_stats=with_stats)
        logps = torch.cat([policy.chosen, policy.rejected])
        lengths = torch.cat([policy.chosen_lengths, policy.rejected_lengths])
        ref = reference.pair_logps(batch) if reference is not None else None
        ref_logps = None if ref is None else torch.cat([ref.chosen, ref.rejected])
        if with_stats:
            extra["logit_stats"] = policy.logit_stats
        return logps, ref_logps, lengths, None, extra
    scores = token_scores(model, batch, sum_sq=use_weighting, with_stats=with_stats)
    if with_stats:
        extra["logit_stats"] = scores.logit_stats
    lengths, logps = scores.lengths, scores.sums
    ref_logps = None
    if ld_alpha is not None:
        other = torch.cat([lengths[b:], lengths[:b]])
        extra["unweighted_chosen_logps"] = logps[:b]
        logps = length_desensitised_logps(scores.logps, scores.mask, other, ld_alpha)
        if reference is not None:
            if getattr(reference, "token_logps", None) is None:
                raise ValueError("ld_alpha needs per-token reference log-probs: use reference 'copy' or 'adapter' "
                                 "(a precomputed reference holds sums only)")
            ref_tokens = reference.token_logps(batch)
            ref_logps = length_desensitised_logps(ref_tokens, scores.mask, other, ld_alpha)
    elif reference is not None:
        ref = reference.pair_logps(batch)
        ref_logps = torch.cat([ref.chosen, ref.rejected])
    weights = None
    if use_weighting:
        weights = wpo_weights(scores.logps[:b], scores.log_sum_sq[:b], scores.mask[:b], scores.logps[b:],
                              scores.log_sum_sq[b:], scores.mask[b:])
    extra["rejected_token_logps"], extra["rejected_token_mask"] = scores.logps[b:], scores.mask[b:]
    return logps, ref_logps, lengths, weights, extra


def batch_objective(model, reference: Reference | None, batch: PairBatch, objective: Objective, *,
                    context: dict | None = None, fast: FastPaths = DEFAULT_FAST_PATHS,
                    with_stats: bool = True) -> tuple[Tensor, Tensor]:
    """Per-pair losses (with grad) and the batch's metric sums.

    Args:
        model: the policy (possibly wrapped in DDP).
        reference: π_ref (:class:`dpolab.train.reference.Reference`), or None for a reference-free loss (and for
            SFT).
        batch: B pairs.
        objective: the stage, losses, β and loss parameters (:class:`Objective`).
        context: this micro-batch's share of the global batch (:func:`global_contexts`); None treats the batch
            as the whole global batch.
        fast: the speed paths of the policy's forward (:class:`dpolab.fast.paths.FastPaths`); the reference
            object has its own.
        with_stats: also measure the policy's mean logit and entropy (``logits/*``, ``entropy``: one more pass
            over the (2B, T, V) logits); without, their sums are NaN and :func:`mean_metrics` leaves them out.
            The loss and its gradient are the same either way.

    Returns:
        ``(losses, sums)``: losses (B,) and a float64 vector aligned with :data:`STATS`.
    """
    sums = dict.fromkeys(STATS, 0.0)
    sums["pairs"] = float(batch.num_pairs)
    if objective.stage == "sft":
        seq = chosen_rows(batch)
        logps, lengths = sequence_forward(model, seq, fast=fast)
        losses = sft_loss(logps, lengths)
        sums["tokens"] = float(seq.num_tokens)
        for name, value in zip(_SFT_STATS, (losses, logps, lengths)):
            sums[name] = float(value.detach().double().sum())
    else:
        names = list(objective.losses)
        b = batch.num_pairs
        logps, ref_logps, lengths, weights, extra = _pair_inputs(model, reference, batch, objective, fast=fast,
                                                                 with_stats=with_stats)
        stats = extra.pop("logit_stats").double() if with_stats else None
        params = {**objective.loss_params, **(context or {})}
        params.update({k: v for k, v in extra.items()
                       if any(k in loss_parameters(n) for n in names)})
        losses, chosen_rewards, rejected_rewards = combined_loss(
            logps[:b], logps[b:], None if ref_logps is None else ref_logps[:b],
            None if ref_logps is None else ref_logps[b:], objective.beta, loss_type=names,
            loss_weights=list(objective.weights) if objective.weights else None, pair_weights=weights,
            f_divergence_type=objective.f_divergence_type, f_alpha_divergence_coef=objective.f_alpha_divergence_coef,
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **params)
        if objective.sft_weight:
            losses = losses + objective.sft_weight * sft_loss(extra.get("unweighted_chosen_logps", logps[:b]),
                                                              lengths[:b])
        margins = chosen_rewards - rejected_rewards
        sums["tokens"] = float(batch.num_tokens)
        values = {
            "loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).double() + 0.5 * (margins == 0).double(),  # ties ½, as rewards.py
            "logps/chosen": logps[:b], "logps/rejected": logps[b:],
            "lengths/chosen": lengths[:b], "lengths/rejected": lengths[b:],
        }
        for name, value in values.items():
            sums[name] = float(value.detach().double().sum())
        if stats is None:  # not measured at this step (logged only every logging_steps)
            sums["logits/chosen"] = sums["logits/rejected"] = sums["entropy"] = math.nan
        else:
            sums["logits/chosen"], sums["logits/rejected"] = stats[:b, 0].sum().item(), stats[b:, 0].sum().item()
            sums["entropy"] = stats[:, 1].sum().item()
    sums["nonfinite"] = float(not bool(torch.isfinite(losses.detach()).all()))
    return losses, torch.tensor([sums[name] for name in STATS], dtype=torch.float64)


def global_contexts(model, reference: Reference | None, batches: list[PairBatch], objective: Objective, *,
                    fast: FastPaths = DEFAULT_FAST_PATHS) -> list[dict]:
    """Each micro-batch's share of the global batch's numbers, for the losses that are not per-pair sums.

    - ``sft`` (trl's): ``mean_chosen_length``, chosen tokens / pairs of the global batch (from the labels);
    - ``aot``/``aot_unpaired``: ``partners``, the values each pair faces in the global batch's sorted order;
    - ``sft`` under WPO: ``mean_pair_weight``, the global batch's mean WPO weight.

    The last two need the policy's log-probs first: one forward pass without gradient over every micro-batch.
    Under torch.distributed the numbers are gathered from every process (the global batch spans them).

    Returns:
        One dict per micro-batch (empty when nothing is needed), the ``context`` of :func:`batch_objective`.
    """
    contexts = [{} for _ in batches]
    if objective.stage != "dpo" or not batches:
        return contexts
    names = list(objective.losses)
    if "sft" in names:
        counts = torch.tensor([[float((shift_labels(b.labels[: b.num_pairs]) != IGNORE_INDEX).sum()),
                                float(b.num_pairs)] for b in batches], dtype=torch.float64).sum(0)
        tokens, pairs = _all_sum(counts).tolist()
        for c in contexts:
            c["mean_chosen_length"] = max(tokens, 1.0) / pairs
    sorted_names = [n for n in names if n in SORTED_LOSSES]
    if len(sorted_names) > 1:
        raise ValueError(f"at most one sorted loss per objective, got {sorted_names}")
    mean_weight = objective.use_weighting and any(LOSS_SPECS[n].batch_mean for n in names)
    if not (sorted_names or mean_weight):
        return contexts
    firsts, seconds, weights = [], [], []
    with torch.no_grad():
        for batch in batches:
            logps, ref_logps, _, pair_weights, _ = _pair_inputs(model, reference, batch, objective, fast=fast)
            b = batch.num_pairs
            if sorted_names:
                first, second = aot_sorted_values(sorted_names[0], logps[:b], logps[b:], ref_logps[:b], ref_logps[b:])
                firsts.append(first)
                seconds.append(second)
            if mean_weight:
                weights.append(pair_weights)
    if mean_weight:
        local = torch.cat(weights).double()
        total, count = _all_sum(torch.stack([local.sum(), torch.tensor(float(len(local)), dtype=torch.float64)]))
        for c in contexts:
            c["mean_pair_weight"] = float(total / count)
    if sorted_names:
        first_all, offset = _all_gather(torch.cat(firsts))
        second_all, _ = _all_gather(torch.cat(seconds))
        facing_first, facing_second = aot_partners(first_all, second_all)
        for c, batch in zip(contexts, batches):
            end = offset + batch.num_pairs
            c["partners"] = (facing_first[offset:end], facing_second[offset:end])
            offset = end
    return contexts


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _all_sum(values: Tensor) -> Tensor:
    if _distributed():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def _all_gather(values: Tensor) -> tuple[Tensor, int]:
    """Every process's values in rank order, and where this process's start."""
    if not _distributed():
        return values, 0
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values.cpu())
    offset = sum(len(p) for p in parts[: torch.distributed.get_rank()])
    return torch.cat(parts).to(values.device), offset


def mean_metrics(totals: Tensor, stage: str, prefix: str = "") -> dict[str, float]:
    """Divide reduced sums by the pair count (the token sums by their token count); the metric names of the stage
    (SFT logs no rewards, logits or entropy; a step that did not measure the logits and entropy, whose sums are
    NaN, leaves them out)."""
    sums = dict(zip(STATS, totals.tolist()))
    pairs = max(sums["pairs"], 1.0)
    if stage == "sft":
        return {prefix + name: sums[name] / pairs for name in _SFT_STATS}
    means = {prefix + name: sums[name] / pairs for name in _PAIR_MEANS if not math.isnan(sums[name])}
    for name, counts in _TOKEN_MEANS.items():
        if not math.isnan(sums[name]):
            means[prefix + name] = sums[name] / max(sum(sums[c] for c in counts), 1.0)
    return means
