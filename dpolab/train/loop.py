"""The loop of one training run: optimizer steps, logged records, evaluations, checkpoints and callbacks.

Within one optimizer step (:func:`dpolab.train.step.train_step`), in this order: the step's record is logged
(every ``logging_steps``), the policy is evaluated on held-out pairs (every ``eval_every`` and at the end), a
checkpoint is written (every ``save_every`` and at the end), and the callbacks see each of them
(:mod:`dpolab.train.callbacks`). When a callback stops the run, the step's record is logged and its checkpoint
written if they were not, and a ``{"step", "stop_reason"}`` line goes to metrics.jsonl. A resumed run starts from
the records of metrics.jsonl up to its checkpoint: the failure detectors see them again, and the callbacks replay
its evaluations, so early stopping and the best checkpoint decide as in an uninterrupted run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpolab.data.prepare import PairData
from dpolab.data.tokenize import pad_token_id
from dpolab.fast.paths import FastPaths
from dpolab.train import checkpoint as ckpt
from dpolab.train import distributed as dist
from dpolab.train.callbacks import BestCheckpointCallback, CallbackList
from dpolab.train.config import TrainConfig
from dpolab.train.heldout import heldout_metrics, sample_kl
from dpolab.train.metrics import MetricsWriter, Monitor, logged_record, read_metrics
from dpolab.train.objective import Objective
from dpolab.train.reference import Reference
from dpolab.train.step import BatchPlan, train_step
from dpolab.train.trackers import Trackers

METRICS = ckpt.METRICS


@dataclass
class TrainResult:
    """What a run leaves: its metric records, the trained policy, and where its files are."""

    output_dir: Path
    history: list[dict[str, Any]]  # one record per optimizer step
    eval_history: list[dict[str, Any]]  # one record per evaluation
    step: int
    model: torch.nn.Module
    tokenizer: Any
    checkpoint: Path | None = None  # the final checkpoint, or the best with load_best_model_at_end (load_model loads it)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """What tokenization did to the data: ``{"train": {rows, kept, truncated, dropped, dropped_by_reason}, "eval": …}``."""
    best_checkpoint: Path | None = None  # by metric_for_best_model, when early stopping or load_best_model_at_end
    stop_reason: str | None = None  # why the callbacks stopped the run before its last step (None: it ran to the end)


@dataclass(kw_only=True)
class Run:
    """Everything the loop of one run works with, set up by :func:`dpolab.train.trainer.train` (by keyword)."""

    config: TrainConfig
    objective: Objective  # the loss of every step and evaluation, built once from the config
    ctx: dist.DistributedContext
    model: torch.nn.Module  # the policy itself
    wrapped: torch.nn.Module  # the policy as trained on this process (itself, DDP or FSDP)
    params: list[torch.nn.Parameter]  # the trained ones, in the optimizer's order
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    train_data: PairData
    eval_data: PairData
    train_ref: Reference | None  # None: SFT, or a reference-free loss
    eval_ref: Reference | None  # None: no reference, or no evaluation pairs for a precomputed table
    plan: BatchPlan
    resume: ckpt.Checkpoint | None
    callbacks: CallbackList
    best: BestCheckpointCallback | None
    data_report: dict[str, Any]
    state_extra: dict[str, Any]  # trainer_state.json entries of every checkpoint (model and data fingerprints)
    fast: FastPaths

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train_loop(run: Run, step: int) -> TrainResult:
    """The optimizer steps, logged records, evaluations, checkpoints and callbacks of ``run`` from ``step`` (0, or
    the step of the checkpoint it resumes) to its last step or the callbacks' stop."""
    config, ctx, out, control = run.config, run.ctx, run.out, run.callbacks.control
    writer = MetricsWriter(out / METRICS, enabled=ctx.is_main, resume_step=step if run.resume is not None else None)
    earlier = read_metrics(out / METRICS) if ctx.is_main else []
    history = [r for r in earlier if "loss" in r]
    eval_history = [r for r in earlier if "eval_loss" in r]
    monitor = Monitor()
    for record in history + eval_history:
        monitor.observe(record, emit=False)  # a resumed run's detectors continue from the earlier steps
    if run.resume is not None:  # the callbacks continue from the earlier evaluations (rank 0 read them)
        _replay(run, dist.broadcast_object(eval_history, ctx))
    last_checkpoint = run.resume.folder if run.resume is not None else None
    total = run.plan.total_steps(config)
    num_tokens = run.plan.tokens_before(step, run.train_data.pairs, config.stage)  # trl's num_tokens: cumulative
    pad = pad_token_id(run.tokenizer)
    touched = any(r["truncated"] or r["dropped"] for r in run.data_report.values())
    trackers = Trackers(config.report_to, out, config=config.to_dict(), enabled=ctx.is_main,
                        resume_step=step if run.resume is not None else None)
    window: list[dict[str, Any]] = []  # the steps since the last logged record (logging_steps)

    def log_window() -> None:
        logged = logged_record(window)
        logged["warnings"] = logged.get("warnings", []) + monitor.observe(logged, emit=ctx.is_main)
        writer.write(logged)
        trackers.log(logged)
        window.clear()

    bar = tqdm(total=total, initial=step, desc=config.stage, disable=not (config.progress and ctx.is_main))
    try:
        while step < total and not control.should_stop:
            step, record = train_step(run, step)
            num_tokens = record["num_tokens"] = num_tokens + record["num_tokens"]  # trl's: cumulative
            if step == 1 and touched:  # what truncation did to the data, once per run
                _note_data(record, run.data_report, monitor)
            history.append(record)
            window.append(record)
            if step % config.logging_steps == 0 or step == total:
                log_window()
            if run.eval_data.pairs and ((config.eval_every and step % config.eval_every == 0) or step == total):
                evaluation = _evaluate(run, step, pad)
                evaluation["warnings"] = monitor.observe(evaluation, emit=ctx.is_main)
                writer.write(evaluation)
                trackers.log(evaluation)
                eval_history.append(evaluation)
                run.callbacks.on_evaluate(step, evaluation)
            saved = bool(config.save_every and step % config.save_every == 0) or step == total
            if saved:
                last_checkpoint = _save(run, step, record)
            bar.update(1)
            bar.set_postfix({"loss": f"{record['loss']:.4f}",
                             **({"acc": f"{record['rewards/accuracies']:.2f}"} if config.stage == "dpo" else {})})
            run.callbacks.on_step(step, record)
            control.should_stop, control.reason = dist.broadcast_object((control.should_stop, control.reason), ctx)
            if control.should_stop:  # the stopped run can be resumed or used: its last step is logged and saved
                if window:
                    log_window()
                if not saved:
                    last_checkpoint = _save(run, step, record)
                writer.write({"step": step, "stop_reason": control.reason})
    finally:
        trackers.close()
    bar.close()
    final = last_checkpoint
    best = run.best.folder if run.best is not None else None
    if config.load_best_model_at_end and best is not None:
        final = Path(best)
        if last_checkpoint is None or final.resolve() != Path(last_checkpoint).resolve():
            dist.barrier(ctx)
            run.model.load_state_dict(ckpt.load_checkpoint(final).model_state)
    return TrainResult(out, history, eval_history, step, dist.unwrap(run.wrapped), run.tokenizer, final,
                       monitor.messages, run.data_report, best_checkpoint=None if best is None else Path(best),
                       stop_reason=control.reason if control.should_stop else None)


def _replay(run: Run, evaluations: list[dict[str, Any]]) -> None:
    """Feed a resumed run's earlier evaluations to its callbacks, with the checkpoints the run saved at them (every
    ``save_every`` of the checkpoint's config, and the checkpoint resumed from)."""
    every = run.resume.config.get("save_every", 0)

    def saved_folder_of(step: int) -> Path | None:
        if step == run.resume.step or (every and step % every == 0):
            return ckpt.checkpoint_dir(run.out, step)
        return None

    run.callbacks.replay(evaluations, saved_folder_of)


def _evaluate(run: Run, step: int, pad: int) -> dict[str, Any]:
    """The held-out metrics (``eval_`` names) and, with ``kl_samples``, the sampled KL of the policy now."""
    config = run.config
    evaluation = {"step": step, **heldout_metrics(run.wrapped, run.eval_ref, run.eval_data.pairs, config=config,
                                                  objective=run.objective, pad_id=pad, ctx=run.ctx,
                                                  autocast=run.autocast, fast=run.fast)}
    if config.kl_samples:
        evaluation.update(sample_kl(run.wrapped, run.eval_ref, run.tokenizer,
                                    run.eval_data.prompts[: config.kl_samples], config=config, ctx=run.ctx,
                                    chat=run.eval_data.chat))
    return evaluation


def _note_data(record: dict[str, Any], report: dict[str, Any], monitor: Monitor) -> None:
    """Add what truncation did to the data to the first step's record (records of untouched data keep their fields)."""
    record.update({f"data/{split}/{k}": v for split, summary in report.items()
                   for k, v in summary.items() if k != "dropped_by_reason"})
    record["warnings"] = [f"data: {data_line(report)}"]
    monitor.messages.append(record["warnings"][0])


def _save(run: Run, step: int, record: dict[str, Any]) -> Path:
    """Write the step's checkpoint on rank 0 (every process takes part in gathering the state) and tell the callbacks;
    pruning keeps the best checkpoint they track."""
    config, ctx = run.config, run.ctx
    model_state = dist.model_state(run.wrapped, ctx, config.fsdp)
    optimizer_state = dist.optimizer_state(run.wrapped, run.optimizer, ctx, config.fsdp)
    rng_states = dist.all_gather_objects(ckpt.capture_rng_state(), ctx)
    folder = ckpt.checkpoint_dir(run.out, step)
    kept = run.callbacks.kept_folders()
    if ctx.is_main:
        folder = ckpt.save_checkpoint(run.out, step, model_state=model_state, optimizer_state=optimizer_state,
                                      config=config.to_dict(), metrics=record, seed=config.seed,
                                      rng_states=rng_states, keep_last=config.keep_last, keep=kept,
                                      extra={**run.state_extra, "data_report": run.data_report},
                                      export=lambda tmp: ckpt.export_pretrained(run.model, run.tokenizer, tmp))
    dist.barrier(ctx)
    run.callbacks.on_save(step, folder)
    if ctx.is_main and run.callbacks.kept_folders() != kept:  # a new best: the one it replaced may go now
        ckpt.prune_checkpoints(run.out, config.keep_last, keep=run.callbacks.kept_folders())
    return folder


def data_line(report: dict[str, Any]) -> str:
    """One line: rows, kept, truncated and dropped (with reasons) per split."""
    parts = []
    for split, r in report.items():
        why = "; ".join(f"{n} {reason}" for reason, n in r["dropped_by_reason"].items())
        parts.append(f"{split} {r['rows']} rows, {r['kept']} kept, {r['truncated']} truncated, {r['dropped']} dropped"
                     + (f" ({why})" if why else ""))
    return "; ".join(parts)
