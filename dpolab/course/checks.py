"""The checks that the notebooks' graded test cells call: they compare a student's tensor with the library's
and, when they differ, say *how* (a shape, a sign, a missing mask), not only that they do.

A test cell names the classic mistakes of its exercise as tensors the library computes for them (the answer with
chosen and rejected swapped, without the mask, without β, ...); :func:`expect_close` reports the first one the
student's value matches. The tolerances are the caller's, from the mathematics: ~1e-10 in float64 for a few
operations on O(1) numbers, ~1e-5 relative in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


class ExerciseError(AssertionError):
    """An answer that the test cell rejects; the message says what is wrong and what to check."""


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def expect_tensor(name: str, value, shape: Sequence[int] | None = None) -> Tensor:
    """``value`` if it is a tensor of ``shape`` (when given); otherwise an :class:`ExerciseError` saying what it is.

    A Python number is taken as a float64 scalar where a scalar is expected (``shape`` ``()``).
    """
    if value is None:
        raise ExerciseError(f"{name} returned None: did the function forget to `return` its result?")
    if isinstance(value, int | float) and not isinstance(value, bool) and shape is not None and tuple(shape) == ():
        value = torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, Tensor):
        raise ExerciseError(f"{name} must be a torch.Tensor, got {_describe(value)}; compute it with torch "
                            "operations on the input tensors")
    if shape is not None and tuple(value.shape) != tuple(shape):
        hint = ""
        if value.dim() == 0 and len(shape) == 1:
            hint = " — one value per example is expected: no .mean() or .sum() over the batch"
        elif value.dim() > len(shape):
            hint = " — a dimension was not reduced (summed) away"
        raise ExerciseError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}{hint}")
    return value


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.isclose(a.detach().to(b.dtype), b.detach(), rtol=rtol, atol=atol,
                                                     equal_nan=False).all())


def expect_close(name: str, value, expected: Tensor, *, rtol: float = 0.0, atol: float = 1e-10,
                 mistakes: Mapping[str, Tensor] | None = None) -> None:
    """Pass when ``value`` equals ``expected`` within ``|value − expected| ≤ atol + rtol·|expected|``.

    Otherwise raise an :class:`ExerciseError` that says, in this order: a wrong type or shape; non-finite
    entries; the first of ``mistakes`` (description → the tensor that mistake gives) the value matches; or the
    largest difference, where it is, and the tolerance.
    """
    value = expect_tensor(name, value, expected.shape)
    if not torch.isfinite(value.detach()).all() and torch.isfinite(expected).all():
        where = tuple((~torch.isfinite(value.detach())).nonzero()[0].tolist())
        raise ExerciseError(f"{name} has a non-finite entry ({float(value.detach()[where])} at index {where}) where "
                            f"the library's value is {float(expected[where]):.6g}: a log of 0 or an overflow? "
                            "Work with log-probabilities and torch's stable functions (logsumexp, logsigmoid)")
    if _close(value, expected, rtol, atol):
        return
    for description, wrong in (mistakes or {}).items():
        if _close(value, wrong, max(rtol, 1e-6), max(atol, 1e-8)):
            raise ExerciseError(f"{name} is what you get with {description}")
    gap = (value.detach().to(expected.dtype) - expected).abs()
    where = tuple(torch.unravel_index(gap.argmax(), gap.shape)) if gap.dim() else ()
    where = tuple(int(i) for i in where)
    raise ExerciseError(f"{name} differs from the library's value by up to {float(gap.max()):.3g} (at index {where}: "
                        f"yours {float(value.detach()[where]):.6g}, expected {float(expected[where]):.6g}); the "
                        f"tolerance is {atol:g} + {rtol:g}·|expected|")


def expect_same_gradients(name: str, mine: Callable[..., Tensor], reference: Callable[..., Tensor],
                          inputs: Mapping[str, Tensor], *, rtol: float = 0.0, atol: float = 1e-10) -> None:
    """Pass when ∂Σ mine(*inputs)/∂input equals the reference's for every input; raise naming the input.

    Both functions are called with fresh leaf copies of the values of ``inputs`` (name → float tensor, in the
    order of the functions' arguments), so they see the test cell's values and the gradients are autograd's.
    """
    grads = []
    for fn in (mine, reference):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        out = fn(*leaves.values())
        if not isinstance(out, Tensor) or not out.requires_grad:
            raise ExerciseError(f"{name}: the result carries no gradient; compute it with torch operations on the "
                                "inputs (no .item(), float(), .numpy(), .detach() or torch.tensor(...) of a result)")
        got = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
        grads.append({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), got)})
    for key in inputs:
        if not _close(grads[0][key], grads[1][key], rtol, atol):
            gap = float((grads[0][key] - grads[1][key]).abs().max())
            raise ExerciseError(f"{name}: the gradient with respect to {key} differs from the library's by up to "
                                f"{gap:.3g} although the values agree; is part of the computation detached or "
                                "replaced by a constant?")


def expect_log_distribution(name: str, value, shape: Sequence[int], *, atol: float = 1e-10) -> None:
    """Pass when ``value`` (shape ``shape``) holds log-probabilities normalised over its last dimension.

    Says which dimension the student normalised over instead, or that the value holds probabilities, not logs.
    """
    value = expect_tensor(name, value, shape).detach()
    totals = value.logsumexp(-1)
    if bool((totals.abs() <= atol).all()):
        return
    if value.dim() > 1 and bool((value.logsumexp(0).abs() <= atol).all()):
        raise ExerciseError(f"{name} is normalised over dimension 0 (the prompts); it must be normalised over the "
                            "last dimension (the responses y of each prompt x)")
    if bool((value >= 0).all()) and bool(((value.sum(-1) - 1).abs() <= atol).all()):
        raise ExerciseError(f"{name} holds probabilities; return their logarithms")
    raise ExerciseError(f"{name} is not normalised over the last dimension: exp of each row sums to "
                        f"{totals.exp().flatten()[:4].tolist()}..., not 1; subtract log Z(x), a log-sum-exp per row")
