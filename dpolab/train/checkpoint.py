"""Checkpoints: safetensors weights, a readable JSON of the run, optimiser and RNG state; atomic; the last N kept.

Layout of one checkpoint (``<output_dir>/checkpoints/step-000012/``)::

    model.safetensors     policy weights (tied weights stored once, their aliases in the file's metadata)
    trainer_state.json    step, seed, config, the step's metrics, world size, library versions, the model trained
                          (name or weight digest), the training data's fingerprint, and the SHA-256 of the files
    optimizer.pt          optimiser state (tensors and numbers only; loaded with weights_only=True)
    rng_state.pt          torch / CUDA / Python / NumPy generator states of every process
    COMPLETE              written last: a folder without it is never resumed from

The folder is written under a temporary name and renamed into place (:func:`dpolab.cache.build_artifact`),
so a crash or a kill during saving leaves the previous checkpoints intact and no half-written one. Weights
that are not finite are never written. Loading verifies every file against its stored digest, so a flipped
bit is refused with the file named. Old checkpoints are pruned by renaming them out of the ``step-N`` name
first (atomic), then deleting, so a kill during pruning never leaves a half-deleted folder that looks complete.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpolab.cache import build_artifact, is_complete, sha256_file
from dpolab.train.metrics import NonFiniteWeightsError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng_state.pt"
METRICS = "metrics.jsonl"
FAILED_METRICS = "metrics.failed.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DIGESTED = (WEIGHTS, OPTIMIZER, RNG)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, from another run); the message names the file."""

# Fields that may change between an interrupted run and its resumption without changing its trajectory.
RESUMABLE_FIELDS = frozenset(
    {"max_steps", "resume_from", "progress", "keep_freed_memory", "save_every", "keep_last", "eval_every", "output_dir", "overwrite",
     "device", "train_data", "eval_data", "eval_batch_size", "kl_samples", "kl_max_new_tokens", "num_train_epochs",
     "report_to", "logging_steps"}
)
# The fields that set a run's length: free to change on resume only while the learning-rate schedule ignores it.
LENGTH_FIELDS = ("max_steps", "num_train_epochs")


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
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
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
) -> Path:
    """Write the checkpoint of step ``step`` atomically, then delete all but the ``keep_last`` newest.

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
    prune_checkpoints(output_dir, keep_last)
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


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and leftovers of interrupted saves.

    Each old folder is first renamed out of the ``step-N`` pattern (one atomic rename), then deleted: a kill
    in between leaves a stray folder that nothing reads and the next prune removes, never a ``step-N``
    folder with its COMPLETE marker but half its files.
    """
    root = Path(output_dir) / CHECKPOINTS
    for old in list_checkpoints(output_dir)[:-keep_last]:
        doomed = old.with_name(f"{old.name}.pruned-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        Path(str(old) + ".lock").unlink(missing_ok=True)
    for pattern in ("step-*.tmp-*", "step-*.pruned-*"):
        for stray in root.glob(pattern) if root.is_dir() else []:
            shutil.rmtree(stray, ignore_errors=True)


def resume_point(config, *, is_main: bool = True, world_size: int = 1) -> Checkpoint | None:
    """Where a run starts, checked before any work: None for a fresh run, else the checkpoint to resume.

    Fails when the output folder cannot be written, when a fresh run would mix its files with an earlier
    run's (unless ``config.overwrite``, which deletes them), and when the checkpoint's config differs from
    ``config`` in a field that changes the run (all such fields are named) or in the global batch size.

    Args:
        config: the run's :class:`dpolab.train.config.TrainConfig`.
        is_main: only the main process creates, probes and cleans the folder.
        world_size: number of processes of this run (part of the global batch size).
    """
    out = Path(config.output_dir)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
        except OSError as err:
            raise OSError(f"output folder {out} is not writable ({err}); set output_dir to a writable folder") from err
    folder = latest_checkpoint(out) if config.resume_from == "auto" else config.resume_from or None
    if folder is None:
        found = earlier_run(out)
        if is_main and found:
            if not config.overwrite:
                if config.resume_from == "auto":  # nothing to resume, but starting over would destroy these files
                    raise FileExistsError(f"resume_from=auto found no complete checkpoint in {out / CHECKPOINTS}, but "
                                          f"the folder holds an earlier run ({', '.join(found)}); set overwrite=true to "
                                          "start over and replace it, or choose another output_dir")
                raise FileExistsError(f"output folder {out} holds an earlier run ({', '.join(found)}); resume it with "
                                      "resume_from=auto, set overwrite=true, or choose another output_dir")
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            (out / METRICS).unlink(missing_ok=True)
        return None
    resume = load_checkpoint(folder)
    defaults = type(config)().to_dict() if hasattr(type(config), "to_dict") else {}
    # a field the checkpoint does not know was added later: it had its default value
    saved = {**defaults, **resume.config}
    differences = config_differences(saved, config.to_dict())
    differences += _length_differences(saved, config.to_dict())
    saved_global = resume.config["micro_batch_size"] * resume.config["grad_accum_steps"] * resume.world_size
    now_global = config.micro_batch_size * config.grad_accum_steps * world_size
    if saved_global != now_global:
        differences.append(f"global batch (micro × accumulation × processes): checkpoint {saved_global}, "
                           f"now {now_global}")
    if differences:
        raise ValueError(f"cannot resume from {folder}: the config differs in fields that change the run:\n  "
                         + "\n  ".join(differences) + "\nset them to the checkpoint's values to resume it (runs "
                         "saved before the default became micro_batch_size=8, grad_accum_steps=1 need 4 and 2), "
                         "or start a new run with overwrite=true or another output_dir")
    if resume.step > config.max_steps and not getattr(config, "num_train_epochs", 0):  # epochs: checked with the data
        raise ValueError(f"checkpoint {folder} is at step {resume.step}, beyond max_steps={config.max_steps}")
    return resume


def _length_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """A changed run length, when the learning-rate schedule depends on it (a decay, or warmup_ratio > 0): the
    steps already taken had other learning rates than the longer or shorter run would give them."""
    if current.get("lr_scheduler_type", "constant") == "constant" and not current.get("warmup_ratio"):
        return []
    names = ["num_train_epochs"] if current.get("num_train_epochs") else list(LENGTH_FIELDS)
    return [f"{n}: checkpoint {saved.get(n)!r}, now {current.get(n)!r} (the {current['lr_scheduler_type']!r} "
            f"schedule with warmup_ratio {current.get('warmup_ratio')} depends on the number of steps)"
            for n in names if saved.get(n) != current.get(n)]


def earlier_run(out: Path) -> list[str]:
    """What in ``out`` belongs to an earlier run: complete or partial checkpoints, and the metrics file."""
    found = []
    root = out / CHECKPOINTS
    steps = [p.name for p in root.iterdir() if _STEP_DIR.match(p.name)] if root.is_dir() else []
    complete = len(list_checkpoints(out))
    if complete:
        found.append(f"{complete} complete checkpoint(s)")
    if len(steps) > complete:
        found.append(f"{len(steps) - complete} incomplete checkpoint folder(s)")
    if (out / METRICS).exists():
        found.append(f"{METRICS} with {len(read_metrics_quiet(out / METRICS))} record(s)")
    return found


def read_metrics_quiet(path: Path) -> list:
    """The records of a metrics file, or [] if it is damaged (only counted for a message)."""
    from dpolab.train.metrics import read_metrics

    try:
        return read_metrics(path)
    except ValueError:
        return []


def check_resume_state(resume: Checkpoint, current: dict[str, Any]) -> None:
    """Refuse to resume when an entry of ``trainer_state.json`` recorded at the start (the training data's
    fingerprint ``data``, the model ``model``) differs from this run's; the error names the entry."""
    for key, value in current.items():
        saved = resume.state.get(key)
        if saved is None or value is None:
            continue  # a checkpoint from before the entry was recorded
        if saved != value:
            raise CheckpointError(
                f"cannot resume from {resume.folder}: trainer_state.json field {key!r} differs (checkpoint "
                f"{_short(saved)}, now {_short(value)}): "
                + ("the training data changed" if key == "data" else "the starting model changed")
                + "; resume with the same inputs, or start a new run with overwrite=true or another output_dir")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore=RESUMABLE_FIELDS) -> list[str]:
    """Human-readable ``"field: checkpoint X, now Y"`` for every field that differs and matters to the run."""
    names = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{n}: checkpoint {saved.get(n, '<absent>')!r}, now {current.get(n, '<absent>')!r}"
            for n in names if saved.get(n) != current.get(n)]


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

    The folder's ``model.safetensors`` then loads with ``dpolab.models.load_model(folder)``. A peft
    model's adapter is saved in ``adapter/`` instead (load the base model, then the adapter with peft).
    """
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder / "adapter")
        return
    if hasattr(model, "config") and hasattr(model.config, "to_json_string"):
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
