"""Proposed dpolab changes, applied from outside so that the benchmark can measure them before they land.

Each patch is what a library change would do, done by monkeypatching or by swapping modules in the models
handed to :func:`dpolab.train.trainer.train`; an arm named ``dpolab+PATCH[+PATCH…]`` runs with them. None changes
the mathematics: each keeps the first-step loss within float32 rounding of the unpatched trainer.

- ``two-rows``: the layout before :mod:`dpolab.fast.pairtree` (prompt + chosen and prompt + rejected as two padded
  rows), to measure the pair-tree layout that the library now uses by default.
- ``dense-embedding``: the model's own lookup of a tied input embedding (a dense vocabulary-sized gradient per
  micro-batch) instead of dpolab's sparse-gradient lookup.
- ``model-head``: the model's own output layer on the scored positions (``logits_to_keep``) instead of dpolab's
  fused output layer (which holds neither the (positions, vocabulary) logits nor a second weight gradient).
- ``fused-gelu``: GPT-2's Python-level tanh-GELU (``NewGELUActivation``, six elementwise kernels and as many
  saved tensors) replaced by ``torch.nn.GELU(approximate="tanh")``, the same function in one kernel.
- ``micro4``: ``micro_batch_size=4, grad_accum_steps=2`` instead of the default 8 × 1 (same global batch; the
  default before 2026-11-28).
- ``micro2``: ``micro_batch_size=2, grad_accum_steps=4`` (same global batch, a quarter of the activations at a time).
- ``system-malloc``: ``keep_freed_memory=False``, glibc's own thresholds (freed blocks go back to the system).
- ``compile``: ``torch.compile(dynamic=True)`` of every transformer block (policy and reference).
- ``threads1``: one torch thread.
"""

from __future__ import annotations

import contextlib

import torch

PATCHES = ("two-rows", "dense-embedding", "model-head", "fused-gelu", "micro4", "micro2", "system-malloc", "compile", "threads1")
# trainer config fields that a patch changes
FIELDS = {"micro4": {"micro_batch_size": 4, "grad_accum_steps": 2},
          "micro2": {"micro_batch_size": 2, "grad_accum_steps": 4},
          "system-malloc": {"keep_freed_memory": False}}


def config_fields(patches: list[str]) -> dict:
    """Trainer config fields a set of patches changes."""
    fields: dict = {}
    for patch in patches:
        fields.update(FIELDS.get(patch, {}))
    return fields


def fuse_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``NewGELUActivation`` for ``nn.GELU(approximate="tanh")`` (identical function, one kernel)."""
    from transformers.activations import NewGELUActivation

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Compile each transformer block in place (the model object and its forward signature stay the same)."""
    base = model.base_model
    blocks = getattr(base, "h", None) or base.layers
    for block in blocks:
        block.compile(dynamic=True)
    return model


@contextlib.contextmanager
def applied(patches: list[str], models: list[torch.nn.Module]):
    """Apply ``patches`` to the process and to ``models`` for the duration of the block."""
    unknown = set(patches) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown patches {sorted(unknown)}; known: {', '.join(PATCHES)}")
    for model in models:
        if "fused-gelu" in patches:
            fuse_gelu(model)
        if "compile" in patches:
            compile_blocks(model)
    if "threads1" in patches:
        torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if "two-rows" in patches:
            import dpolab.logprobs

            stack.enter_context(_attribute(dpolab.logprobs, "supports_shared_prompt", lambda model: False))
        if "dense-embedding" in patches:
            import dpolab.logprobs

            stack.enter_context(_attribute(dpolab.logprobs, "SPARSE_TIED_EMBEDDING", False))
        if "model-head" in patches:
            import dpolab.logprobs

            stack.enter_context(_attribute(dpolab.logprobs, "FUSED_OUTPUT_LAYER", False))
        yield


@contextlib.contextmanager
def _attribute(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)
