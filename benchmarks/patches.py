"""Variants of dpolab's training step that the benchmarks measure: the one place where a patch is defined.

A patch is what a library change does (or what undoing one does), applied from outside the library so that its
effect can be measured before it lands or after. Both benchmarks use these: ``dpo_throughput.py`` runs an arm
``dpolab+PATCH[+PATCH…]`` through :func:`dpolab.train.trainer.train`, and ``levers.py`` times a lever against the
trainer's own step (:func:`dpolab.train.step.optimizer_step`). Each patch is one of:

- a speed path switched off, through the library's own setting (:class:`dpolab.fast.paths.FastPaths`):
  ``two-rows`` (the two-row layout before :mod:`dpolab.fast.pairtree`: prompt + chosen and prompt + rejected as two
  padded rows), ``dense-embedding`` (the model's own lookup of a tied input embedding, a dense vocabulary-sized
  gradient per micro-batch), ``model-head`` (the model's own output layer on the scored positions,
  ``logits_to_keep``, instead of the fused one), ``full-logits`` (no speed path: the slow reference, logits at
  every position);
- trainer config fields: ``micro4`` (``micro_batch_size=4, grad_accum_steps=2`` instead of the default 8 × 1, the
  same global batch; the default before 2026-11-28), ``micro2`` (2 × 4), ``system-malloc``
  (``keep_freed_memory=False``: glibc's own thresholds; the trainer's setting is process-wide), ``grad-ckpt``
  (``gradient_checkpointing=True``: decoder layers recomputed in the backward pass, less activation memory);
- a module swap in the models: ``fused-gelu`` (GPT-2's Python-level tanh-GELU, six elementwise kernels and as
  many saved tensors, replaced by ``torch.nn.GELU(approximate="tanh")``, the same function in one kernel),
  ``compile`` (``torch.compile(dynamic=True)`` of every transformer block, policy and reference);
- a process setting: ``threads1`` (one torch thread).

None changes the mathematics: each keeps the first-step loss within float32 rounding of the unpatched step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from dpolab.fast.paths import FastPaths

# the FastPaths fields each patch switches off
FAST = {"two-rows": ("pair_tree",), "dense-embedding": ("sparse_embedding",), "model-head": ("fused_output_layer",),
        "full-logits": tuple(f.name for f in dataclasses.fields(FastPaths))}
FIELDS = {"micro4": {"micro_batch_size": 4, "grad_accum_steps": 2},
          "micro2": {"micro_batch_size": 2, "grad_accum_steps": 4},
          "system-malloc": {"keep_freed_memory": False},
          "grad-ckpt": {"gradient_checkpointing": True}}
THREADS = {"threads1": 1}


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


MODELS = {"fused-gelu": fuse_gelu, "compile": compile_blocks}
PATCHES = (*FAST, *FIELDS, *MODELS, *THREADS)


def check(patches) -> list[str]:
    """``patches`` as a list, refusing a name that is not a patch (it would time the unpatched step twice)."""
    unknown = sorted(set(patches) - set(PATCHES))
    if unknown:
        raise ValueError(f"unknown patches {unknown}; known: {', '.join(PATCHES)}")
    return list(patches)


def fast_paths(patches) -> FastPaths:
    """The speed-path setting of the library with ``patches`` applied."""
    return FastPaths(**{name: False for patch in check(patches) for name in FAST.get(patch, ())})


def config_fields(patches) -> dict:
    """Trainer config fields ``patches`` change."""
    return {k: v for patch in check(patches) for k, v in FIELDS.get(patch, {}).items()}


def patch_models(patches, models: list[torch.nn.Module]) -> None:
    """Apply the module swaps of ``patches`` to ``models`` in place."""
    for patch in check(patches):
        for model in models if patch in MODELS else ():
            MODELS[patch](model)


@contextlib.contextmanager
def process_settings(patches) -> Iterator[None]:
    """Within the block, the process settings of ``patches`` (the torch thread count) are in force."""
    threads = [THREADS[p] for p in check(patches) if p in THREADS]
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads[-1])
    try:
        yield
    finally:
        torch.set_num_threads(saved)
