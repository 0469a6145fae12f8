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

Nothing already written is lost: a resume must match the checkpoint's config, training data (a fingerprint of
the tokenized pairs) and starting model; a fresh run that fails before its first checkpoint moves its metrics
aside (``metrics.failed.jsonl``) so that its rerun is not blocked; rows that truncation leaves unusable are
dropped and counted (``TrainResult.data``, the first step's record, one line on stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpolab.data.batch import collate_pairs, length_bucketed_batches, pair_length, to_device
from dpolab.data.tokenize import pad_token_id
from dpolab.fast.allocator import keep_freed_memory
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, pair_layout
from dpolab.train import checkpoint as ckpt
from dpolab.train import distributed as dist
from dpolab.train.config import TrainConfig
from dpolab.train.heldout import heldout_metrics, sample_kl
from dpolab.data.prepare import prepare_pairs, tokenize_config
from dpolab.models import add_lora, load_policy
from dpolab.train.metrics import MetricsWriter, Monitor, NonFiniteLossError, logged_record, read_metrics
from dpolab.train.objective import STATS, batch_objective, global_contexts, mean_metrics, objective_settings
from dpolab.train.recompute import enable_gradient_checkpointing, recomputing
from dpolab.train.reference import make_reference, precompute_reference
from dpolab.train.resume import check_resume_state, resume_point
from dpolab.train.schedule import learning_rate
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
    checkpoint: Path | None = None  # the final checkpoint (weights loadable with dpolab.models.load_model)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """What tokenization did to the data: ``{"train": {rows, kept, truncated, dropped, dropped_by_reason}, "eval": …}``."""


class BatchPlan:
    """Which pairs each process trains on at each step: a function of (seed, step) only, so resumable.

    Each epoch the pairs are grouped into length-bucketed global batches (dpolab.data.batch) reshuffled by
    seed and epoch, so every step has the same number of pairs. When the pair count is not a multiple of
    the global batch, the r pairs left over sit out the epoch; which ones rotates along a fixed seeded
    cycle (epoch e holds out cycle positions e·r … e·r + r − 1), so over epochs every pair is trained
    equally often (counts never differ by more than one), rather than the same longest pairs being cut
    every epoch. Global batch g is cut into micro-batches of ``micro_batch_size``; process r takes
    micro-batches r, r + N, ….
    """

    def __init__(self, lengths: list[int], config: TrainConfig, world_size: int):
        self.lengths, self.seed, self.micro, self.world = lengths, config.seed, config.micro_batch_size, world_size
        self.global_size = config.micro_batch_size * config.grad_accum_steps * world_size
        if len(lengths) < self.global_size:
            raise ValueError(f"{len(lengths)} training pairs are fewer than one global batch of {self.global_size} "
                             f"(micro_batch_size × grad_accum_steps × processes)")
        self.left_over = len(lengths) % self.global_size
        self._cycle = list(range(len(lengths)))
        random.Random(self.seed * 100_003 - 1).shuffle(self._cycle)
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            n, r = len(self.lengths), self.left_over
            held = {self._cycle[(epoch * r + k) % n] for k in range(r)}
            keep = [i for i in range(n) if i not in held]
            batches = length_bucketed_batches([self.lengths[i] for i in keep], self.global_size,
                                              seed=self.seed * 100_003 + epoch)
            self._epochs[epoch] = [[keep[j] for j in b] for b in batches]
            assert all(len(b) == self.global_size for b in self._epochs[epoch])
        return self._epochs[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch: the pair count // the global batch."""
        return len(self.lengths) // self.global_size

    def total_steps(self, config: TrainConfig) -> int:
        """The run's optimizer steps: ``ceil(num_train_epochs × steps per epoch)`` when that is set, else max_steps."""
        if config.num_train_epochs > 0:
            return max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))
        return config.max_steps

    def global_batch(self, step: int) -> tuple[int, list[int]]:
        """``(epoch, pair indices of the whole global batch)`` of the 0-based optimizer step ``step``."""
        epoch, step = divmod(step, self.steps_per_epoch)
        return epoch, self.epoch_batches(epoch)[step]

    def micro_batches(self, step: int, rank: int) -> tuple[int, list[list[int]]]:
        """``(epoch, micro-batches of this process)`` for the 0-based optimizer step ``step``."""
        epoch, batch = self.global_batch(step)
        micro = [batch[i : i + self.micro] for i in range(0, len(batch), self.micro)]
        return epoch, micro[rank :: self.world]

    def tokens_before(self, step: int, pairs, stage: str) -> int:
        """Input tokens (no padding) that the first ``step`` optimizer steps trained on, all processes together:
        the ``num_tokens`` a resumed run continues from. DPO runs prompt + chosen and prompt + rejected, SFT
        prompt + chosen (as :func:`dpolab.train.objective.batch_objective` counts them)."""
        def tokens(p) -> int:
            if stage == "sft":
                return len(p.prompt_ids) + len(p.chosen_ids)
            return 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)

        return sum(tokens(pairs[i]) for s in range(step) for i in self.global_batch(s)[1])


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    reference_model: torch.nn.Module | None = None,
    train_pairs=None,
    eval_pairs=None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
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
    ctx = dist.setup(config.device)
    try:
        with keep_freed_memory(config.keep_freed_memory and ctx.device.type == "cpu"):
            return _run(config, ctx, model, tokenizer, reference_model, train_pairs, eval_pairs, on_step, fast)
    finally:
        dist.teardown(ctx)


def _run(config, ctx, model, tokenizer, reference_model, train_pairs, eval_pairs, on_step, fast) -> TrainResult:
    out = Path(config.output_dir)
    # before any work: an unwritable folder, an earlier run in the way, or a disagreeing checkpoint fail here
    resume = resume_point(config, is_main=ctx.is_main, world_size=ctx.world_size)
    dist.barrier(ctx)
    torch.manual_seed(config.seed)
    provenance = {"name": config.model}
    if model is None:
        model, loaded_tokenizer = load_policy(config.model, seed=config.seed, dtype=config.dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:  # config.model did not make this model: record what did train, by content
        provenance = {"name": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
                      "passed_in": True, "weights_sha256": weights_digest(model)}
    if tokenizer is None:
        raise ValueError("train(model=...) needs the model's tokenizer: pass tokenizer=...")
    settings = tokenize_config(config)
    on_truncation = getattr(config, "on_truncation", "drop")
    train_data = prepare_pairs(train_pairs if train_pairs is not None else config.train_data or None, tokenizer,
                               settings, name=config.train_data or "train_pairs", on_truncation=on_truncation)
    if not train_data.pairs:
        raise ValueError("no training pairs: pass train_pairs=... or set the config field train_data")
    eval_data = prepare_pairs(eval_pairs if eval_pairs is not None else config.eval_data or None, tokenizer,
                              settings, name=config.eval_data or "eval_pairs", on_truncation=on_truncation)
    data_report = {"train": train_data.summary(), **({"eval": eval_data.summary()} if eval_data.pairs else {})}
    fingerprint = {"train_sha256": pairs_digest(train_data.pairs), "train_pairs": len(train_data.pairs)}
    if resume is not None:  # the config matched; the data and the starting model must match too
        check_resume_state(resume, {"data": fingerprint, "model": provenance})
    touched = any(r["truncated"] or r["dropped"] for r in data_report.values())
    if ctx.is_main and (touched or config.progress):  # quiet runs (notebooks under test) hear only of changed data
        print(f"dpolab: data: {_data_line(data_report)}", file=sys.stderr)
    layout = pair_layout(model, config.stage, fast)
    plan = BatchPlan([pair_length(p, layout) for p in train_data.pairs], config, ctx.world_size)
    pad = pad_token_id(tokenizer)

    if resume is not None and resume.step > plan.total_steps(config):
        raise ValueError(f"checkpoint {resume.folder} is at step {resume.step}, beyond this run's "
                         f"{plan.total_steps(config)} steps (num_train_epochs={config.num_train_epochs})")

    model, train_ref, eval_ref = _policy_and_references(config, ctx, model, tokenizer, reference_model, train_data,
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

    try:
        return _train_loop(config, ctx, model, wrapped, params, optimizer, tokenizer, train_data, eval_data, train_ref,
                           eval_ref, plan, pad, resume, step, on_step, data_report,
                           {"model": provenance, "data": fingerprint}, fast)
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


def _train_loop(config, ctx, model, wrapped, params, optimizer, tokenizer, train_data, eval_data, train_ref, eval_ref,
                plan, pad, resume, step, on_step, data_report, state_extra, fast) -> TrainResult:
    """The optimizer steps, evaluations and checkpoints of :func:`train` (after everything is set up)."""
    out = Path(config.output_dir)
    writer = MetricsWriter(out / METRICS, enabled=ctx.is_main, resume_step=step if resume is not None else None)
    earlier = read_metrics(out / METRICS) if ctx.is_main else []
    history = [r for r in earlier if "loss" in r]
    eval_history = [r for r in earlier if "eval_loss" in r]
    monitor = Monitor()
    for record in history + eval_history:
        monitor.observe(record, emit=False)  # a resumed run's detectors continue from the earlier steps
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if config.precision == "bf16" \
        else contextlib.nullcontext
    scale = ctx.world_size / plan.global_size  # DDP averages over processes; we want the mean over pairs
    last_checkpoint = resume.folder if resume is not None else None
    total = plan.total_steps(config)
    num_tokens = plan.tokens_before(step, train_data.pairs, config.stage)  # trl's num_tokens: cumulative
    trackers = Trackers(config.report_to, out, config=config.to_dict(), enabled=ctx.is_main,
                        resume_step=step if resume is not None else None)
    window: list[dict[str, Any]] = []  # the steps since the last logged record (logging_steps)
    bar = tqdm(total=total, initial=step, desc=config.stage, disable=not (config.progress and ctx.is_main))
    try:
        while step < total:
            step, record = _train_step(config, ctx, wrapped, params, optimizer, train_data, train_ref, plan, pad,
                                       step, total, scale, autocast, num_tokens, data_report, monitor, fast)
            num_tokens = record["num_tokens"]
            history.append(record)
            window.append(record)
            if step % config.logging_steps == 0 or step == total:
                logged = logged_record(window)
                logged["warnings"] = logged.get("warnings", []) + monitor.observe(logged, emit=ctx.is_main)
                writer.write(logged)
                trackers.log(logged)
                window = []
            if eval_data.pairs and ((config.eval_every and step % config.eval_every == 0) or step == total):
                evaluation = {"step": step, **heldout_metrics(wrapped, eval_ref, eval_data.pairs, config=config,
                                                              pad_id=pad, ctx=ctx, autocast=autocast)}
                if config.kl_samples:
                    evaluation.update(sample_kl(wrapped, eval_ref, tokenizer, eval_data.prompts[: config.kl_samples],
                                                config=config, ctx=ctx, chat=eval_data.chat))
                evaluation["warnings"] = monitor.observe(evaluation, emit=ctx.is_main)
                writer.write(evaluation)
                trackers.log(evaluation)
                eval_history.append(evaluation)
            if (config.save_every and step % config.save_every == 0) or step == total:
                last_checkpoint = _save(out, step, wrapped, model, tokenizer, optimizer, config, record, ctx,
                                        {**state_extra, "data_report": data_report})
            bar.update(1)
            bar.set_postfix({"loss": f"{record['loss']:.4f}",
                             **({"acc": f"{record['rewards/accuracies']:.2f}"} if config.stage == "dpo" else {})})
            if on_step is not None:
                on_step(step, record)
    finally:
        trackers.close()
    bar.close()
    return TrainResult(out, history, eval_history, step, dist.unwrap(wrapped), tokenizer, last_checkpoint,
                       monitor.messages, data_report)


def _train_step(config, ctx, wrapped, params, optimizer, train_data, train_ref, plan, pad, step, total, scale,
                autocast, num_tokens, data_report, monitor, fast) -> tuple[int, dict[str, Any]]:
    """One optimizer step (0-based ``step`` in, 1-based step and its metrics record out)."""
    started = time.perf_counter()
    lr = learning_rate(step, config, total)  # a function of the step: a resumed run continues it exactly
    for group in optimizer.param_groups:
        group["lr"] = lr
    epoch, micro_batches = plan.micro_batches(step, ctx.rank)
    batches = [to_device(collate_pairs([train_data.pairs[j] for j in rows], pad, index=rows), ctx.device)
               for rows in micro_batches]
    totals, grad_norm = optimizer_step(wrapped, train_ref, batches, optimizer, params, config=config, scale=scale,
                                       ctx=ctx, autocast=autocast, fast=fast, where=f"step {step + 1} (epoch {epoch})")
    step += 1
    if config.sync_ref_model and step % config.ref_model_sync_steps == 0:  # TR-DPO
        train_ref.mix_in(dist.unwrap(wrapped), config.ref_model_mixup_alpha)

    tokens = float(totals[STATS.index("tokens")])
    record = {"step": step, "epoch": epoch, "learning_rate": lr, "grad_norm": grad_norm,
              **mean_metrics(totals, config.stage), "num_tokens": num_tokens + int(tokens),
              "tokens_per_s": tokens / (time.perf_counter() - started)}
    if step == 1 and any(r["truncated"] or r["dropped"] for r in data_report.values()):
        # what truncation did to the data, once per run (records of untouched data keep their fields)
        record.update({f"data/{split}/{k}": v for split, summary in data_report.items()
                       for k, v in summary.items() if k != "dropped_by_reason"})
        record["warnings"] = [f"data: {_data_line(data_report)}"]
        monitor.messages.append(record["warnings"][0])
    return step, record


def _data_line(report: dict[str, Any]) -> str:
    """One line: rows, kept, truncated and dropped (with reasons) per split."""
    parts = []
    for split, r in report.items():
        why = "; ".join(f"{n} {reason}" for reason, n in r["dropped_by_reason"].items())
        parts.append(f"{split} {r['rows']} rows, {r['kept']} kept, {r['truncated']} truncated, {r['dropped']} dropped"
                     + (f" ({why})" if why else ""))
    return "; ".join(parts)


def pairs_digest(pairs) -> str:
    """SHA-256 of tokenized pairs (ids and masks, in order): the training data's fingerprint in a checkpoint."""
    h = hashlib.sha256(b"dpolab-pairs-v1")
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_mask, p.rejected_mask]).encode())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): its identity when passed in as an object."""
    h = hashlib.sha256(b"dpolab-weights-v1")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _policy_and_references(config, ctx, model, tokenizer, reference_model, train_data, eval_data, fast):
    """The policy on its device (in eval mode: dropout off; a LoRA adapter added if asked), and π_ref for
    training and for evaluation, taken from the initial weights (before a resumed run loads its own)."""
    model = model.to(ctx.device).eval()
    if reference_model is not None:
        reference_model = reference_model.to(ctx.device).eval()
    train_ref = eval_ref = None
    if config.reference == "copy":
        train_ref = eval_ref = make_reference("copy", model, reference_model, fast=fast)
    elif config.reference == "precomputed":
        source = model if reference_model is None else reference_model
        settings = tokenize_config(config)
        # same precision as the policy's forward passes, so that at θ = θ_ref every margin is 0
        train_ref, eval_ref = (precompute_reference(source, tokenizer, data.pairs, tokenize_config=settings,
                                                    batch_size=config.eval_batch_size, precision=config.precision,
                                                    fast=fast)
                               if data.pairs else None for data in (train_data, eval_data))
    had_adapter = hasattr(model, "disable_adapter")  # e.g. LoRA SFT, then LoRA DPO: π_ref is the SFT adapter
    if config.lora_r:
        model = add_lora(model, config.lora_r, config.lora_alpha).to(ctx.device).eval()
    if config.reference == "adapter":
        train_ref = eval_ref = make_reference("adapter", model, adapter_start=had_adapter, fast=fast)
    if (config.reference == "precomputed" and config.lora_r and not had_adapter and reference_model is None
            and eval_ref is not None):
        # the table came from the base weights, which the adapter switched off gives back: KL samples cost nothing
        eval_ref.sequence_logps = make_reference("adapter", model, fast=fast).sequence_logps
    if config.stage == "sft":
        train_ref = None  # the NLL needs no reference; evaluation still reports rewards and KL against it
    return model, train_ref, eval_ref


def optimizer_step(model, reference, batches: list, optimizer, params, *, config: TrainConfig, scale: float,
                   ctx: dist.DistributedContext, autocast=contextlib.nullcontext, fast: FastPaths = DEFAULT_FAST_PATHS,
                   where: str = "this step") -> tuple[torch.Tensor, float]:
    """One optimizer step on this process's micro-batches: gradients (:func:`accumulate_gradients`, with the
    checkpointed layers recomputing), the metric sums reduced over processes, a stop before the update if the
    loss or the gradient norm is not finite (``where`` names the step in the error), clipping at
    ``config.max_grad_norm``, the update, and the gradients cleared.

    Returns:
        ``(sums, grad_norm)``: the metric sums of all processes (aligned with ``objective.STATS``) and the
        gradient norm before clipping.
    """
    with recomputing(model):  # gradient checkpointing, when it is on
        totals, first_bad = accumulate_gradients(model, reference, batches, config=config, scale=scale,
                                                 autocast=autocast, fast=fast)
    totals = dist.all_reduce_sum(totals, ctx)
    if totals[STATS.index("nonfinite")]:
        raise NonFiniteLossError(f"non-finite loss at {where}, {first_bad or 'a micro-batch of another process'}; "
                                 "training stopped before the optimizer step, no checkpoint written for this step")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"gradient norm is {grad_norm} at {where} although the loss is finite; stopped "
                                 "before the optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm


def accumulate_gradients(model, reference, batches: list, *, config: TrainConfig, scale: float,
                         autocast=contextlib.nullcontext,
                         fast: FastPaths = DEFAULT_FAST_PATHS) -> tuple[torch.Tensor, str | None]:
    """Backward pass of every micro-batch of one optimizer step; gradients add up in ``.grad``.

    Each micro-batch contributes ``scale · Σ_pairs loss``; with ``scale`` = processes / global pairs the
    accumulated (and DDP-averaged) gradient is that of the mean loss over the global batch. Gradients
    are all-reduced across processes only on the last micro-batch. The policy's forwards take the speed paths
    ``fast``, with the fused output layer's weight gradient added straight into ``.grad`` (this loop runs
    ``backward()``; see :class:`dpolab.fast.paths.FastPaths`).

    Returns:
        ``(sums, first_bad)``: the metric sums of this process (aligned with ``objective.STATS``) and a
        description of the first micro-batch whose loss was not finite (None if all were).
    """
    totals, first_bad = torch.zeros(len(STATS), dtype=torch.float64), None
    settings = objective_settings(config)
    with autocast():  # the global batch's numbers for losses that are not per-pair sums (trl's sft, AOT, WPO)
        contexts = global_contexts(model, reference, batches, stage=config.stage, fast=fast, **settings)
    policy_paths = dataclasses.replace(fast, grad_into_weight=True)
    for i, batch in enumerate(batches):
        with dist.gradient_sync(model, sync=i == len(batches) - 1), autocast():
            losses, sums = batch_objective(model, reference, batch, stage=config.stage, context=contexts[i],
                                           fast=policy_paths, **settings)
            (losses.sum() * scale).backward()
        totals += sums
        if first_bad is None and sums[STATS.index("nonfinite")]:
            first_bad = (f"micro-batch {i} of {len(batches)} on this process (dataset rows {batch.index.tolist()}), "
                         f"per-pair losses {losses.detach().tolist()}")
    return totals, first_bad


def build_optimizer(params, config: TrainConfig, *, fused: bool = True) -> torch.optim.Optimizer:
    """The trainer's optimizer for ``params``: ``config.optimizer`` with ``config.lr`` and ``config.weight_decay``.

    AdamW runs torch's one-pass (fused) kernel where it exists: float parameters on CPU or CUDA (FSDP-sharded
    too). Same update as the multi-pass default up to float rounding; on SmolLM2-135M it took 8% off a CPU step
    (benchmarks/levers.py, lever ``fused-adamw``). Elsewhere, or with ``fused=False``, torch's default
    implementation is used.
    """
    params = list(params)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    ok = fused and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True if ok else None)


def _save(out, step, wrapped, model, tokenizer, optimizer, config, record, ctx, extra) -> Path:
    """Write the step's checkpoint on rank 0 (every process takes part in gathering the state)."""
    model_state = dist.model_state(wrapped, ctx, config.fsdp)
    optimizer_state = dist.optimizer_state(wrapped, optimizer, ctx, config.fsdp)
    rng_states = dist.all_gather_objects(ckpt.capture_rng_state(), ctx)
    folder = ckpt.checkpoint_dir(out, step)
    if ctx.is_main:
        folder = ckpt.save_checkpoint(out, step, model_state=model_state, optimizer_state=optimizer_state,
                                      config=config.to_dict(), metrics=record, seed=config.seed,
                                      rng_states=rng_states, keep_last=config.keep_last, extra=extra,
                                      export=lambda tmp: ckpt.export_pretrained(model, tokenizer, tmp))
    dist.barrier(ctx)
    return folder

