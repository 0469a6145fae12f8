"""The training loop: SFT and DPO with one loop, exact gradient accumulation, checkpoints, resume, DDP.

The paper's pipeline (§4, §6) is SFT on the target domain, then DPO from the SFT model, which is also
the reference. Both stages run here::

    from dpolab.train.trainer import train
    sft = train({"stage": "sft", "model": "tiny-gpt2", "output_dir": "runs/sft"}, train_pairs=pairs)
    dpo = train({"beta": 0.1, "output_dir": "runs/dpo"}, model=sft.model, tokenizer=sft.tokenizer,
                train_pairs=pairs, eval_pairs=heldout)
    dpo.history[-1]["rewards/accuracies"], dpo.eval_history[-1]["eval_kl"]

One optimizer step consumes one *global batch* of micro_batch_size × grad_accum_steps × processes
pairs. Each micro-batch's per-pair losses are summed and divided by the global pair count before the
backward pass, so the accumulated gradient is that of the mean loss over the global batch, exactly,
whatever the padding and the split into micro-batches and processes. Dropout stays off in the policy
as in the reference (both run in eval mode; gradients flow as usual), so log-prob ratios are
deterministic. Given the seed, a CPU run is bit-for-bit repeatable, and a resumed run ends with the
same weights as an uninterrupted one (the data order is a function of the seed and the step).

Callbacks (:mod:`dpolab.train.callbacks`) see every evaluation, checkpoint and step; the config's
``early_stopping_patience`` stops a run whose ``metric_for_best_model`` stopped improving (its last checkpoint
written first, the reason in ``metrics.jsonl`` and ``TrainResult.stop_reason``), and ``load_best_model_at_end``
returns the best checkpoint's weights. A resumed run replays its earlier evaluations into them, so it stops where
an uninterrupted one would.

Nothing already written is lost: a resume must match the checkpoint's config, training data (a fingerprint of
the tokenized pairs) and starting model; a fresh run that fails before its first checkpoint moves its metrics
aside (``metrics.failed.jsonl``) so that its rerun is not blocked; rows that truncation leaves unusable are
dropped and counted (``TrainResult.data``, the first step's record, one line on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dpolab.data.batch import pair_length
from dpolab.data.device import is_cpu
from dpolab.data.prepare import prepare_train_eval
from dpolab.fast.allocator import keep_freed_memory
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, pair_layout
from dpolab.models import load_policy
from dpolab.train import checkpoint as ckpt
from dpolab.train import distributed as dist
from dpolab.train.callbacks import TrainerCallback, config_callbacks
from dpolab.train.config import TrainConfig
from dpolab.train.fingerprint import pairs_digest, weights_digest
from dpolab.train.loop import METRICS, Run, TrainResult, data_line, train_loop
from dpolab.train.objective import Objective
from dpolab.train.recompute import enable_gradient_checkpointing
from dpolab.train.reference import policy_and_references
from dpolab.train.resume import check_resume_state, resume_point
from dpolab.train.step import BatchPlan, build_optimizer


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    reference_model: torch.nn.Module | None = None,
    train_pairs=None,
    eval_pairs=None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    fast: FastPaths = DEFAULT_FAST_PATHS,
    **overrides: Any,
) -> TrainResult:
    """Train a policy with SFT or DPO and return its metrics and weights.

    Args:
        config: a :class:`TrainConfig`, a dict of fields, a YAML path, or None (defaults).
        model, tokenizer: the initial policy; None loads ``config.model``.
        reference_model: π_ref when it is not the initial policy (e.g. the SFT model); else a copy of it.
        train_pairs, eval_pairs: preference data in any form :func:`dpolab.data.prepare.prepare_pairs` accepts;
            None reads ``config.train_data`` / ``config.eval_data``.
        on_step: called as ``on_step(step, record)`` after each optimizer step (and its checkpoint).
        callbacks: :class:`dpolab.train.callbacks.TrainerCallback` objects, called after the config's own (early
            stopping, best checkpoint) and before ``on_step``.
        fast: the speed paths of the policy's and the reference's log-prob forwards
            (:class:`dpolab.fast.paths.FastPaths`; default: all that the model allows).
        **overrides: config fields, type-checked like command-line overrides.
    """
    if isinstance(config, (str, Path)):
        config = TrainConfig.load(config, overrides)
    elif isinstance(config, TrainConfig):
        config = config.replace(**overrides) if overrides else config
    else:
        config = TrainConfig.load(None, {**(config or {}), **overrides})
    if config.stage == "reward":  # the RLHF pipeline's reward model: its own loop (dpolab.train.reward_stage)
        from dpolab.train.reward_stage import train_reward

        return train_reward(config, model=model, tokenizer=tokenizer, train_pairs=train_pairs, eval_pairs=eval_pairs)
    hooks, best = config_callbacks(config, callbacks, on_step)
    ctx = dist.setup("cpu" if config.use_cpu else config.device)
    finished = False
    try:  # glibc's allocator tuning is for CPU runs only: a GPU run's tensors are not in the C heap
        with keep_freed_memory(config.keep_freed_memory and is_cpu(ctx.device)):
            result = _run(config, ctx, model, tokenizer, reference_model, train_pairs, eval_pairs, hooks, best, fast)
        finished = True
        return result
    finally:
        dist.teardown(ctx, synchronize=finished)  # after an error the other processes may never reach a barrier


def _run(config, ctx, model, tokenizer, reference_model, train_pairs, eval_pairs, hooks, best, fast) -> TrainResult:
    out = Path(config.output_dir)
    # before any work: an unwritable folder, an earlier run in the way, or a disagreeing checkpoint fail here
    resume = resume_point(config, is_main=ctx.is_main, world_size=ctx.world_size)
    dist.barrier(ctx)
    torch.manual_seed(config.seed)
    provenance = {"name": config.model}
    if model is None:
        model, loaded_tokenizer = load_policy(config.model, seed=config.seed, dtype=config.dtype,
                                              revision=config.model_revision, trust_remote_code=config.trust_remote_code)
        tokenizer = tokenizer or loaded_tokenizer
    else:  # config.model did not make this model: record what did train, by content
        provenance = {"name": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
                      "passed_in": True, "weights_sha256": weights_digest(model)}
    if tokenizer is None:
        raise ValueError("train(model=...) needs the model's tokenizer: pass tokenizer=...")
    on_truncation = getattr(config, "on_truncation", "drop")
    train_data, eval_data = prepare_train_eval(config, tokenizer, train_pairs, eval_pairs, stage=config.stage,
                                               on_truncation=on_truncation)
    if best is not None and not eval_data.pairs:
        raise ValueError("early_stopping_patience and load_best_model_at_end decide on evaluations: pass "
                         "eval_pairs=... or set the config field eval_data")
    data_report = {"train": train_data.summary(), **({"eval": eval_data.summary()} if eval_data.pairs else {})}
    fingerprint = {"train_sha256": pairs_digest(train_data.pairs), "train_pairs": len(train_data.pairs)}
    if resume is not None:  # the config matched; the data and the starting model must match too
        check_resume_state(resume, {"data": fingerprint, "model": provenance})
    touched = any(r["truncated"] or r["dropped"] for r in data_report.values())
    if ctx.is_main and (touched or config.progress):  # quiet runs (notebooks under test) hear only of changed data
        print(f"dpolab: data: {data_line(data_report)}", file=sys.stderr)
    layout = pair_layout(model, config.stage, fast)
    plan = BatchPlan([pair_length(p, layout) for p in train_data.pairs], config, ctx.world_size)

    if resume is not None and resume.step > plan.total_steps(config):
        raise ValueError(f"checkpoint {resume.folder} is at step {resume.step}, beyond this run's "
                         f"{plan.total_steps(config)} steps (num_train_epochs={config.num_train_epochs})")

    model, train_ref, eval_ref = policy_and_references(config, ctx, model, tokenizer, reference_model, train_data,
                                                       eval_data, fast)
    if config.gradient_checkpointing:  # after the reference copy: it never runs a backward pass
        enable_gradient_checkpointing(model)
    step = 0
    if resume is not None:
        model.load_state_dict(resume.model_state)
        ckpt.restore_rng_state(resume.rng_states[ctx.rank if len(resume.rng_states) == ctx.world_size else 0])
        step = resume.step
    wrapped = dist.wrap(model, ctx, config.fsdp)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config)
    if resume is not None:
        dist.load_optimizer_state(wrapped, optimizer, resume.optimizer_state, ctx, config.fsdp)

    run = Run(config=config, objective=Objective.from_config(config), ctx=ctx, model=model, wrapped=wrapped,
              params=params, optimizer=optimizer, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data,
              train_ref=train_ref, eval_ref=eval_ref, plan=plan, resume=resume, callbacks=hooks, best=best,
              data_report=data_report, state_extra={"model": provenance, "data": fingerprint}, fast=fast)
    try:
        return train_loop(run, step)
    except BaseException as err:
        if ctx.is_main:
            _after_failure(out, resume, err)
        raise


def _after_failure(out: Path, resume, err: BaseException) -> None:
    """Leave the folder so that the corrected rerun can go on, and say how in a note on the error.

    A fresh run that wrote no checkpoint cannot be resumed: its metrics are moved aside (to
    ``metrics.failed.jsonl``, kept for reading), so the rerun does not find an earlier run in its way.
    """
    if resume is None and not ckpt.list_checkpoints(out):
        if (out / METRICS).exists():
            aside, n = out / ckpt.FAILED_METRICS, 0
            while aside.exists():  # an earlier failed run's file is kept too
                n += 1
                aside = out / ckpt.FAILED_METRICS.replace(".jsonl", f".{n}.jsonl")
            (out / METRICS).replace(aside)
            err.add_note(f"dpolab: the run failed before its first checkpoint; its metrics were moved to {aside}, "
                         "and a rerun with the same output_dir starts fresh")
    else:
        err.add_note(f"dpolab: checkpoints of this run are in {out / ckpt.CHECKPOINTS}; continue it with "
                     "resume_from=auto, or start over with overwrite=true")
