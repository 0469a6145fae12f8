"""Prototype lever: padding-free batches — every row of a pair batch packed into one sequence.

The 2B rows are concatenated without padding into a single row; positions restart at 0 for each segment and a
block-diagonal causal mask keeps the segments apart. On a CPU there is no variable-length attention kernel, so
the attention runs over the packed length L = Σ lengths with an (L, L) mask: padding no longer costs linear
layers, but attention costs L² instead of Σ length². Same signature and result as
:func:`dpolab.logprobs.concatenated_forward`.
"""

from __future__ import annotations

import torch

from dpolab.logprobs import IGNORE_INDEX, PairLogps, _chunk_rows, _LabelLogProb, _unwrap


def packed_forward(model, batch, average: bool = False, *, full_logits: bool = False) -> PairLogps:
    """Log-probs of a :class:`dpolab.batch.PairBatch` computed on one packed, padding-free row.

    Shape: batch fields (2B, T) -> PairLogps of (B,) tensors.
    """
    ids, mask, labels = batch.input_ids, batch.attention_mask.bool(), batch.labels
    n = ids.size(0)
    net = _unwrap(model)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = (targets != IGNORE_INDEX) & mask
    lengths = mask.sum(-1)
    packed_ids = ids[mask][None]  # (1, L), rows one after another
    segment = torch.repeat_interleave(torch.arange(n), lengths)  # (L,)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(segment.numel()) - starts[segment]
    causal = positions[:, None] >= positions[None, :]
    attn = (segment[:, None] == segment[None, :]) & causal  # same segment, not in the future
    hidden = net.base_model(input_ids=packed_ids, attention_mask=attn[None, None], position_ids=positions[None],
                            use_cache=False).last_hidden_state[0]  # (L, d)
    scored = keep[mask]  # (L,) packed positions whose next token is scored
    logits = net.get_output_embeddings()(hidden[scored])
    logps_tok = _LabelLogProb.apply(logits, None, targets[mask][scored], _chunk_rows(logits.size(-1)))
    logps = logps_tok.new_zeros(n).index_add(0, segment[scored], logps_tok)
    counts = keep.sum(-1)
    if average:
        logps = logps / counts
    b = n // 2
    return PairLogps(logps[:b], logps[b:], counts[:b], counts[b:])
