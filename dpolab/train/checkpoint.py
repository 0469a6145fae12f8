"""Checkpoints: safetensors weights, a readable JSON of the run, optimiser and RNG state; atomic; the last N kept.

Layout of one checkpoint (``<output_dir>/checkpoints/step-000012/``)::

    model.safetensors     policy weights (tied weights stored once, their aliases in the file's metadata)
    trainer_state.json    step, seed, config, the step's metrics, world size, library versions, the model trained
                          (name or weight digest), the training data's fingerprint, and the SHA-256 of the files
    optimizer.pt          optimiser state (tensors and numbers only; loaded with weights_only=True)
    rng_state.pt          torch / CUDA / Python / NumPy generator states of every process
    COMPLETE              written last: a folder without it is never resumed from
    config.json           the model's config (with generation_config.json and the tokenizer files): transformers
                          and :func:`dpolab.models.load_model` load the folder as a model
    adapter_config.json   a LoRA run's instead of config.json: the adapter in peft's format, with
                          adapter_model.safetensors (its tensors) and peft's README.md; load_model loads the base
                          model that adapter_config.json names, then the adapter

The folder is written under a temporary name and renamed into place (:func:`dpolab.data.cache.build_artifact`),
so a crash or a kill during saving leaves the previous checkpoints intact and no half-written one. Weights
that are not finite are never written. Loading verifies every file against its stored digest, so a flipped
bit is refused with the file named. Old checkpoints are pruned by renaming them out of the ``step-N`` name
first (atomic), then deleting, so a kill during pruning never leaves a half-deleted folder that looks complete.
Whether a run may resume from one is :mod:`dpolab.train.resume`.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpolab.data.cache import build_artifact, is_complete, sha256_file
from dpolab.train.metrics import NonFiniteWeightsError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng_state.pt"
METRICS = "metrics.jsonl"
FAILED_METRICS = "metrics.failed.jsonl"
STEP_DIR = re.compile(r"^step-(\d+)$")
"""The name of a checkpoint folder (``step-000012``)."""
_DIGESTED = (WEIGHTS, OPTIMIZER, RNG)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, from another run); the message names the file."""



@dataclass
class Checkpoint:
    """A loaded checkpoint. ``model_state`` has every parameter name, tied ones included."""

    folder: Path
    step: int
    seed: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    world_size: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_states: list[dict[str, Any]]
    state: dict[str, Any] = field(default_factory=dict)  # the whole trainer_state.json (model, data, versions, …)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint after optimizer step ``step``."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
    seed: int,
    rng_states: list[dict[str, Any]],
    keep_last: int,
    export: Callable[[Path], None] | None = None,
    extra: dict[str, Any] | None = None,
    keep: Iterable[str | Path] = (),
) -> Path:
    """Write the checkpoint of step ``step`` atomically, then delete all but the ``keep_last`` newest (and ``keep``).

    Call it on one process only (rank 0); ``rng_states`` holds one entry per process. ``export(folder)``
    may add files (e.g. the model's ``config.json`` and tokenizer, so transformers can load the folder).
    ``extra`` adds entries to ``trainer_state.json`` (the trainer's: ``model``, ``data``). Raises
    :class:`NonFiniteWeightsError` (writing nothing) when a weight is NaN or inf.
    """
    check_finite(model_state, f"the weights of step {step}")

    def build(tmp: Path) -> None:
        tensors, aliases = _dedupe_tied(model_state)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"aliases": json.dumps(aliases), "format": "pt"})
        torch.save(optimizer_state, tmp / OPTIMIZER)
        torch.save(rng_states, tmp / RNG)
        state = {**(extra or {}), "step": step, "seed": seed, "world_size": len(rng_states), "config": config,
                 "metrics": metrics, "versions": versions(), "sha256": {n: sha256_file(tmp / n) for n in _DIGESTED}}
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=_json_default) + "\n")
        if export is not None:
            export(tmp)

    folder = build_artifact(checkpoint_dir(output_dir, step), build, info={"step": step})
    prune_checkpoints(output_dir, keep_last, keep=keep)
    return folder


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor of ``state`` holding a NaN or an inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(f"{what}: {name} holds {bad} non-finite value(s); no checkpoint written (the "
                                        "previous ones are intact). Lower lr, or set max_grad_norm > 0")


def load_checkpoint(folder: str | Path, *, verify: bool = True) -> Checkpoint:
    """Read a complete checkpoint folder; every error names the folder or the file, and says what to do.

    With ``verify`` (default) each file is checked against the SHA-256 stored when it was written (checkpoints
    written before digests were stored are read unchecked).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not is_complete(folder):
        raise CheckpointError(f"checkpoint folder {folder} is incomplete (no COMPLETE marker); resume from an "
                              "earlier one")
    advice = "resume from an earlier checkpoint (pass its folder as resume_from), or start over with overwrite=true"
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state, dict) or not {"step", "seed", "config", "world_size"} <= set(state):
            raise ValueError("missing entries")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / STATE} is damaged or unreadable ({err}); {advice}") from None
    for name, digest in (state.get("sha256") or {}).items() if verify else ():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from a complete checkpoint; {advice}")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match the SHA-256 stored when it was written (the file is "
                                  f"damaged or was changed); {advice}")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            model_state = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        for alias, name in aliases.items():
            model_state[alias] = model_state[name]
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read ({type(err).__name__}: {err}); {advice}") from None
    loaded = {}
    for name in (OPTIMIZER, RNG):
        try:
            loaded[name] = torch.load(folder / name, weights_only=True)
        except Exception as err:  # a damaged pickle raises anything from EOFError to UnpicklingError
            raise CheckpointError(f"{folder / name} cannot be read ({type(err).__name__}: {err}); {advice}") from None
    return Checkpoint(
        folder=folder, step=state["step"], seed=state["seed"], config=state["config"],
        metrics=state.get("metrics", {}), world_size=state["world_size"], model_state=model_state,
        optimizer_state=loaded[OPTIMIZER], rng_states=loaded[RNG], state=state,
    )


def prune_checkpoints(output_dir: str | Path, keep_last: int, *, keep: Iterable[str | Path] = ()) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and leftovers of interrupted saves. The folders
    in ``keep`` (the best checkpoint of a run that tracks one) are never deleted.

    Each old folder is first renamed out of the ``step-N`` pattern (one atomic rename), then deleted: a kill
    in between leaves a stray folder that nothing reads and the next prune removes, never a ``step-N``
    folder with its COMPLETE marker but half its files.
    """
    root = Path(output_dir) / CHECKPOINTS
    kept = {Path(folder).resolve() for folder in keep}
    for old in list_checkpoints(output_dir)[:-keep_last]:
        if old.resolve() in kept:
            continue
        doomed = old.with_name(f"{old.name}.pruned-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        Path(str(old) + ".lock").unlink(missing_ok=True)
    for pattern in ("step-*.tmp-*", "step-*.pruned-*"):
        for stray in root.glob(pattern) if root.is_dir() else []:
            shutil.rmtree(stray, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy generator states, as tensors, lists and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers."""
    import transformers

    import dpolab

    return {"dpolab": dpolab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def export_pretrained(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Add what transformers needs to load a checkpoint folder: config.json and the tokenizer files.

    The folder's ``model.safetensors`` then loads with ``dpolab.models.load_model(folder)``. A peft model's
    adapter is saved instead of config.json, in peft's format (``adapter_config.json`` naming the base model,
    ``adapter_model.safetensors``): ``load_model(folder)``, peft's ``AutoPeftModelForCausalLM`` and transformers
    load the base model, then the adapter. (A config.json beside it would make transformers read the peft-named
    ``model.safetensors`` as the base model's weights.)
    """
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder)
    elif hasattr(model, "config") and hasattr(model.config, "to_json_string"):
        (folder / "config.json").write_text(model.config.to_json_string())
        if getattr(model, "generation_config", None) is not None:
            (folder / "generation_config.json").write_text(model.generation_config.to_json_string())
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return ``(tensors, {alias: stored_name})``."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # a different view of an already stored buffer must be copied: safetensors refuses shared memory
        tensor = tensor.detach().cpu()
        tensors[name] = tensor.clone() if ptr in storages else tensor.contiguous()
        storages.add(ptr)
    return tensors, aliases


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
