"""Per-sequence log-probabilities of response tokens: log π(y|x) = Σ_t log π(y_t | x, y_<t).

Every quantity in the DPO objective (paper eq. 7) is a difference of these sums, so they are computed once here,
in float32 whatever the model's dtype, as ``logit[label] - logsumexp(logits)``, never through a ``(B, T, V)``
log-softmax copy (:mod:`dpolab.fast.label_logprob`).

:func:`sequence_forward` and :func:`concatenated_forward` run a model and return these sums. The readable path,
and the slow reference of every speed path, is the model's logits at every position followed by
:func:`sequence_logprobs`. By default the forwards take the speed paths of :mod:`dpolab.fast` where the model
allows them: logits only at the scored positions, the fused output layer, the sparse lookup of a tied embedding,
and each pair as one tree-masked row, the prompt once. ``fast=FastPaths.off()`` runs the reference path; the tests
hold every path equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.data.labels import IGNORE_INDEX
from dpolab.fast.embedding import token_inputs
from dpolab.fast.label_logprob import label_logprobs
from dpolab.fast.logit_stats import logit_stats
from dpolab.fast.output_layer import scored_logprobs
from dpolab.fast.pairtree import pair_tree, tree_forward
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, ModelPaths, model_paths


def check_labels(labels: Tensor, vocab_size: int, what: str = "labels") -> None:
    """Raise naming the row and position of the first label that is neither -100 nor a vocabulary id."""
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        value = labels[tuple(where)].item()
        place = ", ".join(f"{axis} {i}" for axis, i in zip(("row", "position"), where)) if len(where) <= 2 else where
        raise ValueError(f"batch {place}, field {what}: token id {value} is neither -100 nor in [0, {vocab_size})")


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] at every position, 0 where the label is -100 (no shift here).

    Computed in float32 (float64 if the logits are), whatever the logits' dtype.

    Shape: logits (..., V), labels (...) -> (...).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on positions")
    check_labels(labels, logits.size(-1))
    return _token_logprobs(logits, labels)


def _token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    scored = label_logprobs(logits.reshape(-1, logits.size(-1)), rows, flat_labels[rows])
    return scored.new_zeros(flat_labels.shape).index_put((rows,), scored).view(labels.shape)


def shift_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the logits that predict them: position t holds label t+1, the last is -100.

    Shape: (B, T) -> (B, T).
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def sequence_logprobs(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Σ_t log π(y_t | x, y_<t) over the response tokens of each row (or the per-token mean if ``average``).

    ``labels`` are the input ids with -100 on every position not scored (prompt, padding, masked turns);
    the logits at position t score the label at t+1 (the shift happens here). A label in column 0 is
    never scored, as in transformers' loss. Always float32 (float64 for float64 logits).

    Shape: logits (B, T, V), labels (B, T) -> (B,).
    """
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on positions")
    check_labels(labels, logits.size(-1))
    shifted = shift_labels(labels)
    total = _token_logprobs(logits, shifted).sum(-1)
    if average:
        total = total / (shifted != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, chosen and rejected side by side.

    Attributes:
        chosen: (B,) summed (or averaged) log π(y_w|x), with grad if the model trains.
        rejected: (B,) the same for y_l.
        chosen_lengths: (B,) number of scored tokens of each chosen response.
        rejected_lengths: (B,) the same for the rejected responses.
        logit_stats: (2B, 2), chosen rows first, when asked for (``with_stats``): Σ over each response's scored
            tokens of the mean logit over the vocabulary and of the entropy of π
            (:func:`dpolab.fast.logit_stats.logit_stats`), without grad; else None.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    logit_stats: Tensor | None = None

    def detach(self) -> PairLogps:
        """A copy without autograd history (for reference log-probs and caches)."""
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_lengths, self.rejected_lengths,
                         self.logit_stats)


def sequence_forward(model, batch, average: bool = False, *,
                     fast: FastPaths = DEFAULT_FAST_PATHS) -> tuple[Tensor, Tensor]:
    """Run ``model`` once on ``batch`` and return each row's response log-prob and scored-token count.

    Args:
        model: a causal LM (transformers, optionally wrapped by PEFT or DDP).
        batch: anything with ``input_ids``, ``attention_mask`` and ``labels`` (N, T), e.g. a
            :class:`dpolab.data.batch.SequenceBatch`.
        average: return the per-token mean instead of the sum.
        fast: the speed paths to take (:class:`dpolab.fast.paths.FastPaths`; ``FastPaths.off()`` is the slow
            reference: logits at every position).

    Returns:
        ``(logps, lengths)``, both (N,); logps in float32 with grad if the model trains.
    """
    logps, lengths, _ = _forward(model, batch, model_paths(model, fast), average, pairs=False)
    return logps, lengths


def concatenated_forward(model, batch, average: bool = False, *, fast: FastPaths = DEFAULT_FAST_PATHS,
                         with_stats: bool = False) -> PairLogps:
    """Log-probs of the chosen and the rejected responses of a :class:`dpolab.data.batch.PairBatch`, in one call.

    Rows 0..B-1 of the batch are prompt + chosen, rows B..2B-1 prompt + rejected. With ``fast.pair_tree`` a model
    that supports it runs each pair as one row, prompt once and the two responses as tree-masked branches
    (:mod:`dpolab.fast.pairtree`): the same log-probs with fewer positions to compute. Otherwise the 2B rows run
    as one padded batch, as in :func:`sequence_forward`. ``with_stats`` adds ``PairLogps.logit_stats`` from the logits
    the path computes anyway (trl's ``logits/*`` and ``entropy`` metrics).

    Shape: batch fields (2B, T) -> PairLogps of (B,) tensors.
    """
    rows = batch.input_ids.size(0)
    if rows % 2:
        raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {rows}")
    b = rows // 2
    try:
        logps, lengths, stats = _forward(model, batch, model_paths(model, fast), average, pairs=True,
                                         with_stats=with_stats)
    except ValueError as err:
        raise ValueError(_pair_message(str(err), batch, b)) from err
    return PairLogps(logps[:b], logps[b:], lengths[:b], lengths[b:], stats)


def _forward(model, batch, paths: ModelPaths, average: bool, pairs: bool,
             with_stats: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row log-probs and scored-token counts of ``batch`` (N, T), on the layout and paths ``paths`` allow, and
    with ``with_stats`` each row's summed mean logits and entropies (N, 2)."""
    labels = batch.labels
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    lengths = keep.sum(-1)
    _check_scored(lengths)
    tree = pair_tree(batch.input_ids, batch.attention_mask, labels) if pairs and paths.pair_tree else None
    if paths.vocab_size is not None and (tree is not None or not paths.full_logits):
        check_labels(labels, paths.vocab_size)  # before the forward (the reference path checks its logits)
    n, stats = labels.size(0), None
    if tree is not None:  # None as well for a batch that is not right-padded
        scored, stats = tree_forward(model, tree, paths, with_stats)
        row_of = tree.source_row
        logps = row_sums(scored, row_of, n)
    else:
        inputs = {**token_inputs(batch.input_ids, paths.sparse_embedding), "attention_mask": batch.attention_mask,
                  "use_cache": False}
        row_of = keep.nonzero()[:, 0]
        if paths.full_logits:  # the reference path
            logits = model(**inputs).logits
            logps = sequence_logprobs(logits, labels)
            if with_stats:
                stats = logit_stats(logits.flatten(0, 1), keep.reshape(-1).nonzero().squeeze(-1))
        else:
            scored, stats = scored_logprobs(model, inputs, keep, None, targets[keep], weight=paths.output_weight,
                                            scored_logits=paths.scored_logits, grad_into_weight=paths.grad_into_weight,
                                            with_stats=with_stats)
            logps = row_sums(scored, row_of, n)
    stats = None if stats is None else row_sums(stats, row_of, n)
    return (logps / lengths if average else logps), lengths, stats


def row_sums(scored: Tensor, row_of: Tensor, rows: int) -> Tensor:
    """Σ of the per-token log-probs of each row, accumulated in float64 and returned in ``scored``'s dtype.

    ``index_add`` adds one token after the other; in float32 a row of a few hundred tokens (|sum| ~ 10³) then
    drifts by several ulps, enough to move a DPO loss by 1e-5. Float64 accumulation makes the sum correctly
    rounded, like the pairwise ``sum`` of the full-logits path. Shape: (M, ...), (M,) -> (rows, ...).
    """
    total = torch.zeros(rows, *scored.shape[1:], dtype=torch.float64, device=scored.device)
    total = total.index_add(0, row_of, scored.double())
    return total.to(scored.dtype)


def _check_scored(lengths: Tensor) -> None:
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"batch row {row}, field labels: no scored response token (all -100 after the first column)")


def _pair_message(message: str, batch, num_pairs: int) -> str:
    """Rewrite 'batch row r' as the pair and side it belongs to (and its dataset index when known)."""
    prefix = "batch row "
    if not message.startswith(prefix):
        return message
    number, rest = message[len(prefix) :].split(",", 1)
    row = int(number)
    side, pair = ("chosen", row) if row < num_pairs else ("rejected", row - num_pairs)
    index = getattr(batch, "index", None)
    where = f"pair {pair} (dataset row {int(index[pair])})" if index is not None else f"pair {pair}"
    return f"{where}, {side} response,{rest}"
