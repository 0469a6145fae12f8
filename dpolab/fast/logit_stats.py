"""The mean logit and the entropy of π at scored positions: what trl logs as ``logits/*`` and ``entropy``.

For one position with logits z (V,) and π = softmax(z)::

    mean logit  m = (1/V) Σ_v z_v
    entropy     H = −Σ_v π_v log π_v = logsumexp(z) − Σ_v π_v z_v

:func:`logit_stats` computes both for chosen rows of a logit matrix, a chunk of rows at a time (no (M, V) softmax is
held) and without gradient: they are metrics, never trained on. Every log-prob path calls it on the logits it has
anyway (the fused output layer with its own logsumexp, :class:`dpolab.fast.output_layer.OutputLayerLogProb`), so
asking for the metrics costs no extra product with the output layer. The readable reference is
``torch.log_softmax`` of the model's full logits; ``tests/test_logit_stats.py`` holds every path to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpolab.fast.label_logprob import chunk_rows


def logit_stats(logits: Tensor, rows: Tensor | None = None, lse: Tensor | None = None) -> Tensor:
    """Mean logit and entropy of softmax of rows of a logit matrix, without gradient.

    Args:
        logits: (M, V) logits.
        rows: the rows to take, (K,) (a row may repeat); None takes every row.
        lse: logsumexp of every row of ``logits``, (M,), when the caller has it; else computed here.

    Returns:
        (K, 2) (or (M, 2)): column 0 the mean logit over the vocabulary, column 1 the entropy in nats; float32
        (float64 for float64 logits).
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    n = logits.size(0) if rows is None else rows.numel()
    out = torch.empty(n, 2, dtype=compute, device=logits.device)
    chunk = chunk_rows(logits.size(-1))
    probs = torch.empty(min(chunk, n), logits.size(-1), dtype=compute, device=logits.device)  # one buffer for all chunks
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            idx = slice(start, stop) if rows is None else rows[start:stop]
            z = logits[idx].detach().to(compute)
            row_lse = torch.logsumexp(z, dim=-1) if lse is None else lse[idx].to(compute)
            p = torch.sub(z, row_lse[:, None], out=probs[: stop - start]).exp_()
            out[start:stop, 0] = z.mean(dim=-1)
            out[start:stop, 1] = row_lse - torch.linalg.vecdot(p, z)
    return out
