"""Per-sequence log-probabilities of response tokens: log π(y|x) = Σ_t log π(y_t | x, y_<t).

Every quantity in the DPO objective (paper eq. 7) is a difference of these sums, so they are computed
once here, in float32 whatever the model's dtype, as ``logit[label] - logsumexp(logits)``. That never
materialises a ``(B, T, V)`` log-softmax copy: the logsumexp runs over chunks of token positions, and
the backward pass recomputes the softmax chunk by chunk instead of storing it.

:func:`concatenated_forward` runs chosen and rejected rows through the model in one call. By default it
asks the model for logits only at the scored positions (transformers' ``logits_to_keep`` with a boolean
mask), which skips the output layer on prompt and padding tokens; ``full_logits=True`` is the plain,
slow reference path, and the tests hold the two equal. For GPT-2 and Llama-family models it also runs each
pair as one row, the prompt once and the two responses as tree-masked branches (:mod:`dpolab.fast.pairtree`),
which removes the second copy of every prompt and most of the padding.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dpolab.fast.pairtree import PairTree, pair_tree

IGNORE_INDEX = -100
# elements of one float32 (positions x vocabulary) chunk: 4M floats = 16 MiB of temporaries at a time
CHUNK_ELEMENTS = 1 << 22


class _LabelLogProb(torch.autograd.Function):
    """log softmax(z)[y] for chosen rows of a ``(M, V)`` logit matrix, in chunks, with a recomputing backward.

    d/dz_j (z_y - logsumexp z) = 1[j = y] - softmax(z)_j, so the backward needs only the logits (already
    held by the caller) and the per-row logsumexp, never a stored softmax.
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


def _chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


class _OutputLayerLogProb(torch.autograd.Function):
    """log softmax(h W^T)[y] for hidden states ``h`` (M, H) and a bias-free output layer ``W`` (V, H), fused.

    Target k is scored by row ``rows[k]`` of ``h`` (a row may score several: the pair tree's last prompt
    position). The forward computes the (M, V) logits in one product and keeps them with the per-row logsumexp;
    the backward turns them in place into dz = Σ_k g_k (onehot(y_k) - softmax), then dh = dz W and dW = dz^T h.
    Besides skipping the zero-filled gradient-of-logits matrix, this lets dW go where it ends up:

    with ``direct`` (:func:`output_grad_into_weight`, a leaf weight) dW is added straight into ``W.grad`` instead
    of being returned. Autograd would otherwise hold a second vocabulary-sized matrix until it adds it there
    itself, and for a tied embedding only after the whole backward pass, when the lookup's gradient arrives.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, rows: Tensor, targets: Tensor, direct: bool) -> Tensor:
        compute = torch.promote_types(hidden.dtype, torch.float32)
        logits = F.linear(hidden, weight)
        lse = torch.empty(logits.size(0), dtype=compute, device=hidden.device)
        chunk = _chunk_rows(logits.size(-1))
        for start in range(0, logits.size(0), chunk):
            lse[start:start + chunk] = torch.logsumexp(logits[start:start + chunk].to(compute), dim=-1)
        out = logits[rows, targets].to(compute) - lse[rows]
        ctx.save_for_backward(hidden, weight, rows, targets, lse, logits)
        ctx.direct = direct
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, rows, targets, lse, logits = ctx.saved_tensors
        per_row = torch.zeros_like(lse).index_add_(0, rows, grad_out.to(lse.dtype))  # G_r = Σ_{k: rows[k]=r} g_k
        chunk = _chunk_rows(logits.size(-1))
        for start in range(0, logits.size(0), chunk):  # logits -> -G softmax, in place
            z = logits[start:start + chunk]
            dz = z.to(lse.dtype).sub_(lse[start:start + chunk, None]).exp_().mul_(-per_row[start:start + chunk, None])
            if dz.data_ptr() != z.data_ptr():
                z.copy_(dz)
        dz = logits.index_put_((rows, targets), grad_out.to(logits.dtype), accumulate=True)
        grad_h = dz @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if not ctx.needs_input_grad[1]:
            pass
        elif not ctx.direct:
            grad_w = dz.t() @ hidden
        elif weight.grad is None:
            weight.grad = dz.t() @ hidden
        else:
            weight.grad.addmm_(dz.t(), hidden)
        return grad_h, grad_w, None, None, None


def _check_labels(labels: Tensor, vocab_size: int, what: str = "labels") -> None:
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
    _check_labels(labels, logits.size(-1))
    return _token_logprobs(logits, labels)


def _token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    vocab = logits.size(-1)
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    scored = _LabelLogProb.apply(logits.reshape(-1, vocab), rows, flat_labels[rows], _chunk_rows(vocab))
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
    _check_labels(labels, logits.size(-1))
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
    """

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor

    def detach(self) -> PairLogps:
        """A copy without autograd history (for reference log-probs and caches)."""
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_lengths, self.rejected_lengths)


def _unwrap(model):
    """The transformers model under DDP/FSDP (``.module``) and PEFT (``.get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def supports_scored_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do, masks included)."""
    forward = getattr(_unwrap(model), "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


FUSED_OUTPUT_LAYER = True  # see _output_weight; False restores the model's own output layer (logits_to_keep)
_DIRECT_OUTPUT_GRAD = False


@contextlib.contextmanager
def output_grad_into_weight() -> Iterator[None]:
    """Within the block, the fused output layer adds its weight gradient straight into ``weight.grad``.

    For callers that run ``loss.backward()`` (the trainer): it saves holding a second vocabulary-sized matrix
    through the backward pass. Outside the block the gradient is returned to autograd as usual, which
    ``torch.autograd.grad`` needs (it never touches ``.grad``).
    """
    global _DIRECT_OUTPUT_GRAD
    saved, _DIRECT_OUTPUT_GRAD = _DIRECT_OUTPUT_GRAD, True
    try:
        yield
    finally:
        _DIRECT_OUTPUT_GRAD = saved


def _output_weight(model) -> Tensor | None:
    """The output layer's weight when dpolab computes the scored log-probs from the hidden states itself.

    For a verified family (GPT-2, Llama) in a single process, called directly (no DDP/PEFT wrapper), whose output layer
    is a bias-free ``nn.Linear`` and with autocast off: the model then runs its base (transformer blocks and final
    norm) and :class:`_OutputLayerLogProb` does the rest, with the same function as the model's own head.
    """
    net = _unwrap(model)
    if not (FUSED_OUTPUT_LAYER and _single_process() and net is model and _verified(net)):  # FSDP2 shards in place
        return None
    head = net.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or torch.is_autocast_enabled(head.weight.device.type):
        return None
    return head.weight


def _fused_scores(model, weight: Tensor, inputs: dict, keep: Tensor, rows: Tensor | None, targets: Tensor) -> Tensor:
    """Scored log-probs through :class:`_OutputLayerLogProb`: hidden states at the True positions of ``keep``
    (row-major), target k scored by kept position ``rows[k]`` (by position k when ``rows`` is None)."""
    hidden = model.base_model(**inputs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))[keep.reshape(-1)]
    if rows is None:
        rows = torch.arange(targets.numel(), device=targets.device)
    direct = _DIRECT_OUTPUT_GRAD and torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
    return _OutputLayerLogProb.apply(hidden, weight, rows, targets, direct)


def sequence_forward(model, batch, average: bool = False, *, full_logits: bool = False) -> tuple[Tensor, Tensor]:
    """Run ``model`` once on ``batch`` and return each row's response log-prob and scored-token count.

    Args:
        model: a causal LM (transformers, optionally wrapped by PEFT or DDP).
        batch: anything with ``input_ids``, ``attention_mask`` and ``labels`` (N, T), e.g. a
            :class:`dpolab.data.batch.SequenceBatch`.
        average: return the per-token mean instead of the sum.
        full_logits: compute logits at every position (the slow reference path) instead of only at
            the positions whose next token is scored.

    Returns:
        ``(logps, lengths)``, both (N,); logps in float32 with grad if the model trains.
    """
    labels = batch.labels
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    lengths = keep.sum(-1)
    _check_scored(lengths)
    inputs = {**_token_inputs(model, batch.input_ids), "attention_mask": batch.attention_mask, "use_cache": False}
    weight = None if full_logits else _output_weight(model)
    if weight is not None:
        _check_labels(labels, weight.size(0))
        scored = _fused_scores(model, weight, inputs, keep, None, targets[keep])
        logps = _row_sums(scored, keep.nonzero()[:, 0], labels.size(0))
        return (logps / lengths if average else logps), lengths
    if not full_logits and supports_scored_logits(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits
    if logits.dim() == 2:  # (num scored, V): one row per True of ``keep``, in row-major order
        _check_labels(labels, logits.size(-1))
        scored = _LabelLogProb.apply(logits, None, targets[keep], _chunk_rows(logits.size(-1)))
        row_of = keep.nonzero()[:, 0]
        logps = _row_sums(scored, row_of, labels.size(0))
    else:
        logps = sequence_logprobs(logits, labels)
    if average:
        logps = logps / lengths
    return logps, lengths


def concatenated_forward(model, batch, average: bool = False, *, full_logits: bool = False,
                         share_prompt: bool = True) -> PairLogps:
    """Log-probs of the chosen and the rejected responses of a :class:`dpolab.data.batch.PairBatch`, in one call.

    Rows 0..B-1 of the batch are prompt + chosen, rows B..2B-1 prompt + rejected. By default (``share_prompt``)
    a model that :func:`supports_shared_prompt` runs each pair as one row, prompt once and the two responses as
    tree-masked branches (:mod:`dpolab.fast.pairtree`): the same log-probs with fewer positions to compute. Otherwise,
    and always with ``full_logits=True`` (the slow reference path), the 2B rows run as one padded batch.

    Shape: batch fields (2B, T) -> PairLogps of (B,) tensors.
    """
    rows = batch.input_ids.size(0)
    if rows % 2:
        raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {rows}")
    b = rows // 2
    tree = None
    if share_prompt and not full_logits and supports_shared_prompt(model):
        tree = pair_tree(batch.input_ids, batch.attention_mask, batch.labels)
    try:
        if tree is None:
            logps, lengths = sequence_forward(model, batch, average, full_logits=full_logits)
        else:
            logps, lengths = _tree_forward(model, batch, tree, average)
    except ValueError as err:
        raise ValueError(_pair_message(str(err), batch, b)) from err
    return PairLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


# Model families whose forward is verified (tests/test_pairtree.py) to honour a custom 4-D attention mask
# together with explicit position ids, and which have no other positional masking (no sliding window).
SHARED_PROMPT_MODELS = ("gpt2", "llama")


def _verified(net) -> bool:
    """Whether the (unwrapped) model is of a family whose forward the tests verify against dpolab's own paths."""
    return getattr(getattr(net, "config", None), "model_type", None) in SHARED_PROMPT_MODELS


def _single_process() -> bool:
    """No torch.distributed group: DDP and FSDP own the parameters (and their gradients) otherwise."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def supports_shared_prompt(model) -> bool:
    """Whether ``model`` can run the tree layout: a known family with sdpa or eager attention."""
    net = _unwrap(model)
    return _verified(net) and getattr(net.config, "_attn_implementation", None) in ("sdpa", "eager")


def pair_layout(model, stage: str = "dpo") -> str:
    """How ``model``'s pair batches run in ``stage``: ``"tree"`` (DPO through :func:`concatenated_forward` on a
    supported model) or ``"rows"`` (SFT scores prompt + chosen rows); for :func:`dpolab.data.batch.pair_length`, so
    that batches are bucketed by the width they will have."""
    return "tree" if stage == "dpo" and supports_shared_prompt(model) else "rows"


def _tree_forward(model, batch, tree: PairTree, average: bool) -> tuple[Tensor, Tensor]:
    """Per-row log-probs and scored-token counts of the 2B-row ``batch``, computed on its tree layout."""
    targets = shift_labels(batch.labels)
    lengths = (targets != IGNORE_INDEX).sum(-1)
    _check_scored(lengths)
    config = _unwrap(model).config
    _check_labels(batch.labels, config.vocab_size)
    if config._attn_implementation == "sdpa":
        mask = tree.allowed[:, None]
    else:  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(tree.allowed.shape, dtype=dtype, device=tree.allowed.device)
        mask = mask.masked_fill_(~tree.allowed, torch.finfo(dtype).min)[:, None]
    inputs = {**_token_inputs(model, tree.input_ids), "attention_mask": mask, "position_ids": tree.position_ids,
              "use_cache": False}
    weight = _output_weight(model)
    keep = torch.zeros(tree.input_ids.numel(), dtype=torch.bool, device=tree.input_ids.device)
    keep[tree.predictor] = True
    rows = (keep.cumsum(0) - 1)[tree.predictor]  # predictor position -> its row among the kept positions
    if weight is not None:
        scored = _fused_scores(model, weight, inputs, keep, rows, tree.targets)
    else:
        if supports_scored_logits(model):
            logits = model(**inputs, logits_to_keep=keep.view(tree.input_ids.shape)).logits  # (kept positions, V)
        else:
            logits = model(**inputs).logits.flatten(0, 1)
            rows = tree.predictor
        scored = _LabelLogProb.apply(logits, rows, tree.targets, _chunk_rows(logits.size(-1)))
    logps = _row_sums(scored, tree.source_row, batch.input_ids.size(0))
    if average:
        logps = logps / lengths
    return logps, lengths


SPARSE_TIED_EMBEDDING = True  # see _token_inputs; False restores the model's own (dense-gradient) lookup


def _token_inputs(model, input_ids: Tensor) -> dict[str, Tensor]:
    """The token inputs of a forward: ``input_ids``, or ``inputs_embeds`` looked up with a sparse gradient.

    When the input embedding is the output layer's matrix (tied, as in SmolLM2 and GPT-2) and trains, the
    output layer already gives that matrix a dense gradient. The lookup's own gradient touches only the rows of
    the batch's tokens: as a sparse tensor it is added into the dense one, instead of being materialised as a
    second vocabulary-sized matrix (a zero-fill, a scatter and an add of 113 MB per micro-batch on SmolLM2).
    Same forward values; the same gradient up to float summation order. Only for the verified families (the
    model's own forward does nothing else to the ids) and a single process (DDP and FSDP own the parameters).
    """
    net = _unwrap(model)
    if not (SPARSE_TIED_EMBEDDING and torch.is_grad_enabled() and _verified(net) and _single_process()):
        return {"input_ids": input_ids}
    embedding, output = net.get_input_embeddings(), net.get_output_embeddings()
    tied = (type(embedding) is torch.nn.Embedding and output is not None and output.weight is embedding.weight
            and embedding.weight.requires_grad and embedding.max_norm is None)
    if not tied:
        return {"input_ids": input_ids}
    return {"inputs_embeds": F.embedding(input_ids, embedding.weight, embedding.padding_idx,
                                         scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=True)}


def _row_sums(scored: Tensor, row_of: Tensor, rows: int) -> Tensor:
    """Σ of the per-token log-probs of each row, accumulated in float64 and returned in ``scored``'s dtype.

    ``index_add`` adds one token after the other; in float32 a row of a few hundred tokens (|sum| ~ 10³) then
    drifts by several ulps, enough to move a DPO loss by 1e-5. Float64 accumulation makes the sum correctly
    rounded, like the pairwise ``sum`` of the full-logits path. Shape: (M,), (M,) -> (rows,).
    """
    total = torch.zeros(rows, dtype=torch.float64, device=scored.device).index_add(0, row_of, scored.double())
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
