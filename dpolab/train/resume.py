"""Resuming a run: where it starts (fresh, or the checkpoint to resume), and the checks that refuse a resume
that would not continue the same trajectory (a changed config field, global batch, schedule length, training
data or starting model), each error naming what differs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dpolab.train.checkpoint import (
    CHECKPOINTS,
    METRICS,
    STEP_DIR,
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from dpolab.train.metrics import read_metrics

# Fields that may change between an interrupted run and its resumption without changing its trajectory.
RESUMABLE_FIELDS = frozenset(
    {"max_steps", "resume_from", "progress", "keep_freed_memory", "save_every", "keep_last", "eval_every", "output_dir", "overwrite",
     "device", "use_cpu", "train_data", "eval_data", "eval_batch_size", "kl_samples", "kl_max_new_tokens", "num_train_epochs",
     "report_to", "logging_steps", "train_split", "eval_split", "dataset_num_proc"}
)
# The fields that set a run's length: free to change on resume only while the learning-rate schedule ignores it.
LENGTH_FIELDS = ("max_steps", "num_train_epochs")



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
    steps = [p.name for p in root.iterdir() if STEP_DIR.match(p.name)] if root.is_dir() else []
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
