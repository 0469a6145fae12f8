"""Which device a run uses: the config fields ``device`` and ``use_cpu``, resolved once, the same way everywhere.

``device`` is ``"auto"`` (CUDA when this machine has it, else the CPU: what a transformers ``Trainer`` does),
``"cpu"`` or ``"cuda[:N]"``. ``use_cpu`` is the name ``TrainingArguments`` (and so trl's configs) gives to
"train on the CPU even where CUDA is available"; it means ``device: cpu``. HF has no field that names a GPU (it
reads ``CUDA_VISIBLE_DEVICES`` and ``LOCAL_RANK``), hence ``device`` beside it, as in ``pipeline(device=...)``.
Under torchrun each process takes GPU ``LOCAL_RANK`` (:func:`dpolab.train.distributed.setup`).

Settings that only help a CPU run (the glibc allocator tuning of :mod:`dpolab.fast.allocator`, the sparse
embedding gradient of :mod:`dpolab.fast.embedding`) ask :func:`is_cpu` and stay off everywhere else.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
"""The values of the config field ``device`` (``cuda`` may carry an index: ``cuda:1``)."""


def check_device(device: str, use_cpu: bool = False) -> None:
    """Raise ``ValueError`` for a ``device`` that is not auto/cpu/cuda[:N], or ``use_cpu`` with a CUDA device."""
    head, _, index = device.partition(":")
    if head not in DEVICES or (index and (head != "cuda" or not index.isdigit())):
        raise ValueError(f"config field 'device' must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if use_cpu and head == "cuda":
        raise ValueError(f"config fields 'use_cpu' (true) and 'device' ({device!r}) disagree; use_cpu means device: cpu")


def resolve_device(device: str = "auto", use_cpu: bool = False) -> torch.device:
    """The ``torch.device`` of a single-process run; an error naming the setting when CUDA is asked for but absent."""
    check_device(device, use_cpu)
    if use_cpu or device == "cpu":
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available on this machine (torch {torch.__version__}"
                           f"{', a CPU-only build' if torch.version.cuda is None else ''}); use device: auto or cpu")
    return torch.device(device)


def is_cpu(device: torch.device | str) -> bool:
    """Whether CPU-only settings (allocator tuning, sparse embedding gradients) apply on ``device``."""
    return torch.device(device).type == "cpu"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
