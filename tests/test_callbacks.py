"""dpolab.train.callbacks: early stopping and the best checkpoint, against hand-worked sequences of evaluations; and
in the training loop: the stop with its checkpoint and reason, the replay of a resumed run, the best model at the end."""

import math

import pytest
import torch
from tiny_runs import FAST, make_examples

from dpolab.train import checkpoint as ckpt
from dpolab.train.callbacks import (
    BestCheckpointCallback,
    CallbackList,
    EarlyStoppingCallback,
    StepFunction,
    TrainerCallback,
    config_callbacks,
    default_greater_is_better,
)
from dpolab.train.config import TrainConfig
from dpolab.train.metrics import read_metrics
from dpolab.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


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
        def on_evaluate(self, step, metrics, control):
            seen.append(("evaluate", step))

        def on_save(self, step, folder, control):
            seen.append(("save", step))

        def on_step(self, step, record, control):
            seen.append(("step", step))
            control.should_stop = step >= 2

    callbacks = CallbackList([Recorder()])
    for step in (1, 2):
        callbacks.on_evaluate(step, {"eval_loss": 0.0})
        callbacks.on_save(step, "folder")
        callbacks.on_step(step, {"loss": 0.0})
    assert seen == [("evaluate", 1), ("save", 1), ("step", 1), ("evaluate", 2), ("save", 2), ("step", 2)]
    assert callbacks.control.should_stop


def test_a_nan_written_as_null_never_improves():
    """metrics.jsonl writes NaN as null; a replayed null evaluation is NaN, not an error."""
    stop = EarlyStoppingCallback(patience=1)
    callbacks = CallbackList([stop])
    callbacks.on_evaluate(10, {"step": 10, "eval_loss": 1.0})
    callbacks.on_evaluate(20, {"step": 20, "eval_loss": None})
    assert callbacks.control.should_stop and stop.best.value == 1.0


def test_config_callbacks_follow_the_transformers_names():
    config = TrainConfig.load(None, {"eval_every": 2, "early_stopping_patience": 3, "early_stopping_threshold": 0.01,
                                     "metric_for_best_model": "rewards/accuracies"})
    callbacks, best = config_callbacks(config, on_step=lambda step, record: None)
    stop = callbacks.callbacks[0]
    assert isinstance(stop, EarlyStoppingCallback) and (stop.patience, stop.best.threshold) == (3, 0.01)
    assert stop.best.metric == best.best.metric == "eval_rewards/accuracies"  # HF adds the eval_ prefix
    assert stop.best.greater_is_better and best.best.greater_is_better  # HF's default by name
    assert isinstance(callbacks.callbacks[-1], StepFunction)
    assert config_callbacks(TrainConfig.load(None, {}))[1] is None  # nothing asks for a best checkpoint


def test_pruning_keeps_the_folders_it_is_told_to_keep(tmp_path):
    state = {"w": torch.ones(2)}
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model_state=state, optimizer_state={}, config={}, metrics={}, seed=0,
                             rng_states=[ckpt.capture_rng_state()], keep_last=1, keep=[ckpt.checkpoint_dir(tmp_path, 2)])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    ckpt.prune_checkpoints(tmp_path, 1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004"]


# --- in the training loop ------------------------------------------------------------------------------------------

RUN = {**FAST, "max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 1, "eval_batch_size": 4, "eval_every": 1,
       "save_every": 2, "keep_last": 1}
# an improvement of more than 1e9 never happens: the first evaluation stays the best and every later one is "bad",
# so patience p stops the run after evaluation p + 1 whatever the numbers
NEVER_BETTER = {"early_stopping_patience": 3, "early_stopping_threshold": 1e9}


def run(tmp_path, name, **kwargs):
    fields = {**RUN, **NEVER_BETTER, "output_dir": str(tmp_path / name), **kwargs.pop("fields", {})}
    return train(fields, train_pairs=make_examples(12), eval_pairs=make_examples(4, offset=40), **kwargs)


def numbers(lines):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


def test_early_stopping_writes_the_last_checkpoint_and_says_why(tmp_path):
    """Evaluations at steps 1-4: the first is the best, 2, 3 and 4 are not -> patience 3 stops after step 4 (a save
    step), and a resumed run of the stopped run stops at once, with the same reason."""
    result = run(tmp_path, "stopped")
    assert result.step == 4 and [r["step"] for r in result.history] == [1, 2, 3, 4]
    assert result.stop_reason.startswith("early stopping at step 4: eval_loss has not improved")
    lines = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert lines[-1] == {"step": 4, "stop_reason": result.stop_reason}
    assert result.checkpoint == ckpt.checkpoint_dir(tmp_path / "stopped", 4)
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step-000004"
    again = run(tmp_path, "stopped", fields={"resume_from": "auto"})
    assert again.step == 4 and again.stop_reason == result.stop_reason
    assert [r["step"] for r in again.history] == [1, 2, 3, 4]  # read back: no step was trained again
    assert read_metrics(tmp_path / "stopped" / "metrics.jsonl") == lines


def test_a_callback_that_stops_between_saves_gets_its_checkpoint(tmp_path):
    seen = []

    class StopAtThree(TrainerCallback):
        def on_evaluate(self, step, metrics, control):
            seen.append(("evaluate", step))

        def on_save(self, step, folder, control):
            seen.append(("save", step))

        def on_step(self, step, record, control):
            seen.append(("step", step))
            if step == 3:
                control.should_stop, control.reason = True, "enough"

    result = run(tmp_path, "custom", fields={"early_stopping_patience": 0}, callbacks=[StopAtThree()])
    assert seen == [("evaluate", 1), ("step", 1), ("evaluate", 2), ("save", 2), ("step", 2), ("evaluate", 3),
                    ("step", 3), ("save", 3)]
    assert result.stop_reason == "enough" and result.best_checkpoint is None
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "custom")] == ["step-000003"]  # keep_last 1


def test_an_interrupted_and_resumed_run_stops_exactly_where_the_uninterrupted_one_does(tmp_path):
    """Killed after step 3 (checkpoint at 2): the resumed run replays evaluations 1 and 2 (one bad so far) and stops
    after step 4 like the straight run; without the replay it would count from scratch and stop after step 6."""
    straight = run(tmp_path, "straight")

    def die(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", on_step=die)
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-000002"
    resumed = run(tmp_path, "resumed", fields={"resume_from": "auto"})
    assert (resumed.step, resumed.stop_reason) == (straight.step, straight.stop_reason)
    assert numbers(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == \
        numbers(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == \
        [p.name for p in ckpt.list_checkpoints(tmp_path / "straight")]
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_best_model_at_end_returns_the_best_checkpoint_kept_beyond_keep_last(tmp_path):
    """Saves and evaluations every step, keep_last 1, the best by the largest eval_loss (greater_is_better): the run
    returns that checkpoint's weights and names it, and pruning kept it beside the last one."""
    result = run(tmp_path, "best", fields={"max_steps": 4, "save_every": 1, "early_stopping_patience": 0,
                                           "load_best_model_at_end": True, "greater_is_better": True})
    losses = {r["step"]: r["eval_loss"] for r in result.eval_history}
    best_step = max(losses, key=losses.get)
    assert best_step < 4, losses  # the loss falls as the policy trains: the best is not the last checkpoint
    best = ckpt.checkpoint_dir(tmp_path / "best", best_step)
    assert result.checkpoint == result.best_checkpoint == best and result.stop_reason is None
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "best")] == [best.name, "step-000004"]
    saved = ckpt.load_checkpoint(best).model_state
    assert all(torch.equal(value, saved[name]) for name, value in result.model.state_dict().items())


def test_the_best_checkpoint_needs_evaluation_pairs(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience and load_best_model_at_end decide on evaluations"):
        train({**RUN, **NEVER_BETTER, "output_dir": str(tmp_path)}, train_pairs=make_examples(12))
