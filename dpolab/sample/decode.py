"""The fast sampling engine: a decoding loop of its own instead of ``model.generate``.

One batch of rows (prompt × sample) is decoded as follows:

1. *Prefill* once on the left-padded prompts, with an attention mask and position ids that start at 0 on each
   row's first real token, keeping the logits of the last position only (``logits_to_keep=1``).
2. *Decode* one token per row per step with a :class:`~transformers.DynamicCache`; the attention mask lives in a
   buffer allocated once for the whole completion and the step feeds a view of it.
3. Rows that reached EOS leave the batch (their rows of the KV cache are dropped), so a batch costs what its
   live rows cost.

The draw is the same rule as :class:`dpolab.sample.reference_engine.RecordingSampler` (the slow reference): for a
uniform ``u`` from the row's own stream, the first token whose cumulative probability (float64) exceeds ``u·total``.
It is computed in two levels, :func:`inverse_cdf`: float64 block sums locate the block of 256 tokens where
``u·total`` falls, and the cumulative sum is taken token by token only inside that block, instead of over the whole
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 256  # tokens per block of the two-level inverse CDF


@dataclass
class DecodedRows:
    """The completions of one batch of rows. Shapes: ``tokens`` (B, T) padded with -1, the others (B,)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    model_logps: torch.Tensor
    sampling_logps: torch.Tensor
    finished: torch.Tensor


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First token whose cumulative weight exceeds ``u · total``, per row. Shape: (B, V), (B,) -> (B,).

    ``weights`` are unnormalised probabilities (float32, ``exp(score - max)``). The rule is that of
    ``searchsorted(weights.double().cumsum(-1), u * total, right=True)`` with float64 accumulation, computed in two
    levels: block sums of :data:`BLOCK` tokens locate the block where ``u · total`` falls, and the token-by-token
    cumulative sum (float64) is taken only inside that block. Tokens of weight 0 are never drawn.
    """
    rows, vocab = weights.shape
    blocks = (F.pad(weights, (0, -vocab % BLOCK)) if vocab % BLOCK else weights).view(rows, -1, BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum_(-1)  # (B, blocks)
    target = (u.to(block_cdf) * block_cdf[:, -1])[:, None]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_max_(block_cdf.shape[1] - 1)  # (B, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), 0.0)
    inside = blocks[torch.arange(rows, device=weights.device), block.squeeze(-1)].double()  # (B, BLOCK)
    cdf = inside.cumsum(-1) + before
    offset = torch.searchsorted(cdf, target, right=True)
    # a target past the block's own float64 sum (rounding of the block sums): its last token of positive weight
    last = BLOCK - 1 - (inside > 0).flip(-1).long().argmax(-1, keepdim=True)
    offset = torch.minimum(offset, last)
    return (block * BLOCK + offset).squeeze(-1)


def _weights_and_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(scores - max)`` (float32, one pass) and ``logsumexp(scores)`` per row from its sum."""
    top = scores.amax(-1, keepdim=True)
    weights = (scores - top).exp_()
    return weights, top.squeeze(-1) + weights.sum(-1, dtype=torch.float64).log().float()


def draw_step(logits: torch.Tensor, u: torch.Tensor, warp,
              overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``warp(logits)``; return it with its raw-model and sampling log-probs. (B,) each.

    ``warp`` maps the raw logits to the sampling distribution's logits, or is None for the raw distribution. A
    log-prob is ``score - logsumexp(scores)`` at the drawn token, so no (B, V) log-softmax is materialised.
    ``overwrite``: float32 ``logits`` may be turned into the weights in place (no (B, V) temporary at all).
    """
    if overwrite and warp is None and logits.dtype == torch.float32:
        top = logits.amax(-1, keepdim=True)
        weights = logits.sub_(top).exp_()
        log_total = weights.sum(-1, dtype=torch.float64).log().float()
        tokens = inverse_cdf(weights, u)
        logp = weights.gather(-1, tokens[:, None]).squeeze(-1).log() - log_total  # log(e^(s - top)) = s - top
        return tokens, logp, logp
    scores = logits.float()
    weights, model_lse = _weights_and_lse(scores)
    warped, sampling_lse = (scores, model_lse) if warp is None else (warp(scores), None)
    if warp is not None:
        weights, sampling_lse = _weights_and_lse(warped)
    tokens = inverse_cdf(weights, u)
    pick = tokens[:, None]
    model_logp = scores.gather(-1, pick).squeeze(-1) - model_lse
    return tokens, model_logp, warped.gather(-1, pick).squeeze(-1) - sampling_lse


class _NextTokenLogits:
    """Logits of the last position only, for GPT-2 and Llama written by one matmul into a buffer reused every step.

    Other models run their own forward with ``logits_to_keep=1``.
    """

    def __init__(self, model, rows: int):
        self.model, self.head = model, model.get_output_embeddings()
        # the own matmul bypasses the top-level forward and the head module: only where no hook would be skipped
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (model, self.head))
        own = (type(model).__name__ in ("GPT2LMHeadModel", "LlamaForCausalLM") and type(self.head) is torch.nn.Linear
               and not hooked)
        weight = self.head.weight
        self.buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device) if own else None

    def __call__(self, **inputs) -> torch.Tensor:
        """(B, V) logits; with the buffer, valid until the next call."""
        if self.buffer is None:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1]
        hidden = self.model.base_model(**inputs).last_hidden_state[:, -1]
        out, weight, bias = self.buffer[:hidden.shape[0]], self.head.weight, self.head.bias
        # the same call nn.Linear makes (addmm with a bias, mm without), so the same logits bit for bit
        return torch.addmm(bias, hidden, weight.t(), out=out) if bias is not None else torch.mm(hidden, weight.t(),
                                                                                                 out=out)


def _select_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` of every layer of a DynamicCache."""
    for layer in cache.layers:
        layer.batch_select_indices(keep)


@torch.no_grad()
def decode_rows(model, prompts: list[list[int]], generators: list[torch.Generator], *, max_new_tokens: int,
                eos_ids: list[int], pad_id: int, warp=None) -> DecodedRows:
    """Sample one completion for each prompt (a row), row ``r`` drawing its uniforms from ``generators[r]``.

    Row ``r``'s ``t``-th token uses the ``t``-th uniform of its stream, as in the slow engine, so a completion does
    not depend on the other rows of the batch. A row stops after its first EOS token, which it keeps.
    """
    from transformers import DynamicCache

    device = model.device
    rows, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, width + max_new_tokens, dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[r, width - len(ids):width] = 1
    mask[:, width:] = 1  # generated positions: a finished row leaves the batch, so every live one attends to them
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp_min(0)

    tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long)
    model_logps, sampling_logps = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    eos = torch.tensor(eos_ids, device=device)
    live = torch.arange(rows)  # batch position -> row index
    cache = DynamicCache(config=model.config)

    next_token_logits = _NextTokenLogits(model, rows)
    logits = next_token_logits(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=positions,
                               cache=cache, use_cache=True)
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        u = torch.cat([torch.rand(1, generator=generators[r], dtype=torch.float64) for r in live.tolist()])
        drawn, model_logp, sampling_logp = draw_step(logits, u.to(device), warp, overwrite=True)
        tokens[live, step] = drawn.cpu()
        model_logps[live] += model_logp.double().cpu()
        sampling_logps[live] += sampling_logp.double().cpu()
        stop = torch.isin(drawn, eos).cpu()
        if stop.any():
            lengths[live[stop]] = step + 1
            finished[live[stop]] = True
        if step + 1 == max_new_tokens or bool(stop.all()):
            break
        if stop.any():
            keep = (~stop).nonzero().squeeze(-1)
            live, drawn, next_position = live[keep], drawn[keep.to(device)], next_position[keep.to(device)]
            mask = mask[keep.to(device)]
            _select_rows(cache, keep.to(device))
        logits = next_token_logits(input_ids=drawn[:, None], attention_mask=mask[:, :width + step + 1],
                                   position_ids=next_position, cache=cache, use_cache=True)
        next_position = next_position + 1
    return DecodedRows(tokens, lengths, model_logps.float(), sampling_logps.float(), finished)
