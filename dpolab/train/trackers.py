"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and Weights & Biases (``report_to``, HF's name).

``metrics.jsonl`` is always written (a resumed run reads its history from it). Each tracker receives the same
records as that file, every numeric field as a scalar under the file's own name (``loss``, ``rewards/margins``,
``learning_rate``, ``eval_loss``, …) at the record's ``step``; text fields (warnings, notes) are left out. Each
tracker's package is an optional extra: ``pip install 'dpolab[tensorboard]'`` or ``'dpolab[wandb]'``.

- ``tensorboard``: event files in ``<output_dir>/runs``. A resumed run purges the events after its checkpoint's
  step, and a fresh run (overwrite=true, or the rerun of a failed run) all earlier events, so the curves hold
  each step once, of this run.
- ``wandb``: a run in ``<output_dir>/wandb`` (project ``$WANDB_PROJECT`` or "dpolab", the config as its config).
  ``WANDB_MODE=offline`` records without a network (``wandb sync`` uploads later). A resumed run continues the
  W&B run whose id is kept in ``<output_dir>/wandb_run_id``.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "runs"
WANDB_ID_FILE = "wandb_run_id"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record except ``step``, as floats (bools and text left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers named in ``report_to`` (``"jsonl"`` is the metrics file itself, written elsewhere).

    Args:
        report_to: tracker names (:data:`dpolab.train.config.TRACKERS`).
        output_dir: the run's folder.
        config: the run's config as a dict (W&B stores it).
        resume_step: the checkpoint's step when resuming, else None.
        enabled: False on every process but rank 0.
    """

    def __init__(self, report_to, output_dir: str | Path, *, config: dict[str, Any], resume_step: int | None = None,
                 enabled: bool = True):
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("report_to 'tensorboard' needs the package tensorboard: "
                                  "pip install 'dpolab[tensorboard]'") from err
            # readers drop the events of an earlier writer from this step on: those after a resumed checkpoint, or
            # all of an overwritten or failed earlier run
            purge = (resume_step or 0) + 1
            self.tensorboard = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("report_to 'wandb' needs the package wandb: pip install 'dpolab[wandb]'") from err
            id_file = out / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
            if run_id is None:
                run_id = uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpolab"), dir=str(out), id=run_id,
                                    name=out.name, config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics record (a step's or an evaluation's) to every tracker."""
        values = scalars(record)
        step = int(record["step"])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        """Flush and close every tracker (the W&B run is finished)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
