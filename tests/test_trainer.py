"""The training loop: exact accumulation, SFT and DPO, metrics, NaN stop, bad input, checkpoints and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_runs import FAST, make_examples

from dpolab.data.batch import collate_pairs
from dpolab.data.prepare import prepare_pairs, tokenize_config
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train import checkpoint as ckpt
from dpolab.train.config import TrainConfig
from dpolab.train.metrics import NonFiniteLossError, read_metrics
from dpolab.train.objective import Objective
from dpolab.train.reference import make_reference
from dpolab.train.step import accumulate_gradients
from dpolab.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grads(config, batches, model, reference):
    model.zero_grad(set_to_none=True)
    n_pairs = sum(b.num_pairs for b in batches)
    totals, bad = accumulate_gradients(model, reference, batches, objective=Objective.from_config(config),
                                       scale=1.0 / n_pairs)
    assert bad is None
    return totals, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_k_micro_batches_of_b_give_the_gradient_of_one_batch_of_kb(stage):
    """4 pairs of unequal lengths: one batch of 4 (padded to the longest of all) vs 2×2 vs 4×1 (each padded
    to its own longest). Per-pair losses summed and divided by the 4 pairs of the global batch make the
    accumulated gradient ∇ (1/4) Σ_i L_i in every split; a per-micro-batch mean of a per-token loss would not."""
    model, tok = tiny_causal_lm("gpt2", seed=0)
    model.eval()
    config = TrainConfig.load(None, {**FAST, "stage": stage, "beta": 0.5})
    pairs = prepare_pairs(make_examples(4), tok, tokenize_config(config)).pairs
    assert len({len(p.chosen_ids) for p in pairs}) > 1 and len({len(p.rejected_ids) for p in pairs}) > 1
    reference = make_reference("copy", model)
    with torch.no_grad():  # move the policy away from its reference, so the DPO gradient is not the one at θ_ref
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def split(size):
        return [collate_pairs(pairs[i : i + size], tok.pad_token_id, index=list(range(i, i + size)))
                for i in range(0, 4, size)]

    full_totals, full = _grads(config, split(4), model, reference)
    for size in (2, 1):
        totals, grads = _grads(config, split(size), model, reference)
        torch.testing.assert_close(totals, full_totals, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full.keys()
        for name in full:
            torch.testing.assert_close(grads[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_end_to_end_matches_one_big_batch(tmp_path):
    runs = {}
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        result = train({**FAST, "max_steps": 3, "micro_batch_size": micro, "grad_accum_steps": accum,
                        "output_dir": str(tmp_path / f"{micro}x{accum}")}, train_pairs=make_examples(12))
        runs[micro] = result.history
    for micro in (2, 1):
        for a, b in zip(runs[4], runs[micro]):
            for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "lengths/rejected"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (micro, a["step"], key)


def test_dpo_run_writes_metric_lines_evaluates_and_learns(tmp_path):
    train_examples, heldout = make_examples(24), make_examples(8, offset=100)
    result = train({**FAST, "max_steps": 12, "micro_batch_size": 4, "grad_accum_steps": 1, "eval_every": 6,
                    "kl_samples": 4, "kl_max_new_tokens": 6, "beta": 0.5, "output_dir": str(tmp_path)},
                   train_pairs=train_examples, eval_pairs=heldout)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and [r["step"] for r in evals] == [6, 12]
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "learning_rate", "grad_norm", "num_tokens", "tokens_per_s", "lengths/chosen",
             "lengths/rejected"}
    assert names <= set(steps[0])
    assert {"eval_rewards/accuracies", "eval_kl", "eval_kl_se", "eval_sample_length"} <= set(evals[0])
    assert steps[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # π_θ = π_ref at step 1
    assert steps[0]["rewards/accuracies"] == 0.5  # all rewards 0: ties count ½
    assert steps[0]["learning_rate"] == pytest.approx(0.5e-3) and steps[1]["learning_rate"] == pytest.approx(1e-3)
    # num_tokens: input tokens of both sides (prompt twice, no padding) of every pair trained so far, as trl's
    pairs = prepare_pairs(train_examples, result.tokenizer, tokenize_config(TrainConfig.load(None, FAST))).pairs
    per_epoch = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert steps[5]["num_tokens"] == per_epoch and steps[11]["num_tokens"] == 2 * per_epoch  # 6 steps of 4 = 1 epoch
    assert all(a["num_tokens"] < b["num_tokens"] for a, b in zip(steps, steps[1:]))
    assert result.eval_history[-1]["eval_rewards/accuracies"] > 0.5  # the positive words generalise to new pairs
    assert sum(r["loss"] for r in steps[-3:]) / 3 < steps[0]["loss"]
    assert result.history == steps and result.step == 12
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000012"]


def test_sft_stage_lowers_the_nll_of_chosen_responses(tmp_path):
    result = train({**FAST, "stage": "sft", "max_steps": 8, "micro_batch_size": 4, "grad_accum_steps": 1,
                    "lr": 3e-3, "output_dir": str(tmp_path)}, train_pairs=make_examples(16))
    first, last = result.history[0], result.history[-1]
    assert set(first) == {"step", "epoch", "learning_rate", "grad_norm", "loss", "logps/chosen", "lengths/chosen",
                          "num_tokens", "tokens_per_s", "warnings"}
    assert first["loss"] == pytest.approx(-first["logps/chosen"] / first["lengths/chosen"], rel=0.3)
    assert last["loss"] < first["loss"] - 0.5


def test_saved_final_checkpoint_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    result = train({**FAST, "max_steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1,
                    "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_nan_stops_with_step_and_batch_and_keeps_good_checkpoints(tmp_path):
    model, tok = tiny_causal_lm("gpt2", seed=0)
    calls = {"n": 0}

    def poison(module, args, output):  # forward 3 = step 2, micro-batch 0: NaN hidden states, so NaN logits
        calls["n"] += 1
        if calls["n"] == 3:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.base_model.register_forward_hook(poison)  # runs with or without the model's own output layer
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 .*micro-batch 0 of 2 on this process "
                                                 r"\(dataset rows \[\d+, \d+\]\)"):
        train({**FAST, "max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "save_every": 1,
               "reference": "none", "loss": "reference_free", "output_dir": str(tmp_path)},
              model=model, tokenizer=tok, train_pairs=make_examples(16))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    import dpolab.train.trainer

    monkeypatch.setattr(dpolab.train.trainer, "load_policy", lambda *a, **k: pytest.fail("loaded a model"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=rf"output folder {blocker}/run is not writable"):
        train({**FAST, "output_dir": str(blocker / "run")}, train_pairs=make_examples(8))


def test_fresh_run_refuses_an_earlier_runs_folder_unless_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        train({**FAST, "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    result = train({**FAST, "output_dir": str(tmp_path), "overwrite": True, "max_steps": 1, "micro_batch_size": 4,
                    "grad_accum_steps": 1}, train_pairs=make_examples(8))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1] and result.step == 1


def test_too_few_pairs_for_one_global_batch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="3 training pairs are fewer than one global batch of 8"):
        train({**FAST, "output_dir": str(tmp_path)}, train_pairs=make_examples(3))


KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in this process: a different thread count may sum in a different order
sys.path.insert(0, {tests!r})
from test_trainer import RESUME
from tiny_runs import make_examples
from dpolab.train.trainer import train

def die(step, record):
    if step == 3:  # step 3 is done but not checkpointed: the resumed run must redo it
        os.kill(os.getpid(), signal.SIGKILL)

train({{**RESUME, **{extra!r}, "output_dir": {out!r}}}, train_pairs=make_examples(20), on_step=die)
"""
RESUME = {**FAST, "max_steps": 5, "micro_batch_size": 2, "grad_accum_steps": 2, "save_every": 2, "keep_last": 3}
# a decaying schedule whose warm-up is a share of the run: the resumed steps must get the same learning rates
COSINE = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.2}


@pytest.mark.parametrize("extra", [{}, COSINE], ids=["constant", "cosine"])
def test_a_killed_and_resumed_run_ends_bit_for_bit_equal_to_an_uninterrupted_one(tmp_path, extra):
    script = textwrap.dedent(KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(tmp_path / "resumed"),
                                               extra=extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]

    resumed = train({**RESUME, **extra, "output_dir": str(tmp_path / "resumed"), "resume_from": "auto"},
                    train_pairs=make_examples(20))
    straight = train({**RESUME, **extra, "output_dir": str(tmp_path / "straight")}, train_pairs=make_examples(20))
    if extra:  # warm-up ceil(0.2 × 5) = 1 step at lr/2, then cos from 1 down to (1 + cos(3π/4)) / 2 at step 5
        expected_lr = [0.5e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
        assert [r["learning_rate"] for r in straight.history] == pytest.approx(expected_lr, rel=1e-12)
    a, b = weights(resumed.model), weights(straight.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    drop = {"tokens_per_s"}
    lines = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed/metrics.jsonl")]
    expected = [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    assert lines == expected  # steps 1-2 from the killed run, 3-5 redone after the resume, none twice


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    train({**RESUME, "max_steps": 2, "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    with pytest.raises(ValueError, match=r"config differs.*\n  beta: checkpoint 0.1, now 0.5\n  lr: checkpoint 0.001, "
                                         r"now 0.002"):
        train({**RESUME, "beta": 0.5, "lr": 2e-3, "output_dir": str(tmp_path), "resume_from": "auto"},
              train_pairs=make_examples(8))
    with pytest.raises(ValueError, match="global batch .*checkpoint 4, now 8"):
        train({**RESUME, "micro_batch_size": 4, "output_dir": str(tmp_path), "resume_from": "auto"},
              train_pairs=make_examples(8))
    # same global batch cut differently: other float rounding, so not bit-exact; the error says how to resume
    with pytest.raises(ValueError, match=r"grad_accum_steps: checkpoint 2, now 1\n  micro_batch_size: checkpoint 2, "
                                         r"now 4\nset them to the checkpoint's values"):
        train({**RESUME, "micro_batch_size": 4, "grad_accum_steps": 1, "output_dir": str(tmp_path),
               "resume_from": "auto"}, train_pairs=make_examples(8))
    state = json.loads((ckpt.latest_checkpoint(tmp_path) / ckpt.STATE).read_text())
    assert state["step"] == 2 and state["config"]["beta"] == 0.1


def test_command_line_trains_from_yaml_and_jsonl(tmp_path, capsys):
    from dpolab.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                            for e in make_examples(8)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-gpt2\ntrain_data: {data}\neval_data: {data}\nprogress: false\nkl_samples: 0\n")
    assert main(["train", str(config), "max_steps=2", "micro_batch_size=4", "grad_accum_steps=1",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final"]["step"] == 2 and "eval_rewards/accuracies" in summary["final"]
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_falling_logps_detector_fires_once_when_both_sides_fall():
    """Window 5, tolerance 1 nat: steps 1-5 at (-10, -20), steps 6-10 at (-12, -23): both means fell by more
    than 1 (by 2 and 3), so step 10 warns; nothing earlier (fewer than 2 windows) and nothing after (once)."""
    from dpolab.train.metrics import FallingLogpsDetector

    detector = FallingLogpsDetector(window=5, tolerance=1.0)
    fired = [detector.update(s, -10.0, -20.0) for s in range(1, 6)] + [detector.update(s, -12.0, -23.0)
                                                                      for s in range(6, 12)]
    assert [s + 1 for s, m in enumerate(fired) if m] == [10]
    assert "logps/chosen (-10.00 -> -12.00)" in fired[9]
    rising = FallingLogpsDetector(window=5, tolerance=1.0)  # rejected falls, chosen holds: the healthy pattern
    assert not any(rising.update(s, -10.0, -20.0 - s) for s in range(1, 20))


def test_length_creep_detector_needs_a_sustained_rise():
    from dpolab.train.metrics import LengthCreepDetector

    detector = LengthCreepDetector(rises=2, relative=0.2)
    assert [detector.update(s, n) for s, n in [(1, 10.0), (2, 13.0), (3, 11.0), (4, 11.5)]] == [None] * 4
    assert detector.update(5, 12.5) is not None  # rose twice in a row and 12.5 > 1.2 × 10
    noisy = LengthCreepDetector(rises=2, relative=0.2)
    assert not any(noisy.update(s, n) for s, n in enumerate([10.0, 10.5, 11.0, 9.0, 9.5, 10.2], start=1))


def test_metrics_writer_resume_drops_later_steps_and_a_torn_line(tmp_path):
    from dpolab.train.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    writer = MetricsWriter(path, resume_step=2)
    writer.write({"step": 3, "loss": float("nan")})
    assert read_metrics(path) == [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"step": 3, "loss": None}]
    MetricsWriter(path, enabled=False).write({"step": 9})  # other ranks write nothing
    assert len(read_metrics(path)) == 3


@pytest.mark.parametrize("stage, layout", [("dpo", "tree"), ("sft", "rows")])
def test_batches_are_bucketed_by_the_width_of_the_layout_that_runs(tmp_path, monkeypatch, stage, layout):
    """A GPT-2 policy runs DPO on pair-tree rows, so its batches are bucketed by prompt + chosen + rejected;
    SFT runs prompt + chosen rows and keeps the two-row width."""
    import dpolab.train.step as step_module
    from dpolab.data.batch import pair_length

    seen = []
    original = step_module.BatchPlan.__init__
    monkeypatch.setattr(step_module.BatchPlan, "__init__",
                        lambda self, lengths, *a: seen.append(list(lengths)) or original(self, lengths, *a))
    examples = make_examples(16)
    result = train({**FAST, "stage": stage, "max_steps": 1, "output_dir": str(tmp_path)}, train_pairs=examples)
    pairs = prepare_pairs(examples, result.tokenizer, tokenize_config(TrainConfig())).pairs
    assert seen == [[pair_length(p, layout) for p in pairs]]


def test_keeping_freed_memory_changes_no_number(tmp_path):
    """The allocator setting (dpolab.fast.allocator) only decides which pages hold tensors: same run, bit for bit."""
    runs = {}
    for keep in (True, False):
        result = train({**FAST, "max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2, "keep_freed_memory": keep,
                        "output_dir": str(tmp_path / str(keep))}, train_pairs=make_examples(12))
        runs[keep] = (result.history, weights(result.model))
    assert [r["loss"] for r in runs[True][0]] == [r["loss"] for r in runs[False][0]]
    for name, value in runs[True][1].items():
        assert torch.equal(value, runs[False][1][name]), name


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_takes_lr_and_weight_decay_from_the_config_and_its_first_adamw_step_is_the_hand_derived_one(fused):
    """One AdamW step from zero moments: m̂ = g and v̂ = g², so p ← p·(1 − lr·wd) − lr·g / (|g| + eps), fused or not."""
    from dpolab.train.step import build_optimizer

    config = TrainConfig.load(None, {"lr": 1e-2, "weight_decay": 0.1})
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    g = torch.tensor([0.3, -2.0, 1e-3, 4.0])
    optimizer = build_optimizer([p], config, fused=fused)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is (True if fused else None)
    before = p.detach().clone()
    p.grad = g.clone()
    optimizer.step()
    eps = optimizer.defaults["eps"]
    expected = before * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)  # float32 rounding of a few ops


def test_rmsprop_is_built_when_the_config_asks_for_it():
    from dpolab.train.step import build_optimizer

    config = TrainConfig.load(None, {"optimizer": "rmsprop", "lr": 1e-3, "weight_decay": 0.05})
    optimizer = build_optimizer([torch.nn.Parameter(torch.ones(3))], config)
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (1e-3, 0.05)
