"""Callbacks of the training loop: hooks after an evaluation, a save and a step; early stopping; the best checkpoint.

The loop (:func:`dpolab.train.trainer.train`) calls, in this order within one optimizer step,

    on_evaluate(step, metrics, control)  after a held-out evaluation (metrics with trl's ``eval_`` names)
    on_save(step, folder, control)       after a checkpoint is written
    on_step(step, record, control)       when the step is complete (its record, evaluation and checkpoint)

and stops after the step in which a callback set ``control.should_stop`` (the stopped run's last checkpoint is
written first, so it can be resumed or used, and ``control.reason`` goes to metrics.jsonl and the result). Under
torch.distributed rank 0's callbacks decide and every process follows. ``train(on_step=f)`` is
:class:`StepFunction` (``f(step, record)`` after the step's checkpoint, as it always ran). Names follow
transformers' ``TrainerCallback`` and ``EarlyStoppingCallback`` and TrainingArguments' ``metric_for_best_model``,
``greater_is_better`` and ``load_best_model_at_end``; :func:`config_callbacks` builds them from those config fields.

A resumed run replays its earlier evaluations into the callbacks (:meth:`CallbackList.replay`), so early stopping
and the best checkpoint decide exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainerControl:
    """What the callbacks ask of the loop: stop after this step (``reason`` says why)."""

    should_stop: bool = False
    reason: str = ""


class TrainerCallback:
    """Base class: override any hook. ``record``/``metrics`` are the dicts written to metrics.jsonl."""

    def on_evaluate(self, step: int, metrics: dict[str, Any], control: TrainerControl) -> None:
        pass

    def on_save(self, step: int, folder, control: TrainerControl) -> None:
        pass

    def on_step(self, step: int, record: dict[str, Any], control: TrainerControl) -> None:
        pass


class StepFunction(TrainerCallback):
    """A plain ``fn(step, record)`` (``train``'s ``on_step`` argument) as a callback."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]):
        self.fn = fn

    def on_step(self, step, record, control):
        self.fn(step, record)


def default_greater_is_better(metric: str) -> bool:
    """TrainingArguments' default: a metric whose name ends in "loss" is better lower, any other higher."""
    return not metric.endswith("loss")


def eval_metric_name(metric: str) -> str:
    """TrainingArguments' rule: ``metric_for_best_model`` names an evaluation metric, ``eval_`` added if missing."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def metric_value(metrics: dict[str, Any], metric: str) -> float:
    """``metrics[metric]`` as a float (NaN for None: metrics.jsonl writes NaN as null); a metric the evaluation does
    not record is an error naming what it has."""
    if metric not in metrics:
        have = sorted(k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
        raise KeyError(f"metric_for_best_model {metric!r} is not among the evaluation's metrics {have}")
    return math.nan if metrics[metric] is None else float(metrics[metric])


class BestMetric:
    """The best value of one metric so far and the step it came from; NaN never counts as an improvement.

    ``improves(value)`` is True when ``value`` beats the best by more than ``threshold`` in the metric's direction
    (always for the first finite value).
    """

    def __init__(self, metric: str, greater_is_better: bool | None = None, threshold: float = 0.0):
        self.metric = metric
        self.greater_is_better = default_greater_is_better(metric) if greater_is_better is None else greater_is_better
        self.threshold = threshold
        self.value: float | None = None
        self.step: int | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        gain = value - self.value if self.greater_is_better else self.value - value
        return gain > self.threshold

    def update(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step`` if it improves; return whether it did."""
        if self.improves(value):
            self.value, self.step = value, step
            return True
        return False


class EarlyStoppingCallback(TrainerCallback):
    """Stop when ``metric`` has not improved by more than ``threshold`` for ``patience`` evaluations in a row
    (transformers' ``early_stopping_patience`` and ``early_stopping_threshold``)."""

    def __init__(self, metric: str = "eval_loss", patience: int = 1, threshold: float = 0.0,
                 greater_is_better: bool | None = None):
        if patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {patience}")
        if not threshold >= 0.0:
            raise ValueError(f"early_stopping_threshold must be >= 0, got {threshold}")
        self.best = BestMetric(metric, greater_is_better, threshold)
        self.patience = patience
        self.bad_evaluations = 0

    def on_evaluate(self, step, metrics, control):
        if self.best.update(step, metric_value(metrics, self.best.metric)):
            self.bad_evaluations = 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            control.should_stop = True
            control.reason = (f"early stopping at step {step}: {self.best.metric} has not improved on "
                              f"{self.best.value:.6g} (step {self.best.step}) for {self.bad_evaluations} evaluations")


class BestCheckpointCallback(TrainerCallback):
    """Track the checkpoint with the best ``metric``: a checkpoint counts when it is saved at the step of an
    evaluation (so save_every should be a multiple of eval_every). ``folder`` is the best one so far; the loop
    keeps it on disk beyond ``keep_last`` and, with ``load_best_model_at_end``, loads it at the end."""

    def __init__(self, metric: str = "eval_loss", greater_is_better: bool | None = None):
        self.best = BestMetric(metric, greater_is_better)
        self.last_evaluation: tuple[int, float] | None = None
        self.folder = None

    def on_evaluate(self, step, metrics, control):
        self.last_evaluation = (step, metric_value(metrics, self.best.metric))

    def on_save(self, step, folder, control):
        if self.last_evaluation is not None and self.last_evaluation[0] == step:
            if self.best.update(step, self.last_evaluation[1]):
                self.folder = folder


class CallbackList:
    """Calls every callback's hook in order, with one shared :class:`TrainerControl`."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)
        self.control = TrainerControl()

    def on_evaluate(self, step, metrics):
        for callback in self.callbacks:
            callback.on_evaluate(step, metrics, self.control)

    def on_save(self, step, folder):
        for callback in self.callbacks:
            callback.on_save(step, folder, self.control)

    def on_step(self, step, record):
        for callback in self.callbacks:
            callback.on_step(step, record, self.control)

    def kept_folders(self) -> set:
        """The checkpoint folders that must outlive ``keep_last``: the best of each :class:`BestCheckpointCallback`."""
        return {c.folder for c in self.callbacks if isinstance(c, BestCheckpointCallback) and c.folder is not None}

    def replay(self, evaluations, saved_folder_of) -> None:
        """Feed a resumed run's earlier evaluations (records with ``step``) to the callbacks, and the checkpoint
        each step saved (``saved_folder_of(step)``, None where none was saved), as they happened."""
        for metrics in evaluations:
            self.on_evaluate(metrics["step"], metrics)
            folder = saved_folder_of(metrics["step"])
            if folder is not None:
                self.on_save(metrics["step"], folder)


def config_callbacks(config, callbacks: Sequence[TrainerCallback] = (),
                     on_step: Callable[[int, dict[str, Any]], None] | None = None,
                     ) -> tuple[CallbackList, BestCheckpointCallback | None]:
    """The run's callbacks: early stopping and the best checkpoint as a :class:`dpolab.train.config.TrainConfig`
    asks (``early_stopping_patience`` > 0, ``load_best_model_at_end``), then ``callbacks``, then ``on_step``.

    Returns:
        ``(callbacks, best)``: ``best`` is the config's :class:`BestCheckpointCallback` (None when neither early
        stopping nor ``load_best_model_at_end`` asks for evaluations to pick a checkpoint).
    """
    metric = eval_metric_name(config.metric_for_best_model)
    built: list[TrainerCallback] = []
    if config.early_stopping_patience:
        built.append(EarlyStoppingCallback(metric, config.early_stopping_patience, config.early_stopping_threshold,
                                           config.greater_is_better))
    best = None
    if config.early_stopping_patience or config.load_best_model_at_end:
        best = BestCheckpointCallback(metric, config.greater_is_better)
        built.append(best)
    built += list(callbacks)
    if on_step is not None:
        built.append(StepFunction(on_step))
    return CallbackList(built), best
