"""One optimizer step of the training loop: which pairs it trains on, its gradients, the update and its record.

- :class:`BatchPlan`: the pairs of every step and process, a function of (seed, step) only, so a resumed run
  continues the same order;
- :func:`accumulate_gradients`: the backward pass of each micro-batch, scaled so that the accumulated gradient is
  that of the mean loss over the global batch (exact accumulation);
- :func:`optimizer_step`: those gradients, the non-finite checks, clipping and the update (the step the
  benchmarks time);
- :func:`train_step`: the loop's step, with the learning rate of the schedule and the metrics record;
- :func:`build_optimizer`: the optimizer a config asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from typing import TYPE_CHECKING, Any

import torch

from dpolab.data.batch import collate_pairs, length_bucketed_batches, to_device
from dpolab.data.tokenize import pad_token_id
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths
from dpolab.models.lora import adapter_dropout
from dpolab.train import distributed as dist
from dpolab.train.config import TrainConfig
from dpolab.train.metrics import NonFiniteLossError
from dpolab.train.objective import STATS, Objective, batch_objective, global_contexts, mean_metrics
from dpolab.train.recompute import recomputing
from dpolab.train.reference import Reference
from dpolab.train.schedule import learning_rate

if TYPE_CHECKING:
    from dpolab.train.loop import Run


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


def train_step(run: Run, step: int) -> tuple[int, dict[str, Any]]:
    """The loop's optimizer step ``step`` (0-based) of ``run``: the schedule's learning rate, this process's
    micro-batches of the training pairs (:meth:`BatchPlan.micro_batches`), :func:`optimizer_step` on the policy as
    wrapped for training, and TR-DPO's reference update when it is due.

    The policy's logit and entropy statistics (``logits/*``, ``entropy``) are measured only on the steps the loop
    logs (every ``logging_steps`` and the last): they cost a pass over the logits and change nothing else.

    Returns:
        ``(step + 1, record)``: the 1-based step and its metrics record (trl's names); its ``num_tokens`` counts
        this step's tokens, all processes together (the loop makes it cumulative, as trl logs it).
    """
    config, ctx, pairs, plan = run.config, run.ctx, run.train_data.pairs, run.plan
    started = time.perf_counter()
    total = plan.total_steps(config)
    lr = learning_rate(step, config, total)  # a function of the step: a resumed run continues it exactly
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    epoch, micro_batches = plan.micro_batches(step, ctx.rank)
    pad = pad_token_id(run.tokenizer)
    batches = [to_device(collate_pairs([pairs[j] for j in rows], pad, index=rows), ctx.device) for rows in micro_batches]
    logged = (step + 1) % config.logging_steps == 0 or step + 1 == total  # the loop logs this step's record
    scale = ctx.world_size / plan.global_size  # DDP averages over processes; we want the mean over pairs
    totals, grad_norm = optimizer_step(run.wrapped, run.train_ref, batches, run.optimizer, run.params,
                                       objective=run.objective, max_grad_norm=config.max_grad_norm, scale=scale,
                                       ctx=ctx, autocast=run.autocast, fast=run.fast,
                                       where=f"step {step + 1} (epoch {epoch})", with_stats=logged)
    step += 1
    if config.sync_ref_model and step % config.ref_model_sync_steps == 0:  # TR-DPO
        run.train_ref.mix_in(dist.unwrap(run.wrapped), config.ref_model_mixup_alpha)

    tokens = float(totals[STATS.index("tokens")])
    record = {"step": step, "epoch": epoch, "learning_rate": lr, "grad_norm": grad_norm,
              **mean_metrics(totals, config.stage), "num_tokens": int(tokens),
              "tokens_per_s": tokens / (time.perf_counter() - started)}
    return step, record


def optimizer_step(model, reference: Reference | None, batches: list, optimizer, params, *, objective: Objective,
                   max_grad_norm: float, scale: float, ctx: dist.DistributedContext,
                   autocast=contextlib.nullcontext, fast: FastPaths = DEFAULT_FAST_PATHS, where: str = "this step",
                   with_stats: bool = True) -> tuple[torch.Tensor, float]:
    """One optimizer step on this process's micro-batches: gradients of ``objective``
    (:func:`accumulate_gradients`, with the checkpointed layers recomputing and a LoRA adapter's dropout on), the
    metric sums reduced over processes, a stop before the update if the loss or the gradient norm is not finite
    (``where`` names the step in the error), clipping at ``max_grad_norm`` (0: none), the update, and the gradients
    cleared.

    Returns:
        ``(sums, grad_norm)``: the metric sums of all processes (aligned with ``objective.STATS``) and the
        gradient norm before clipping.
    """
    with recomputing(model), adapter_dropout(model):  # gradient checkpointing and LoRA dropout, when they are on
        totals, first_bad = accumulate_gradients(model, reference, batches, objective=objective, scale=scale,
                                                 autocast=autocast, fast=fast, with_stats=with_stats)
    totals = dist.all_reduce_sum(totals, ctx)
    if totals[STATS.index("nonfinite")]:
        raise NonFiniteLossError(f"non-finite loss at {where}, {first_bad or 'a micro-batch of another process'}; "
                                 "training stopped before the optimizer step, no checkpoint written for this step")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"gradient norm is {grad_norm} at {where} although the loss is finite; stopped "
                                 "before the optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm


def accumulate_gradients(model, reference: Reference | None, batches: list, *, objective: Objective, scale: float,
                         autocast=contextlib.nullcontext, fast: FastPaths = DEFAULT_FAST_PATHS,
                         with_stats: bool = True) -> tuple[torch.Tensor, str | None]:
    """Backward pass of every micro-batch of one optimizer step; gradients add up in ``.grad``.

    Each micro-batch contributes ``scale · Σ_pairs loss``; with ``scale`` = processes / global pairs the
    accumulated (and DDP-averaged) gradient is that of the mean loss over the global batch. Gradients
    are all-reduced across processes only on the last micro-batch. The policy's forwards take the speed paths
    ``fast``, with the fused output layer's weight gradient added straight into ``.grad`` (this loop runs
    ``backward()``; see :class:`dpolab.fast.paths.FastPaths`). ``with_stats``: measure the logit and entropy
    statistics too (:func:`dpolab.train.objective.batch_objective`).

    Returns:
        ``(sums, first_bad)``: the metric sums of this process (aligned with ``objective.STATS``) and a
        description of the first micro-batch whose loss was not finite (None if all were).
    """
    totals, first_bad = torch.zeros(len(STATS), dtype=torch.float64), None
    with autocast():  # the global batch's numbers for losses that are not per-pair sums (trl's sft, AOT, WPO)
        contexts = global_contexts(model, reference, batches, objective, fast=fast)
    policy_paths = dataclasses.replace(fast, grad_into_weight=True)
    for i, batch in enumerate(batches):
        with dist.gradient_sync(model, sync=i == len(batches) - 1), autocast():
            losses, sums = batch_objective(model, reference, batch, objective, context=contexts[i],
                                           fast=policy_paths, with_stats=with_stats)
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
