"""The learning-rate schedule: a linear warm-up, then constant, linear decay or cosine decay to 0.

The learning rate of an optimizer step is a pure function of the step and the config, so a resumed run sets
exactly the values the uninterrupted run set (nothing to save in the checkpoint). The decays are those of
transformers' ``get_scheduler`` under HF TrainingArguments' names (``lr_scheduler_type`` ``"linear"`` and
``"cosine"``); for step s (0-based) of T with W warm-up steps::

    warm-up (s < W):  lr · (s + 1) / (W + 1)           (never 0, so no step is wasted)
    constant:         lr
    linear:           lr · (T − s) / (T − W)
    cosine:           lr · ½ (1 + cos(π (s − W) / (T − W)))

The warm-up is dpolab's own (transformers' first step runs at lr 0); the decays equal transformers' factors
step for step.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up length: ``ceil(warmup_ratio · total_steps)`` when ``warmup_ratio`` > 0, else ``warmup_steps``."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else warmup_steps


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str = "constant") -> float:
    """Multiplier of the peak learning rate at the 0-based optimizer ``step`` of ``total_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / remaining)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / remaining)))


def learning_rate(step: int, config, total_steps: int) -> float:
    """The learning rate of 0-based optimizer ``step`` under a :class:`dpolab.train.config.TrainConfig`."""
    warmup = warmup_steps(total_steps, config.warmup_steps, config.warmup_ratio)
    return config.lr * lr_factor(step, total_steps=total_steps, warmup=warmup, kind=config.lr_scheduler_type)
