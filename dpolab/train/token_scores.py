"""Per-token log-probs of the response tokens, for the objectives that need more than per-sequence sums.

WPO weighs a pair by per-token probabilities relative to log Σ_v π(v|·)² (``use_weighting``), LD-DPO reweighs the
tokens past the shorter response (``ld_alpha``), and Unlikelihood pushes each rejected token's probability down.
This is the plain path: the model's full logits at every position (no fused output layer, no shared-prompt tree),
so it is slower than :func:`dpolab.logprobs.concatenated_forward` and used only when one of these is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.data.labels import IGNORE_INDEX
from dpolab.logprobs import shift_labels


@dataclass
class TokenScores:
    """Per-position scores of a batch of N rows, aligned with the shifted labels.

    Attributes:
        logps: (N, T) log π(y_t | x, y_<t) at scored positions, 0 elsewhere; with grad if the model trains.
        mask: (N, T) True at scored positions.
        log_sum_sq: (N, T) log Σ_v π(v | ·)², without grad (None unless asked for).
        logit_stats: (N, 2) Σ over each row's scored tokens of the mean logit and of the entropy of π, without grad
            (None unless asked for; as :attr:`dpolab.logprobs.PairLogps.logit_stats`).
    """

    logps: Tensor
    mask: Tensor
    log_sum_sq: Tensor | None = None
    logit_stats: Tensor | None = None

    @property
    def sums(self) -> Tensor:
        """Σ_t log π(y_t|·) of each row, as :func:`dpolab.logprobs.sequence_forward`. Shape: (N,)."""
        return self.logps.sum(-1)

    @property
    def lengths(self) -> Tensor:
        """Scored tokens per row. Shape: (N,)."""
        return self.mask.sum(-1)


def token_scores(model, batch, *, sum_sq: bool = False, with_stats: bool = False) -> TokenScores:
    """Run ``model`` on ``batch`` (``input_ids``, ``attention_mask``, ``labels`` of shape (N, T)) and score each label.

    Log-probs are computed in float32 (float64 for float64 logits), as in :mod:`dpolab.logprobs`.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = shift_labels(batch.labels)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_sum_sq = stats = None
    with torch.no_grad():
        if sum_sq:
            log_sum_sq = torch.logsumexp(2 * logp, dim=-1) * mask
        if with_stats:  # mean_v z_v and H = −Σ_v π_v log π_v at each scored position, summed per row
            stats = torch.stack([logits.mean(-1), -(logp.exp() * logp).sum(-1)], dim=-1)
            stats = (stats * mask.unsqueeze(-1)).sum(1)
    return TokenScores(picked * mask, mask, log_sum_sq, stats)
