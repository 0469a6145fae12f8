"""Log-probs of the scored tokens from the final hidden states: the output layer run only where a token is scored.

A causal LM's output layer computes logits z = h W^T at every position, prompt and padding included, although DPO
scores only the response tokens. :func:`scored_logprobs` computes log softmax(z)[y] at the scored positions only,
one of three ways, fastest first:

- the fused output layer (:class:`OutputLayerLogProb`): the model runs its base (blocks and final norm) and dpolab
  applies the output weight itself; the logits of the scored positions are turned in place into their gradient in
  the backward pass, and the weight gradient can go straight into ``weight.grad``;
- the model's own output layer on the scored positions (transformers' ``logits_to_keep`` with a boolean mask);
- the model's logits at every position, scored rows picked afterwards (the slow reference).

The three are the same function; ``tests/test_logprobs.py`` and ``tests/test_pairtree.py`` hold them equal to the
full-logits path (values and gradients), and the fused layer to a float64 log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dpolab.fast.label_logprob import chunk_rows, label_logprobs
from dpolab.fast.logit_stats import logit_stats


class OutputLayerLogProb(torch.autograd.Function):
    """log softmax(h W^T)[y] for hidden states ``h`` (M, H) and a bias-free output layer ``W`` (V, H), fused.

    ``apply(hidden, weight, rows, targets, direct, stats=None)``: target k is scored by row ``rows[k]`` of ``h`` (a
    row may score several: the pair tree's last prompt position). An (M, 2) ``stats`` buffer receives each row's mean
    logit and entropy (:func:`dpolab.fast.logit_stats.logit_stats`, no gradient) from the logits held anyway. The forward computes the (M, V) logits in one product and
    keeps them with the per-row logsumexp; the backward turns them in place into dz = Σ_k g_k (onehot(y_k) -
    softmax), then dh = dz W and dW = dz^T h. Besides skipping the zero-filled gradient-of-logits matrix, this lets
    dW go where it ends up: with ``direct`` (a leaf weight) dW is added straight into ``W.grad`` instead of being
    returned. Autograd would otherwise hold a second vocabulary-sized matrix until it adds it there itself, and for
    a tied embedding only after the whole backward pass, when the lookup's gradient arrives.

    Shape: hidden (M, H), weight (V, H), rows (K,), targets (K,) -> (K,).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, rows: Tensor, targets: Tensor, direct: bool,
                stats: Tensor | None = None) -> Tensor:
        compute = torch.promote_types(hidden.dtype, torch.float32)
        logits = F.linear(hidden, weight)
        lse = torch.empty(logits.size(0), dtype=compute, device=hidden.device)
        chunk = chunk_rows(logits.size(-1))
        for start in range(0, logits.size(0), chunk):
            lse[start:start + chunk] = torch.logsumexp(logits[start:start + chunk].to(compute), dim=-1)
        out = logits[rows, targets].to(compute) - lse[rows]
        if stats is not None:
            stats.copy_(logit_stats(logits, lse=lse))
        ctx.save_for_backward(hidden, weight, rows, targets, lse, logits)
        ctx.direct = direct
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, rows, targets, lse, logits = ctx.saved_tensors
        per_row = torch.zeros_like(lse).index_add_(0, rows, grad_out.to(lse.dtype))  # G_r = Σ_{k: rows[k]=r} g_k
        chunk = chunk_rows(logits.size(-1))
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
        return grad_h, grad_w, None, None, None, None


def fusable_output_weight(net: torch.nn.Module) -> Tensor | None:
    """The output layer's weight when :class:`OutputLayerLogProb` computes the same function as the model's own
    head: a bias-free ``nn.Linear`` with autocast off (which would change the product's precision); else None.
    ``net`` is the transformers model itself (the caller has checked its family and that nothing wraps it)."""
    head = net.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if torch.is_autocast_enabled(head.weight.device.type):
        return None
    return head.weight


def scored_logprobs(model, inputs: dict, keep: Tensor, rows: Tensor | None, targets: Tensor, *,
                    weight: Tensor | None, scored_logits: bool, grad_into_weight: bool = False,
                    with_stats: bool = False) -> tuple[Tensor, Tensor | None]:
    """log π of each target, from one forward of ``model`` on ``inputs`` (and, if asked, the statistics of the
    distribution it is drawn from).

    Args:
        model: the causal LM (``model.base_model`` must be its blocks and final norm when ``weight`` is given).
        inputs: keyword arguments of its forward (token inputs, masks, position ids).
        keep: True at the positions whose output scores a target. Shape: like the token inputs, (N, T).
        rows: for each target, the kept position (row-major index among the True of ``keep``) that scores it;
            None when target k is scored by kept position k.
        targets: the scored token ids. Shape: (K,).
        weight: the output layer's weight for the fused path (:func:`fusable_output_weight`), or None.
        scored_logits: without ``weight``, ask the model for logits at the kept positions only (``logits_to_keep``);
            else it computes them at every position.
        grad_into_weight: the fused path adds dW into ``weight.grad`` itself (callers that run ``backward()``).
        with_stats: also return each target's position's mean logit and entropy of π.

    Returns:
        ``(logps, stats)``: (K,) log-probs in float32 (float64 for float64 models), with grad if the model trains;
        with ``with_stats`` (K, 2) mean logits and entropies (:func:`dpolab.fast.logit_stats.logit_stats`), else None.
    """
    if weight is not None:
        hidden = model.base_model(**inputs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.size(-1))[keep.reshape(-1)]
        if rows is None:
            rows = torch.arange(targets.numel(), device=targets.device)
        direct = grad_into_weight and torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
        stats = hidden.new_empty(hidden.size(0), 2, dtype=torch.promote_types(hidden.dtype, torch.float32)) \
            if with_stats else None
        logps = OutputLayerLogProb.apply(hidden, weight, rows, targets, direct, stats)
        return logps, None if stats is None else stats[rows]
    if scored_logits:
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.dim() == 2:  # (kept positions, V), row-major
            return label_logprobs(logits, rows, targets), logit_stats(logits, rows) if with_stats else None
    else:
        logits = model(**inputs).logits
    positions = keep.reshape(-1).nonzero().squeeze(-1)  # kept position -> flat index into (N * T)
    picked = positions if rows is None else positions[rows]
    logits = logits.flatten(0, 1)
    return label_logprobs(logits, picked, targets), logit_stats(logits, picked) if with_stats else None
