"""One benchmark arm: a trainer with one setting, trained for a fixed number of steps, timed step by step.

Every arm trains the same policy (sigmoid DPO, β, AdamW, the same learning rate, no warm-up, constant
schedule, the same gradient clipping, 8 pairs per optimizer step) on the same pairs and reports per-step
wall-clock times, non-padding tokens per step, its exact first-step loss and its peak resident memory. An
arm is meant to run alone in a fresh process (see ``dpo_throughput.py``), so that peaks do not mix.

Arms:

- ``dpolab``: :func:`dpolab.train.trainer.train` with its default configuration (micro-batches of 8 pairs,
  one per optimizer step, length-bucketed batches, reference="copy" computed online).
- ``dpolab-pre``: the same with reference="precomputed" (log π_ref of all pairs computed once before training).
- ``trl-shipped``: trl's ``DPOTrainer`` with ``DPOConfig`` defaults (bf16=True, gradient checkpointing on,
  reference online) — what a user gets.
- ``trl-fp32``: the same with bf16=False (the defaults made sensible on a CPU without bf16 units).
- ``trl-fast``: bf16=False, no gradient checkpointing, reference online.
- ``trl-fast-pre``: bf16=False, no gradient checkpointing, precompute_ref_log_probs=True.

An arm *spec* adds ``+``-separated modifiers to an arm: ``+malloc`` (the glibc settings of :data:`MALLOC_ENV`,
applied by the parent process through the environment) and, on dpolab arms, the patches of ``patches.py`` (for
example ``dpolab+two-rows+fused-gelu``).

trl draws its batches at random (as shipped), except that its first batch is made to be dpolab's first batch,
so the first-step losses of the two trainers are computed on the same 8 pairs and can be compared.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import patches as patching
import torch
from workloads import Workload, pair_tokens, tokenized_pairs

ARMS = ("dpolab", "dpolab-pre", "trl-shipped", "trl-fp32", "trl-fast", "trl-fast-pre")
HYPER = {"beta": 0.1, "lr": 5e-5, "max_grad_norm": 10.0, "batch": 8, "seed": 0}
# glibc: keep freed memory instead of returning it to the OS after every large temporary (DESIGN.md)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
              "MALLOC_TOP_PAD_": str(1 << 30)}


def dpolab_plan(workload: Workload, steps: int, config_fields: dict | None = None,
                layout: str = "tree") -> list[list[int]]:
    """The dataset rows of each of dpolab's optimizer steps (its length-bucketed, seeded batch plan; bucketed by
    the pair-tree length, as the trainer does for the GPT-2 and Llama policies of the workloads)."""
    from dpolab.data.batch import pair_length
    from dpolab.data.tokenize import TokenizedPair
    from dpolab.train.config import TrainConfig
    from dpolab.train.step import BatchPlan

    config = TrainConfig.load(None, {**dpolab_fields(steps, "/tmp/unused"), **(config_fields or {})})
    lengths = [pair_length(TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [], []), layout)
               for r in workload.pairs()]
    plan = BatchPlan(lengths, config, world_size=1)
    return [[i for micro in plan.micro_batches(s, 0)[1] for i in micro] for s in range(steps)]


def dpolab_fields(steps: int, output_dir: str) -> dict:
    """dpolab's config: its defaults, plus the hyperparameters every arm shares."""
    return {"beta": HYPER["beta"], "loss": "sigmoid", "lr": HYPER["lr"], "warmup_steps": 0, "max_steps": steps,
            "max_grad_norm": HYPER["max_grad_norm"], "seed": HYPER["seed"], "output_dir": output_dir,
            "overwrite": True, "progress": False, "kl_samples": 0, "device": "cpu"}


def run_dpolab(workload: Workload, steps: int, *, reference: str = "copy", patches: list[str] = ()) -> dict:
    """Train with dpolab (with ``patches`` applied, see ``patches.py``) and return the timing record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.train.trainer import train

    config_fields = patching.config_fields(patches)
    fast = patching.fast_paths(patches)
    records = workload.pairs()
    tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer_dir)
    pairs = tokenized_pairs(workload)
    plan = dpolab_plan(workload, steps, config_fields, layout="tree" if fast.pair_tree else "rows")
    started = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(workload.policy_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(workload.reference_dir, dtype=torch.float32)
    stamps, cpu, losses = [], [], []
    first_forward = _first_grad_forward(policy)

    def on_step(step, record):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        losses.append(record["loss"])

    patching.patch_models(patches, [policy, ref_model])
    with tempfile.TemporaryDirectory() as out, patching.process_settings(patches):
        fields = {**dpolab_fields(steps, out), "reference": reference, **config_fields}
        train(fields, model=policy, tokenizer=tokenizer, reference_model=ref_model, train_pairs=pairs,
              on_step=on_step, fast=fast)
    tokens = [sum(pair_tokens(records[i]) for i in rows) for rows in plan]
    return _result(started, stamps, cpu, losses, tokens, plan[0], first_forward)


def trl_config_fields(arm: str) -> dict:
    """The DPOConfig fields an arm sets beyond the shared hyperparameters."""
    return {"trl-shipped": {}, "trl-fp32": {"bf16": False},
            "trl-fast": {"bf16": False, "gradient_checkpointing": False},
            "trl-fast-pre": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True}}[arm]


def run_trl(workload: Workload, steps: int, arm: str, *, first_rows: list[int], order: list[int] | None = None,
            extra: dict | None = None) -> dict:
    """Train with trl's DPOTrainer and return the timing record (see :func:`_result`).

    Args:
        first_rows: the pairs of the first optimizer step (dpolab's), so the first-step losses compare.
        order: every row in the order trl should see them; None draws the rest at random (seeded), as shipped.
        extra: further DPOConfig fields (for lever experiments).
    """
    import datasets
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    records = workload.pairs()
    if order is None:
        rest = [i for i in range(len(records)) if i not in set(first_rows)]
        generator = torch.Generator().manual_seed(HYPER["seed"])
        order = list(first_rows) + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    ordered = [records[i] for i in order]
    dataset = datasets.Dataset.from_dict({k: [r[k] for r in ordered] for k in ("prompt", "chosen", "rejected")})
    tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer_dir)
    started = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(workload.policy_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(workload.reference_dir, dtype=torch.float32)
    stamps, cpu, losses, tokens = [], [], [], []
    first_forward = _first_grad_forward(policy)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    class Timed(trl.DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
                tokens.append(int(inputs["attention_mask"].sum()))
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=HYPER["batch"], gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=HYPER["lr"], lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=HYPER["max_grad_norm"], beta=HYPER["beta"], loss_type=["sigmoid"], seed=HYPER["seed"],
            report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
            **trl_config_fields(arm), **(extra or {}))
        trainer = Timed(model=policy, ref_model=ref_model, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[Clock()])
        check_trl_tokens(trainer.train_dataset, ordered)
        trainer.train()
    return _result(started, stamps, cpu, losses, tokens, list(first_rows), first_forward)


def check_trl_tokens(dataset, ordered: list[dict]) -> None:
    """trl tokenizes the text itself: stop if its ids are not the ids dpolab trains on."""
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        got = dataset[name]
        for row, (ids, record) in enumerate(zip(got, ordered)):
            if list(ids) != record[name]:
                raise ValueError(f"trl tokenized row {row}, field {name}, to other ids than the workload's "
                                 f"({list(ids)[:8]}… vs {record[name][:8]}…): the comparison would be void")


def _first_grad_forward(policy: torch.nn.Module) -> list[float]:
    """A list that receives the time of the policy's first forward with gradients on (training starts).

    The hook sits on the decoder body (``base_model``), which every training forward runs: dpolab's fused output
    layer calls the body and not the top-level module, and its sparse embedding lookup bypasses the embedding
    module, so hooks on either never fire."""
    when: list[float] = []

    def hook(module, args, kwargs):
        if not when and torch.is_grad_enabled():
            when.append(time.perf_counter())

    policy.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return when


def _result(started: float, stamps: list[float], cpu: list[float], losses: list[float], tokens: list[int],
            first_rows, first_forward: list[float]) -> dict:
    """Per-step end times (wall seconds after the arm started, and process CPU seconds), setup time (until the
    first training forward), first-step loss, tokens per step, peak RSS."""
    return {"step_end_s": [t - started for t in stamps], "step_end_cpu_s": cpu, "losses": losses,
            "tokens": tokens[: len(stamps)],
            "setup_s": first_forward[0] - started if first_forward else float("nan"),
            "first_loss": losses[0] if losses else float("nan"), "first_rows": list(first_rows),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def parse_spec(spec: str) -> tuple[str, bool, list[str]]:
    """``"dpolab-pre+malloc+two-rows"`` → ``("dpolab-pre", True, ["two-rows"])``."""
    base, *mods = spec.split("+")
    if base not in ARMS:
        raise ValueError(f"arm {spec!r}: {base!r} is not one of {', '.join(ARMS)}")
    names = [m for m in mods if m != "malloc"]
    if names and not base.startswith("dpolab"):
        raise ValueError(f"arm {spec!r}: patches apply to dpolab arms only")
    return base, "malloc" in mods, patching.check(names)


def run_arm(spec: str, workload_dir: Path, steps: int, extra: dict | None = None) -> dict:
    """Run the arm ``spec`` (see :func:`parse_spec`) on the workload in ``workload_dir``."""
    from workloads import load_workload

    base, _, names = parse_spec(spec)
    workload = load_workload(workload_dir)
    extra = extra or {}
    if base.startswith("dpolab"):
        return run_dpolab(workload, steps, reference="precomputed" if base == "dpolab-pre" else "copy",
                          patches=names)
    first = dpolab_plan(workload, 1)[0]
    return run_trl(workload, steps, base, first_rows=first, order=extra.get("trl_order"), extra=extra.get("trl"))
