"""dpolab.train.callbacks: early stopping and the best checkpoint, against hand-worked sequences of evaluations."""

import math

import pytest

from dpolab.train.callbacks import (
    BestCheckpointCallback,
    CallbackList,
    EarlyStoppingCallback,
    TrainerCallback,
    default_greater_is_better,
)


def evaluate_all(callbacks, values, metric="eval_loss"):
    """Evaluate at steps 10, 20, ... with ``values``; return the step after which the loop would stop (or None)."""
    for i, value in enumerate(values):
        step = 10 * (i + 1)
        callbacks.on_evaluate(step, {"step": step, metric: value})
        callbacks.on_save(step, f"step-{step}")
        if callbacks.control.should_stop:
            return step
    return None


def test_greater_is_better_follows_the_metric_name():
    assert default_greater_is_better("eval_loss") is False
    assert default_greater_is_better("eval_rewards/accuracies") is True


def test_early_stopping_by_hand():
    """Losses 1.0, 0.8, 0.85, 0.79, 0.9, 0.95 with patience 2: 0.85 is worse (1 bad), 0.79 improves (reset),
    0.9 and 0.95 are two bad evaluations -> stop after step 60."""
    stop = EarlyStoppingCallback(patience=2)
    callbacks = CallbackList([stop])
    assert evaluate_all(callbacks, [1.0, 0.8, 0.85, 0.79, 0.9, 0.95]) == 60
    assert stop.best.value == 0.79 and stop.best.step == 40
    assert "eval_loss has not improved on 0.79 (step 40) for 2 evaluations" in callbacks.control.reason


def test_early_stopping_threshold_and_direction():
    """threshold 0.05: 0.8 -> 0.78 is not an improvement (gain 0.02), so patience 1 stops at the second evaluation;
    accuracy (higher is better) 0.5, 0.6, 0.55 with patience 1 stops at the third."""
    assert evaluate_all(CallbackList([EarlyStoppingCallback(patience=1, threshold=0.05)]), [0.8, 0.78]) == 20
    accuracy = "eval_rewards/accuracies"
    assert evaluate_all(CallbackList([EarlyStoppingCallback(accuracy, patience=1)]), [0.5, 0.6, 0.55],
                        metric=accuracy) == 30
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStoppingCallback(patience=0)


def test_nan_never_improves_and_a_missing_metric_is_named():
    stop = EarlyStoppingCallback(patience=2)
    assert evaluate_all(CallbackList([stop]), [math.nan, 1.0, math.nan, math.nan]) == 40
    assert stop.best.value == 1.0
    with pytest.raises(KeyError, match=r"'eval_margin' is not among the evaluation's metrics \['eval_loss', 'step'\]"):
        EarlyStoppingCallback("eval_margin").on_evaluate(10, {"step": 10, "eval_loss": 1.0}, None)


def test_best_checkpoint_counts_only_evaluated_saves():
    """Evaluations at 10, 20, 30 (loss 0.9, 0.7, 0.8); saves at 10, 15 (no evaluation), 20, 30 -> best step-20."""
    best = BestCheckpointCallback()
    callbacks = CallbackList([best])
    for step, loss in ((10, 0.9), (15, None), (20, 0.7), (30, 0.8)):
        if loss is not None:
            callbacks.on_evaluate(step, {"step": step, "eval_loss": loss})
        callbacks.on_save(step, f"step-{step}")
    assert best.folder == "step-20" and best.best.value == 0.7


def test_replay_reaches_the_same_state_as_the_uninterrupted_run():
    """A resumed run replays its earlier evaluations: the callbacks end where an uninterrupted run's would."""
    losses = [1.0, 0.8, 0.85, 0.79, 0.9]
    straight = [EarlyStoppingCallback(patience=3), BestCheckpointCallback()]
    evaluate_all(CallbackList(straight), losses)
    resumed = [EarlyStoppingCallback(patience=3), BestCheckpointCallback()]
    replayed = CallbackList(resumed)
    replayed.replay([{"step": 10 * (i + 1), "eval_loss": v} for i, v in enumerate(losses[:3])],
                    lambda step: f"step-{step}")
    evaluate_all_from = [(40, 0.79), (50, 0.9)]
    for step, v in evaluate_all_from:
        replayed.on_evaluate(step, {"step": step, "eval_loss": v})
        replayed.on_save(step, f"step-{step}")
    assert (resumed[0].bad_evaluations, resumed[0].best.value) == (straight[0].bad_evaluations, straight[0].best.value)
    assert resumed[1].folder == straight[1].folder == "step-40"


def test_a_custom_callback_sees_every_hook_in_order():
    seen = []

    class Recorder(TrainerCallback):
        def on_step(self, step, record, control):
            seen.append(("step", step))

        def on_evaluate(self, step, metrics, control):
            seen.append(("evaluate", step))

        def on_save(self, step, folder, control):
            seen.append(("save", step))
            control.should_stop = step >= 2

    callbacks = CallbackList([Recorder()])
    for step in (1, 2):
        callbacks.on_step(step, {"loss": 0.0})
        callbacks.on_evaluate(step, {"eval_loss": 0.0})
        callbacks.on_save(step, "folder")
    assert seen == [("step", 1), ("evaluate", 1), ("save", 1), ("step", 2), ("evaluate", 2), ("save", 2)]
    assert callbacks.control.should_stop
