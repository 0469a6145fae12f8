"""Training metrics as JSON lines, and detectors for the failure patterns users ask about.

One line per optimizer step (``logging_steps``) and one per evaluation, with trl's and HF's names: ``loss``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (mean logit over the vocabulary and the response tokens),
``entropy`` (mean per-token entropy of π over the response tokens), ``learning_rate``, ``grad_norm``, ``num_tokens``
(input tokens trained so far), ``epoch``; plus the kit's ``tokens_per_s`` and ``lengths/*``. Evaluation lines carry the same names with the ``eval_`` prefix
(``eval_loss``, ``eval_rewards/accuracies``) and the sample-based ``eval_kl``.

Files written before these names (``lr``, ``eval/…``) are renamed when a run resumes from them
(:func:`current_names`): the resumed run's file then uses the new names throughout.

The detectors warn (:class:`TrainingWarning`) once per run:

- both log-probs falling: DPO raises the margin by pushing the chosen response down too, a known
  failure mode (the policy moves probability mass to responses that are in neither set);
- response length creeping up: samples from the policy grow from evaluation to evaluation, the
  length exploitation that length-normalised losses and SFT terms counter.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from dpolab.data.cache import atomic_write_text


class TrainingWarning(UserWarning):
    """A pattern in the metrics that usually means the run is going wrong."""


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or inf; raised before the optimizer step, so no bad weights are saved."""


class NonFiniteWeightsError(NonFiniteLossError):
    """A weight became NaN or inf; raised before a checkpoint is written, so none holds bad weights."""


EVAL_PREFIX = "eval_"
# metric names of files written before dpolab took trl's names: old name -> new name (and the eval/ prefix)
RENAMED = {"lr": "learning_rate"}
OLD_EVAL_PREFIX = "eval/"


def current_names(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the metric names of older dpolab versions (``lr``, ``eval/…``) renamed to trl's."""
    def name(key: str) -> str:
        if key.startswith(OLD_EVAL_PREFIX):
            return EVAL_PREFIX + key[len(OLD_EVAL_PREFIX):]
        return RENAMED.get(key, key)

    return {name(k): v for k, v in record.items()}


class MetricsWriter:
    """Append JSON lines to ``path``; on a resume, drop lines of steps after the checkpoint first.

    Args:
        path: The ``metrics.jsonl`` file.
        enabled: False on every process but rank 0 (the writer then does nothing).
        resume_step: None for a fresh run (the file is started empty), else the checkpoint's step.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = ([current_names(r) for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                if resume_step is not None else [])
        # a rewrite in place would leave a torn or empty file if the disk fills or the process dies during it
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite floats are written as null: JSON has no NaN)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _finite(v) for k, v in record.items()}, sort_keys=True) + "\n")


# Metrics that a logged record averages over its steps (trl logs the mean of each metric over the logging interval;
# the others, e.g. learning_rate, grad_norm and num_tokens, are the last step's, as in HF's Trainer).
_AVERAGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "lengths/chosen", "lengths/rejected", "logits/chosen", "logits/rejected", "entropy",
             "tokens_per_s")


def logged_record(window: list[dict[str, Any]]) -> dict[str, Any]:
    """The record logged for the steps of ``window``: the last step's, with the metrics of :data:`_AVERAGED` as
    means over the window and the warnings of every step (one step: that step's record itself)."""
    if len(window) == 1:
        return window[0]
    logged: dict[str, Any] = {}
    for record in window:
        logged.update({k: v for k, v in record.items() if k != "warnings"})
    for name in _AVERAGED:
        values = [r[name] for r in window if name in r]
        if values:
            logged[name] = sum(values) / len(values)
    logged["warnings"] = [w for r in window for w in r.get("warnings", [])]
    return logged


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file (empty if it does not exist).

    A torn *last* line is ignored (the process died while appending it); a bad line before the last is
    damage, and raises naming the file and the line rather than silently dropping every record after it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); the file is damaged. Repair or "
                             "remove that line to resume, or start a new run with overwrite=true") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object; the file is damaged")
        records.append(record)
    return records


class FallingLogpsDetector:
    """Warn when both ``logps/chosen`` and ``logps/rejected`` fell by more than ``tolerance`` nats.

    The comparison is between the mean of the first ``window`` steps and the mean of the latest
    ``window`` steps, so single noisy steps do not trigger it.
    """

    def __init__(self, window: int = 5, tolerance: float = 1.0):
        self.window, self.tolerance = window, tolerance
        self.history: list[tuple[float, float]] = []
        self.fired = False

    def update(self, step: int, chosen: float, rejected: float) -> str | None:
        """Add a step's mean log-probs; return the warning text the first time the pattern appears."""
        self.history.append((chosen, rejected))
        if self.fired or len(self.history) < 2 * self.window:
            return None
        first = [sum(v) / self.window for v in zip(*self.history[: self.window])]
        last = [sum(v) / self.window for v in zip(*self.history[-self.window :])]
        if first[0] - last[0] > self.tolerance and first[1] - last[1] > self.tolerance:
            self.fired = True
            return (f"step {step}: both logps/chosen ({first[0]:.2f} -> {last[0]:.2f}) and logps/rejected "
                    f"({first[1]:.2f} -> {last[1]:.2f}) have fallen; the margin grows because rejected falls faster, "
                    "and probability moves to responses in neither set. Consider a larger beta, an SFT term "
                    "(sft_weight), or a lower learning rate.")
        return None


class LengthCreepDetector:
    """Warn when the mean length of policy samples rose at each of the last ``rises`` evaluations
    and now exceeds the first evaluation's by more than ``relative`` (0.2 = 20 %)."""

    def __init__(self, rises: int = 2, relative: float = 0.2):
        self.rises, self.relative = rises, relative
        self.history: list[float] = []
        self.fired = False

    def update(self, step: int, mean_length: float) -> str | None:
        """Add an evaluation's mean sample length; return the warning text the first time it creeps."""
        self.history.append(mean_length)
        recent = self.history[-(self.rises + 1) :]
        if self.fired or len(recent) < self.rises + 1:
            return None
        rising = all(b > a for a, b in zip(recent, recent[1:]))
        if rising and mean_length > (1 + self.relative) * self.history[0]:
            self.fired = True
            return (f"step {step}: the mean length of policy samples crept up from {self.history[0]:.1f} to "
                    f"{mean_length:.1f} tokens over {len(self.history)} evaluations; the policy may be exploiting "
                    "length. Consider a length-normalised loss (simpo, ipo, sigmoid_norm), an SFT term, or a larger beta.")
        return None


class Monitor:
    """The run's detectors, fed with every step and evaluation record; warns once per pattern."""

    def __init__(self):
        self.falling, self.creeping = FallingLogpsDetector(), LengthCreepDetector()
        self.messages: list[str] = []

    def observe(self, record: dict[str, Any], emit: bool = True) -> list[str]:
        """The warnings this record triggers (issued as :class:`TrainingWarning` if ``emit``)."""
        found = []
        if "logps/rejected" in record:
            found.append(self.falling.update(record["step"], record["logps/chosen"], record["logps/rejected"]))
        if "eval_sample_length" in record:
            found.append(self.creeping.update(record["step"], record["eval_sample_length"]))
        found = [message for message in found if message]
        for message in found if emit else []:
            warnings.warn(message, TrainingWarning, stacklevel=2)
        self.messages += found
        return found


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
