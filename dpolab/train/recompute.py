"""Gradient checkpointing: the decoder layers' activations are recomputed in the backward pass, not kept.

transformers' own mechanism does the work (``activation_checkpointing_enable``, non-reentrant
``torch.utils.checkpoint`` around each decoder layer). It checkpoints only the repeated layers, so dpolab's fast
paths compose with it unchanged: the pair tree's mask and position ids go into the layers as before, and the fused
output layer (:mod:`dpolab.fast.output_layer`) runs on the final hidden states outside any checkpoint.

transformers checkpoints a layer only while the layer is in training mode, and dpolab keeps the policy in eval
mode (dropout off, so that log-prob ratios are deterministic). :func:`recomputing` therefore marks only the
checkpointed layer modules themselves as training, for the duration of the backward passes of a step: their
dropout and attention submodules stay in eval mode, so the numbers are those of the run without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dpolab.fast.paths import unwrap


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Switch on transformers' checkpointing of every decoder layer of ``model`` (non-reentrant)."""
    net = unwrap(model)
    if not getattr(net, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(net).__name__} does not support gradient checkpointing; "
                         "set gradient_checkpointing=false")
    net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer modules that recompute their activations (empty when checkpointing is off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@contextlib.contextmanager
def recomputing(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the checkpointed layers of ``model`` (if any) recompute in the backward pass.

    Sets ``training`` on those layer modules only (not recursively: dropout stays off) and restores it after.
    """
    layers = checkpointed_layers(model)
    saved = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.training = flag
