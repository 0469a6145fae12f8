"""Metrics under trl's names, logging_steps, and the trackers of report_to (TensorBoard, W&B offline)."""

import json
import sys

import pytest
from tiny_runs import FAST, make_examples

from dpolab.train import checkpoint as ckpt
from dpolab.train.config import ConfigError, TrainConfig
from dpolab.train.metrics import current_names, read_metrics
from dpolab.train.trackers import TENSORBOARD_DIR, Trackers, scalars
from dpolab.train.trainer import train

RUN = {**FAST, "micro_batch_size": 4, "grad_accum_steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``folder``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_carry_the_same_scalars_as_the_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    # an earlier run in the folder, replaced with overwrite: its events must not show among the new ones
    train({**RUN, "max_steps": 3, "lr": 3e-3, "report_to": ["tensorboard"], "output_dir": str(tmp_path)},
          train_pairs=make_examples(8))
    train({**RUN, "max_steps": 4, "eval_every": 2, "report_to": ["jsonl", "tensorboard"], "overwrite": True,
           "output_dir": str(tmp_path)}, train_pairs=make_examples(8), eval_pairs=make_examples(4, offset=50))
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(tmp_path / "metrics.jsonl"):
        for name, value in scalars(record).items():
            expected.setdefault(name, []).append((record["step"], value))
    found = _event_scalars(tmp_path / TENSORBOARD_DIR)
    assert {"loss", "learning_rate", "num_tokens", "rewards/margins", "eval_loss", "eval_rewards/accuracies"} \
        <= set(found)
    assert set(found) == set(expected)
    for name, points in expected.items():  # TensorBoard keeps float32
        assert [s for s, _ in found[name]] == [s for s, _ in points], name
        assert [v for _, v in found[name]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), name


def test_logging_steps_logs_every_nth_step_with_means_over_the_interval(tmp_path):
    result = train({**RUN, "max_steps": 5, "logging_steps": 2, "output_dir": str(tmp_path)},
                   train_pairs=make_examples(8))
    lines = read_metrics(tmp_path / "metrics.jsonl")
    steps = result.history
    assert [r["step"] for r in lines] == [2, 4, 5] and len(steps) == 5  # the last step is always logged
    for line, window in zip(lines, (steps[0:2], steps[2:4], steps[4:5])):
        for name in ("loss", "rewards/margins", "logps/chosen", "tokens_per_s"):
            assert line[name] == pytest.approx(sum(r[name] for r in window) / len(window), rel=1e-12), name
        for name in ("learning_rate", "grad_norm", "num_tokens", "epoch"):
            assert line[name] == window[-1][name], name


def test_logit_statistics_are_measured_on_the_logged_steps_only(tmp_path):
    """With logging_steps=2 the policy's logit and entropy statistics are measured at steps 2, 4 and 5 (the logged
    ones) and skipped at 1 and 3; the training is the same as with logging_steps=1 (every loss and gradient norm
    bit for bit, the statistics only read the logits), and each logged record carries its own step's statistics,
    equal to that step's under logging_steps=1."""
    every = train({**RUN, "max_steps": 5, "output_dir": str(tmp_path / "every")}, train_pairs=make_examples(8))
    some = train({**RUN, "max_steps": 5, "logging_steps": 2, "output_dir": str(tmp_path / "some")},
                 train_pairs=make_examples(8))
    names = ("logits/chosen", "logits/rejected", "entropy")
    assert [all(n in r for n in names) for r in some.history] == [False, True, False, True, True]
    assert all(all(n in r for n in names) for r in every.history)
    for a, b in zip(every.history, some.history, strict=True):
        assert (a["loss"], a["grad_norm"], a["rewards/margins"]) == (b["loss"], b["grad_norm"], b["rewards/margins"])
    lines = read_metrics(tmp_path / "some" / "metrics.jsonl")
    for line in lines:
        for name in names:
            assert line[name] == every.history[line["step"] - 1][name], (line["step"], name)


def test_wandb_offline_records_the_run_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train({**RUN, "max_steps": 2, "report_to": ["wandb"], "output_dir": str(tmp_path)},
                   train_pairs=make_examples(8))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    log = next(runs[0].glob("*.wandb")).read_bytes()  # the run's record log (protobuf): the metric names are in it
    assert all(name.encode() in log for name in scalars(result.history[-1]))


def test_the_wandb_run_holds_each_records_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path, config={"beta": 0.1})
    sent = []
    log = trackers.wandb.log
    trackers.wandb.log = lambda values, step: sent.append((step, values)) or log(values, step=step)
    try:
        trackers.log({"step": 1, "loss": 0.69, "learning_rate": 1e-3, "num_tokens": 120, "warnings": []})
        trackers.log({"step": 1, "eval_loss": 0.7, "eval_kl_note": "KL skipped", "eval_kl": float("nan")})
        assert sent == [(1, {"loss": 0.69, "learning_rate": 1e-3, "num_tokens": 120.0}), (1, {"eval_loss": 0.7})]
        assert trackers.wandb.config["beta"] == 0.1
    finally:
        trackers.close()


def test_a_missing_tracker_package_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb then raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dpolab\[wandb\]'"):
        Trackers(["wandb"], tmp_path, config={})


def test_report_to_names_are_checked():
    assert TrainConfig.load(None, ["report_to=tensorboard"]).report_to == ["tensorboard"]
    assert TrainConfig.load(None, ["report_to=none"]).report_to == ["none"]  # HF's spelling of no tracker
    with pytest.raises(ConfigError, match=r"'report_to': \['mlflow'\] not among"):
        TrainConfig.load(None, {"report_to": ["jsonl", "mlflow"]})


def test_old_metric_names_are_renamed():
    old = {"step": 3, "lr": 1e-3, "loss": 0.6, "eval/loss": 0.7, "eval/rewards/accuracies": 0.5}
    assert current_names(old) == {"step": 3, "learning_rate": 1e-3, "loss": 0.6, "eval_loss": 0.7,
                                  "eval_rewards/accuracies": 0.5}


def test_a_run_saved_with_the_old_metric_names_resumes_under_the_new_ones(tmp_path):
    """A checkpoint of a run from before the rename: metrics.jsonl with ``lr`` and ``eval/…``, and a config without
    the new fields. The resumed run renames the kept lines and continues num_tokens as an uninterrupted run."""
    config = {**RUN, "max_steps": 4, "save_every": 2, "eval_every": 2, "keep_last": 5}
    eval_pairs = make_examples(4, offset=50)
    straight = train({**config, "output_dir": str(tmp_path / "straight")}, train_pairs=make_examples(8),
                     eval_pairs=eval_pairs)
    old = tmp_path / "old"
    train({**config, "max_steps": 2, "output_dir": str(old)}, train_pairs=make_examples(8), eval_pairs=eval_pairs)
    renamed = {"learning_rate": "lr", **{k: "eval/" + k[len("eval_"):] for k in straight.eval_history[0]
                                         if k.startswith("eval_")}}
    lines = [{renamed.get(k, k): v for k, v in r.items() if k != "num_tokens"}
             for r in read_metrics(old / "metrics.jsonl")]
    assert "lr" in lines[0] and "eval/loss" in lines[-1]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    state_file = ckpt.latest_checkpoint(old) / ckpt.STATE
    state = json.loads(state_file.read_text())
    for name in ("dtype", "gradient_checkpointing", "lr_scheduler_type", "warmup_ratio", "num_train_epochs",
                 "report_to", "logging_steps"):
        del state["config"][name]
    state_file.write_text(json.dumps(state))

    resumed = train({**config, "output_dir": str(old), "resume_from": "auto"}, train_pairs=make_examples(8),
                    eval_pairs=eval_pairs)
    drop = {"tokens_per_s", "num_tokens"}  # num_tokens: the old lines never had it
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    assert resumed.history[-1]["num_tokens"] == straight.history[-1]["num_tokens"]  # continued, not restarted
    assert [r["eval_loss"] for r in resumed.eval_history] == [r["eval_loss"] for r in straight.eval_history]
    assert not any(k == "lr" or k.startswith("eval/") for r in read_metrics(old / "metrics.jsonl") for k in r)
