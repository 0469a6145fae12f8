"""Evaluated models as typed rows, saved one per small JSON file, for sweeps and rankings to collect.

A notebook or an experiment samples a policy on held-out prompts and saves what it measured as a
:class:`ModelRow` (:func:`save_model_row`); the sweep table (:func:`dpolab.cli.sweep.collect`) and the ranking report
(:mod:`dpolab.experiments.ranking_report`) read them back with :func:`load_model_rows`. A file holds the row's flat
JSON object (:meth:`ModelRow.to_dict`): one key per field that is set, plus what else the row carried.

Rows saved by earlier versions named the held-out implicit-reward accuracy differently (:data:`OLD_ACCURACY_KEYS`);
:meth:`ModelRow.from_dict` reads those names, and nothing else does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.data.cache import atomic_write_text, from_repo_root

OLD_ACCURACY_KEYS = ("implicit_accuracy", "eval_rewards/accuracies", "eval/rewards/accuracies")
"""Earlier names of :attr:`ModelRow.heldout_acc`, looked up in the row, then in its ``final_metrics``:
``implicit_accuracy`` (the first notebooks), trl's ``eval_rewards/accuracies`` (a trainer's last eval record) and
``eval/rewards/accuracies`` (that record before dpolab took trl's ``eval_`` prefix)."""


@dataclass
class ModelRow:
    """One policy evaluated on held-out prompts: its mean reward and KL to π_ref, and the per-prompt rewards
    that rankings compare prompt by prompt. Optional fields are None when the row did not measure them."""

    policy: str
    """Name of the policy (``dpo_beta0.1``, ``best-of-4``, ``reference``)."""
    method: str | None = None
    """The family the policy belongs to: "Reference", "DPO", "Preferred-FT", "Best of N", ..."""
    source: str = ""
    """What saved the row (a notebook, an experiment); rows of several sources may share a policy name."""
    reward: float | None = None
    """Mean ground-truth reward over all sampled responses."""
    reward_se: float | None = None
    """Its standard error."""
    kl: float | None = None
    """KL(π‖π_ref) per response in nats (sample mean of the log-ratio, or Best-of-N's analytic value)."""
    kl_se: float | None = None
    """Its standard error."""
    judge: float | None = None
    """Mean score of the second judge."""
    judge_se: float | None = None
    """Its standard error."""
    n_samples: int | None = None
    """Responses the means are taken over."""
    n: int | None = None
    """N of a Best-of-N or worst-of-N policy."""
    beta: float | None = None
    """β the policy was trained with."""
    heldout_acc: float | None = None
    """Implicit-reward accuracy on held-out preference pairs (ties ½)."""
    heldout_acc_se: float | None = None
    """Its standard error."""
    heldout_pairs: int | None = None
    """Held-out pairs behind ``heldout_acc``."""
    heldout_prompts: int | None = None
    """Held-out prompts those pairs come from."""
    prompts: list[str] | None = None
    """The held-out prompts, in evaluation order (rankings compare models on the prompts they share)."""
    prompt_rewards: list[float] | None = None
    """Mean ground-truth reward of the policy's responses to each prompt. Shape: (P,)."""
    prompt_lengths: list[float] | None = None
    """Mean response length in tokens per prompt. Shape: (P,)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Everything else the row carried (``examples``, ``final_metrics``, a curve's ``knob`` and ``step``, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object of the row: every field that is set, then ``extra``'s entries."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "row") -> ModelRow:
        """A row from its flat dict (a saved file, an evaluation's result); ``where`` names it in errors.

        Keys that are no field go to ``extra``; the held-out accuracy under an earlier name
        (:data:`OLD_ACCURACY_KEYS`) becomes ``heldout_acc``.
        """
        if "policy" not in data:
            raise ValueError(f"{where} (?), field 'policy': missing; save rows with dpolab.evaluate.results.save_model_row")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in OLD_ACCURACY_KEYS}
        if values.get("heldout_acc") is None:
            values["heldout_acc"] = _old_accuracy(data)
        return cls(**values, extra=extra)


def _old_accuracy(data: Mapping[str, Any]) -> float | None:
    for place in (data, data.get("final_metrics") or {}):
        for key in OLD_ACCURACY_KEYS:
            value = place.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
    return None


def save_model_row(row: ModelRow | Mapping[str, Any], folder: str | Path = "runs/models", source: str = "") -> Path:
    """Write one evaluated policy to ``folder/<source>__<policy>.json`` (atomically) and return the path.

    ``row`` is a :class:`ModelRow` or its dict (as the evaluation functions return it); ``source`` (e.g. the
    notebook and its parameters) keeps policies of the same name from different runs apart. Relative folders are
    taken from the repository root.
    """
    row = row if isinstance(row, ModelRow) else ModelRow.from_dict(row)
    row = dataclasses.replace(row, source=source)
    name = f"{source}__{row.policy}" if source else row.policy
    path = from_repo_root(folder) / f"{name}.json"
    atomic_write_text(path, json.dumps(row.to_dict(), indent=1, default=float))
    return path


def load_model_rows(folder: str | Path = "runs/models") -> list[ModelRow]:
    """Every row saved with :func:`save_model_row` in ``folder`` (sorted by file name); [] when none."""
    rows = []
    for path in sorted(from_repo_root(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a valid results file ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a saved model row (a JSON object expected)")
        rows.append(ModelRow.from_dict(data, where=str(path)))
    return rows
