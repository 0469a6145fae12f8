"""The training objective on one batch of pairs, and the metric sums that travel with it.

SFT (the paper's first stage) minimises the per-token NLL of the chosen responses; DPO minimises a
registered loss of the policy and reference log-probs (paper Eq. 7 for "sigmoid"), optionally plus
``sft_weight`` times the NLL. Both return *per-pair* losses: the trainer sums them and divides by the
number of pairs of the whole global batch, so k micro-batches of b pairs give the same gradient as one
batch of k·b pairs whatever the padding of each micro-batch (exact accumulation).

Metrics are kept as sums over pairs (:data:`STATS`), which add across micro-batches and processes and
are divided by the pair count only when logged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.batch import PairBatch, SequenceBatch
from dpolab.logprobs import concatenated_forward, sequence_forward
from dpolab.losses import get_loss, sft_loss

# Sums over pairs (plus counts) that one batch contributes to a step's metrics.
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "lengths/chosen", "lengths/rejected", "pairs", "tokens", "nonfinite")
_SFT_STATS = ("loss", "logps/chosen", "lengths/chosen")


def chosen_rows(batch: PairBatch) -> SequenceBatch:
    """The prompt+chosen rows of a pair batch, trimmed to their own longest length. Shape: (2B, T) -> (B, T')."""
    b = batch.num_pairs
    width = int(batch.attention_mask[:b].sum(-1).max())
    return SequenceBatch(batch.input_ids[:b, :width], batch.attention_mask[:b, :width], batch.labels[:b, :width])


def batch_objective(model, reference, batch: PairBatch, *, stage: str, loss: str = "sigmoid", beta: float = 0.1,
                    loss_params: dict | None = None, sft_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair losses (with grad) and the batch's metric sums.

    Args:
        model: the policy (possibly wrapped in DDP).
        reference: an object with ``pair_logps(batch)`` (see :mod:`dpolab.reference`), or None for a
            reference-free loss (and for SFT).
        batch: B pairs.
        stage: ``"sft"`` or ``"dpo"``.
        loss, beta, loss_params, sft_weight: the DPO loss, its β and own parameters, and the weight of
            the NLL term added to it.

    Returns:
        ``(losses, sums)``: losses (B,) and a float64 vector aligned with :data:`STATS`.
    """
    sums = dict.fromkeys(STATS, 0.0)
    sums["pairs"] = float(batch.num_pairs)
    if stage == "sft":
        seq = chosen_rows(batch)
        logps, lengths = sequence_forward(model, seq)
        losses = sft_loss(logps, lengths)
        sums["tokens"] = float(seq.num_tokens)
        for name, value in zip(_SFT_STATS, (losses, logps, lengths)):
            sums[name] = float(value.detach().double().sum())
    else:
        policy = concatenated_forward(model, batch)
        ref = reference.pair_logps(batch) if reference is not None else None
        losses, chosen_rewards, rejected_rewards = get_loss(loss)(
            policy.chosen, policy.rejected, None if ref is None else ref.chosen, None if ref is None else ref.rejected,
            beta=beta, chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
            **(loss_params or {}),
        )
        if sft_weight:
            losses = losses + sft_weight * sft_loss(policy.chosen, policy.chosen_lengths)
        margins = chosen_rewards - rejected_rewards
        sums["tokens"] = float(batch.num_tokens)
        values = {
            "loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).double() + 0.5 * (margins == 0).double(),  # ties ½, as rewards.py
            "logps/chosen": policy.chosen, "logps/rejected": policy.rejected,
            "lengths/chosen": policy.chosen_lengths, "lengths/rejected": policy.rejected_lengths,
        }
        for name, value in values.items():
            sums[name] = float(value.detach().double().sum())
    sums["nonfinite"] = float(not bool(torch.isfinite(losses.detach()).all()))
    return losses, torch.tensor([sums[name] for name in STATS], dtype=torch.float64)


def mean_metrics(totals: Tensor, stage: str, prefix: str = "") -> dict[str, float]:
    """Divide reduced sums by the pair count; the metric names of the stage (SFT logs no rewards)."""
    sums = dict(zip(STATS, totals.tolist()))
    pairs = max(sums["pairs"], 1.0)
    names = _SFT_STATS if stage == "sft" else STATS[:9]
    return {prefix + name: sums[name] / pairs for name in names}
