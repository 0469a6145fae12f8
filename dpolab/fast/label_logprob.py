"""log softmax(z)[y] for chosen rows of a logit matrix, without a stored softmax: the kernel under every log-prob.

The forward takes the logsumexp over chunks of rows (:data:`CHUNK_ELEMENTS` floats at a time) and keeps only the
per-row logsumexp; the backward recomputes the softmax chunk by chunk, since

    d/dz_j (z_y - logsumexp z) = 1[j = y] - softmax(z)_j.

So no ``(M, V)`` log-softmax copy is ever materialised. The readable reference is ``torch.log_softmax(z, -1)``
followed by a gather; ``tests/test_logprobs.py`` holds the two equal (values, gradients, finite differences).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# elements of one float32 (positions x vocabulary) chunk: 4M floats = 16 MiB of temporaries at a time
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab_size: int) -> int:
    """Logit rows per chunk for a vocabulary of ``vocab_size``: :data:`CHUNK_ELEMENTS` floats at a time."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


class LabelLogProb(torch.autograd.Function):
    """log softmax(z)[y] for chosen rows of a ``(M, V)`` logit matrix, in chunks, with a recomputing backward.

    ``apply(logits, rows, targets, chunk)``: target k is scored by logit row ``rows[k]`` (by row k when ``rows``
    is None; a row may score several targets), ``chunk`` rows at a time. Computed in float32 (float64 for float64
    logits). Shape: logits (M, V), rows (K,) or None, targets (K,) -> (K,).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        n = targets.numel()
        out = torch.empty(n, dtype=compute, device=logits.device)
        lse = torch.empty(n, dtype=compute, device=logits.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            z = (logits[start:stop] if rows is None else logits[rows[start:stop]]).to(compute)
            lse[start:stop] = torch.logsumexp(z, dim=-1)
            out[start:stop] = z.gather(-1, targets[start:stop, None]).squeeze(-1) - lse[start:stop]
        ctx.save_for_backward(logits, rows if rows is not None else targets.new_empty(0), targets, lse)
        ctx.has_rows, ctx.chunk = rows is not None, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, rows, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, targets.numel(), ctx.chunk):
            stop = min(start + ctx.chunk, targets.numel())
            idx = rows[start:stop] if ctx.has_rows else slice(start, stop)
            g = grad_out[start:stop, None].to(lse.dtype)
            dz = torch.exp(logits[idx].to(lse.dtype) - lse[start:stop, None]).mul_(-g)
            dz.scatter_add_(-1, targets[start:stop, None], g)
            if ctx.has_rows:  # a logit row may score several targets (pairtree: the last prompt position)
                grad.index_add_(0, idx, dz.to(grad.dtype))
            else:
                grad[idx] = dz.to(grad.dtype)
        return grad, None, None, None


def label_logprobs(logits: Tensor, rows: Tensor | None, targets: Tensor) -> Tensor:
    """:class:`LabelLogProb` in chunks sized to ``logits``' vocabulary. Shape: (M, V), (K,) | None, (K,) -> (K,)."""
    return LabelLogProb.apply(logits, rows, targets, chunk_rows(logits.size(-1)))
