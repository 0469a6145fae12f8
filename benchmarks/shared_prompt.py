"""Prototype lever: run the prompt shared by a pair's chosen and rejected rows through the model once.

:func:`dpolab.logprobs.concatenated_forward` runs prompt + chosen and prompt + rejected as two rows, so every
prompt token goes through the network twice. Here the shared prefix of the two rows (the prompt, cut before
the first scored token) runs once as B rows with a key/value cache; the cache is repeated for the two
continuations, which run as 2B rows attending to it through an explicit mask and with explicit positions.
Gradients flow back into the prompt through the cached keys and values, so the result is the same function
(up to float rounding in a different summation order). Same signature and result as ``concatenated_forward``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dpolab.logprobs import IGNORE_INDEX, PairLogps, _chunk_rows, _LabelLogProb, _unwrap, concatenated_forward


def shared_prompt_forward(model, batch, average: bool = False, *, full_logits: bool = False) -> PairLogps:
    """Log-probs of a :class:`dpolab.batch.PairBatch` with each pair's prompt computed once.

    Shape: batch fields (2B, T) -> PairLogps of (B,) tensors.
    """
    ids, mask, labels = batch.input_ids, batch.attention_mask.bool(), batch.labels
    b = ids.size(0) // 2
    net = _unwrap(model)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # target of each position
    keep = targets != IGNORE_INDEX
    # shared prefix: common tokens of the two rows, cut before the first scored label of either
    same = (ids[:b] == ids[b:]) & mask[:b] & mask[b:]
    common = same.long().cumprod(-1).sum(-1)
    first_label = torch.minimum(_first_true(labels[:b] != IGNORE_INDEX), _first_true(labels[b:] != IGNORE_INDEX))
    shared = torch.minimum(common, first_label)  # (B,) ≥ 1 needed
    if full_logits or int(shared.min()) < 1:
        return concatenated_forward(model, batch, average, full_logits=full_logits)
    lengths = mask.sum(-1)
    pair = torch.arange(2 * b) % b  # row -> pair
    s_rows = shared[pair]

    # prompt pass: B rows of the shared prefix, with a cache
    width = int(shared.max())
    positions = torch.arange(width)
    prompt_mask = positions[None, :] < shared[:, None]
    cache = DynamicCache(config=net.config)
    base = net.base_model
    hidden_p = base(input_ids=ids[:b, :width], attention_mask=prompt_mask.long(), cache=cache,
                    use_cache=True).last_hidden_state  # (B, P, d)
    cache.batch_repeat_interleave(2)  # rows c0, r0, c1, r1, …

    # continuation pass: 2B rows (interleaved to match the cache), from the shared length to the row's end
    inter = torch.arange(2 * b).view(2, b).t().reshape(-1)  # interleaved position -> original row
    rest = lengths - s_rows
    span = int(rest.max())
    t = torch.arange(span)
    src = (s_rows[:, None] + t[None, :]).clamp(max=ids.size(1) - 1)
    cont_ids = ids.gather(1, src)[inter]
    cont_valid = (t[None, :] < rest[:, None])[inter]
    keys_prompt = prompt_mask[pair][inter][:, None, :].expand(-1, span, -1)  # (2B, R, P)
    keys_cont = (t[None, :] <= t[:, None])[None].expand(2 * b, -1, -1) & cont_valid[:, None, :]
    attn = torch.cat([keys_prompt, keys_cont], dim=-1)[:, None]  # (2B, 1, R, P + R); prompt key 0 always on
    hidden_c = base(input_ids=cont_ids, attention_mask=attn, position_ids=(s_rows[inter, None] + t[None, :]),
                    cache=cache, use_cache=True).last_hidden_state  # (2B, R, d)

    # hidden state predicting each original position's target: position s-1 from the prompt pass, ≥ s from the rest
    last_prompt = hidden_p[torch.arange(b), shared - 1][pair]  # (2B, d)
    order = torch.empty_like(inter)
    order[inter] = torch.arange(2 * b)
    hidden_rows = hidden_c[order]  # back to original row order
    rows, cols = keep.nonzero(as_tuple=True)
    offset = cols - s_rows[rows]  # -1 → prompt pass
    if int(offset.min()) < -1:
        raise ValueError("a scored token lies inside the shared prefix")
    from_prompt = offset < 0
    h = hidden_rows[rows, offset.clamp(min=0)]
    h = torch.where(from_prompt[:, None], last_prompt[rows], h)
    logits = net.get_output_embeddings()(h)
    scored = _LabelLogProb.apply(logits, None, targets[rows, cols], _chunk_rows(logits.size(-1)))
    logps = scored.new_zeros(2 * b).index_add(0, rows, scored)
    counts = keep.sum(-1)
    if average:
        logps = logps / counts
    return PairLogps(logps[:b], logps[b:], counts[:b], counts[b:])


def _first_true(x: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row (the row length when none). Shape: (N, T) -> (N,)."""
    any_true = x.any(-1)
    first = x.float().argmax(-1)
    return torch.where(any_true, first, torch.full_like(first, x.size(-1)))
