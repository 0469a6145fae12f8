"""Issue 9 item 2: which levers pay for dpolab's training step, each measured against the current step.

A *step* here is the trainer's own optimizer step, :func:`dpolab.train.step.optimizer_step` (the gradients of
the step's micro-batches, clipping, AdamW), without the trainer's bookkeeping around it (schedule, metrics,
checkpoints). Each lever is a variant of that step: a patch of ``patches.py`` (a speed path switched off, a
swapped module, a batch size, a thread count) or a different setup of its inputs (:data:`SETUP`: the batch plan,
the reference, the optimizer). Variants and the baseline run in the same process, alternating (baseline, lever,
baseline, lever, …) on the same batches, each from the same initial weights, so load from other processes falls on
both; the first step of each block is a warm-up. Each lever also reports the largest difference of its first-step
loss from the baseline's: a lever that changes the mathematics by more than 1e-5 is not kept whatever its speed.
Run from the repository root::

    .venv/bin/python benchmarks/levers.py --workload-dir DIR [--levers a,b,c] [--rounds 3] [--steps 4]

where DIR is a prepared workload (``dpo_throughput.py --workdir DIR`` leaves ``DIR/tiny``). The baseline uses the
trainer's optimizer (fused AdamW; lever ``foreach-adamw`` is torch's multi-pass default) but not the trainer's
allocator setting (:mod:`dpolab.fast.allocator`), which is process-wide: ``--malloc`` runs the baseline in fresh
processes under the settings of ``arms.MALLOC_ENV``, and ``dpo_throughput.py`` measures the trainer with and
without it (patch ``system-malloc``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import patches as patching  # noqa: E402
from workloads import load_workload, tokenized_pairs  # noqa: E402

# levers that change how the step's inputs are set up, not the library
SETUP = ("random-batches", "row-buckets", "precomputed", "foreach-adamw")
LEVERS = tuple(p for p in patching.PATCHES if p != "system-malloc") + SETUP  # system-malloc: see --malloc


def _config(micro: int = 8, accum: int = 1):
    from dpolab.train.config import TrainConfig

    return TrainConfig.load(None, {"beta": 0.1, "lr": 5e-5, "warmup_steps": 0, "micro_batch_size": micro,
                                   "grad_accum_steps": accum, "max_grad_norm": 10.0, "kl_samples": 0})


def plan_batches(pairs, steps: int, *, micro: int = 8, accum: int = 1, bucketed: bool = True, seed: int = 0,
                 layout: str = "tree"):
    """The first ``steps`` optimizer steps as lists of collated micro-batches (dpolab's plan, bucketed by
    ``layout``'s pair length as the trainer does for a GPT-2 or Llama policy, or random order)."""
    from dpolab.data.batch import collate_pairs, pair_length
    from dpolab.train.step import BatchPlan

    config = _config(micro, accum)
    if bucketed:
        plan = BatchPlan([pair_length(p, layout) for p in pairs], config, world_size=1)
        rows = [plan.micro_batches(s, 0)[1] for s in range(steps)]
    else:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        glob = micro * accum
        rows = [[order[s * glob + m * micro: s * glob + (m + 1) * micro] for m in range(accum)] for s in range(steps)]
    return [[collate_pairs([pairs[i] for i in r], 0, index=r) for r in step] for step in rows]


class Setup:
    """Everything one variant's step needs; :meth:`step` runs one optimizer step and returns (seconds, loss, …)."""

    def __init__(self, policy, reference, steps_batches, *, fast, foreach_adam: bool = False, micro: int = 8,
                 accum: int = 1):
        from dpolab.train.step import build_optimizer

        self.policy, self.reference, self.batches, self.fast = policy, reference, steps_batches, fast
        self.config = _config(micro, accum)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.config, fused=not foreach_adam)  # the trainer's optimizer

    def step(self, i: int) -> tuple[float, float, int, float]:
        """Optimizer step ``i`` (on the ``i``-th planned batches, cyclically): wall s, mean loss, tokens, CPU s."""
        from dpolab.train.distributed import DistributedContext
        from dpolab.train.objective import STATS, Objective
        from dpolab.train.step import optimizer_step

        batches = self.batches[i % len(self.batches)]
        start, cpu = time.perf_counter(), time.process_time()
        totals, _ = optimizer_step(self.policy, self.reference, batches, self.optimizer, self.params,
                                   objective=Objective.from_config(self.config),
                                   max_grad_norm=self.config.max_grad_norm, ctx=DistributedContext(), fast=self.fast,
                                   scale=1.0 / (self.config.micro_batch_size * self.config.grad_accum_steps))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        loss = float(totals[STATS.index("loss")] / totals[STATS.index("pairs")])
        return seconds, loss, int(totals[STATS.index("tokens")]), cpu


def _models(workload):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(workload.policy_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(workload.reference_dir, dtype=torch.float32)
    return policy, reference


def lever_parts(lever: str) -> set[str]:
    """The levers joined by ``+`` in ``lever``; an unknown name is refused (it would time the baseline twice)."""
    parts = set(lever.split("+"))
    unknown = parts - set(LEVERS) - {"baseline"}
    if unknown:
        raise ValueError(f"unknown lever(s) {sorted(unknown)} in {lever!r}; known: {', '.join(LEVERS)}")
    return parts


def build(lever: str, workload, pairs, steps: int):
    """A :class:`Setup` for ``lever`` (several joined by ``+`` combine) and the context it steps in."""
    from dpolab.train.reference import FrozenReference
    from dpolab.train.reference_table import precompute_reference

    parts = lever_parts(lever)
    patches = sorted(parts & set(patching.PATCHES))
    fields, fast = patching.config_fields(patches), patching.fast_paths(patches)
    micro, accum = fields.get("micro_batch_size", 8), fields.get("grad_accum_steps", 1)
    policy, ref_model = _models(workload)
    patching.patch_models(patches, [policy, ref_model])
    batches = plan_batches(pairs, steps, micro=micro, accum=accum, bucketed="random-batches" not in parts,
                           layout="rows" if "row-buckets" in parts else "tree")
    reference = FrozenReference(ref_model, fast=fast)
    if "precomputed" in parts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer_dir)
        reference = precompute_reference(ref_model, tokenizer, pairs, batch_size=8, fast=fast)
    setup = Setup(policy, reference, batches, fast=fast, foreach_adam="foreach-adamw" in parts, micro=micro,
                  accum=accum)
    return setup, lambda: patching.process_settings(patches)


def measure(workload_dir: Path, levers: list[str], *, rounds: int, steps: int) -> list[dict]:
    """For each lever, ``rounds`` alternating blocks of ``steps`` steps (baseline, lever); per-step timings."""
    for lever in levers:
        lever_parts(lever)
    workload = load_workload(workload_dir)
    pairs = tokenized_pairs(workload)
    results = []
    for lever in levers:
        torch.manual_seed(0)
        base, base_ctx = build("baseline", workload, pairs, steps)
        built_at = time.perf_counter()
        var, var_ctx = build(lever, workload, pairs, steps)
        setup_s = time.perf_counter() - built_at
        times = {"baseline": [], lever: []}
        cpu = {"baseline": [], lever: []}
        tokens = {"baseline": [], lever: []}
        losses, first_steps = {}, {"baseline": [], lever: []}
        for _ in range(rounds):
            for name, setup, ctx in (("baseline", base, base_ctx), (lever, var, var_ctx)):
                # fresh weights each block: every block does the same work from the same start
                start_state = copy.deepcopy(setup.policy.state_dict())
                with ctx():
                    for i in range(steps):
                        seconds, loss, n, cpu_s = setup.step(i)
                        if i == 0:
                            losses.setdefault(name, loss)
                            first_steps[name].append(seconds)
                        else:  # the first step of a block is a warm-up
                            times[name].append(seconds)
                            cpu[name].append(cpu_s)
                            tokens[name].append(n)
                setup.policy.load_state_dict(start_state)
                setup.optimizer.state.clear()
        b, v = statistics.median(times["baseline"]), statistics.median(times[lever])
        tb, tv = sum(tokens["baseline"]) / sum(times["baseline"]), sum(tokens[lever]) / sum(times[lever])
        cb, cv = statistics.median(cpu["baseline"]), statistics.median(cpu[lever])
        results.append({"lever": lever, "baseline_s": b, "lever_s": v, "speedup_s_per_step": b / v,
                        "baseline_cpu_s": cb, "lever_cpu_s": cv, "speedup_cpu_s": cb / cv,
                        "baseline_tokens_per_s": tb, "lever_tokens_per_s": tv, "speedup_tokens_per_s": tv / tb,
                        "loss_diff": abs(losses["baseline"] - losses[lever]), "setup_s": setup_s,
                        "first_step_s": {k: v[0] for k, v in first_steps.items()},
                        "load": os.getloadavg()[0]})
        print(json.dumps(results[-1]), flush=True)
    return results


def single(workload_dir: Path, steps: int) -> dict:
    """The baseline alone, in this process: per-step seconds (first excluded) and minor page faults."""
    import resource

    workload = load_workload(workload_dir)
    setup, _ = build("baseline", workload, tokenized_pairs(workload), steps)
    times, faults = [], []
    for i in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds, loss, n, cpu_s = setup.step(i)
        if i:
            times.append(seconds)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"s_per_step": statistics.median(times), "faults_per_step": statistics.median(faults),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


CATEGORIES = (  # (category, predicate on an op's name and input shapes), first match wins
    ("output layer (LM head matmuls)", lambda name, shapes, vocab: "mm" in name and any(
        vocab in dims for dims in shapes if isinstance(dims, list))),
    ("other matmuls", lambda name, shapes, vocab: name in ("aten::mm", "aten::addmm", "aten::bmm")),
    ("log-softmax at scored tokens", lambda name, shapes, vocab: name in (
        "aten::logsumexp", "aten::exp", "aten::exp_", "aten::amax", "aten::scatter_add_", "aten::gather")),
    ("attention (SDPA)", lambda name, shapes, vocab: "scaled_dot_product" in name),
    ("GELU (elementwise)", lambda name, shapes, vocab: name in ("aten::tanh", "aten::pow", "aten::tanh_backward",
                                                                "aten::gelu", "aten::gelu_backward")),
    ("layer norm", lambda name, shapes, vocab: "layer_norm" in name),
    ("optimizer (AdamW)", lambda name, shapes, vocab: name.startswith(("aten::_foreach", "aten::_fused_adam"))),
    ("SiLU (elementwise)", lambda name, shapes, vocab: name in ("aten::silu", "aten::silu_backward")),
    ("other elementwise (mul, add, sub, where, …)", lambda name, shapes, vocab: name in (
        "aten::mul", "aten::add", "aten::sub", "aten::where", "aten::div", "aten::mul_", "aten::add_",
        "aten::sum", "aten::neg")),
    ("copies, fills, indexing", lambda name, shapes, vocab: name in (
        "aten::copy_", "aten::fill_", "aten::zero_", "aten::index", "aten::index_select", "aten::_index_put_impl_",
        "aten::cat", "aten::clone", "aten::empty", "aten::zeros", "aten::embedding_dense_backward")),
)


def profile(workload_dir: Path, steps: int) -> str:
    """Self CPU time of the baseline step by category (torch profiler over ``steps`` steps after one warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    workload = load_workload(workload_dir)
    setup, _ = build("baseline", workload, tokenized_pairs(workload), steps + 1)
    vocab = setup.policy.get_output_embeddings().weight.shape[0]
    setup.step(0)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(1, steps + 1):
            setup.step(i)
    totals: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        category = next((c for c, match in CATEGORIES if match(event.key, event.input_shapes, vocab)), "rest")
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    lines = [f"| where the time goes ({steps} steps, {torch.get_num_threads()} threads) | CPU s | share |",
             "|---|---|---|"]
    for category, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {seconds:.2f} | {100 * seconds / whole:.0f}% |")
    return "\n".join(lines)


def malloc_compare(workload_dir: Path, *, rounds: int, steps: int) -> dict:
    """The baseline in fresh processes, alternately without and with the glibc malloc settings."""
    import subprocess

    from arms import MALLOC_ENV

    runs = {"default": [], "malloc": []}
    for _ in range(rounds):
        for name in runs:
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
            if name == "malloc":
                env.update(MALLOC_ENV)
            out = subprocess.run([sys.executable, __file__, "--workload-dir", str(workload_dir), "--single",
                                  "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    summary["speedup"] = summary["default"]["s_per_step"] / summary["malloc"]["s_per_step"]
    print(json.dumps(summary), flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload-dir", required=True)
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default); 1 makes CPU time "
                        "a load-robust measure of work")
    parser.add_argument("--malloc", action="store_true", help="compare the glibc malloc settings (processes)")
    parser.add_argument("--profile", action="store_true", help="where the baseline step's time goes, by category")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "DPOLAB_CACHE" not in os.environ:  # precomputed reference tables go to a throw-away cache
        import tempfile

        os.environ["DPOLAB_CACHE"] = tempfile.mkdtemp(prefix="dpolab-levers-")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile(Path(args.workload_dir), args.steps))
        return 0
    if args.single:
        print(json.dumps(single(Path(args.workload_dir), args.steps)))
        return 0
    if args.malloc:
        malloc_compare(Path(args.workload_dir), rounds=args.rounds, steps=args.steps)
        return 0
    rows = measure(Path(args.workload_dir), args.levers.split(","), rounds=args.rounds, steps=args.steps)
    print("\n| lever | baseline s/step | lever s/step | speed-up (wall s/step) | speed-up (CPU s/step) "
          "| speed-up (tokens/s) | Δ first loss | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lever']} | {r['baseline_s']:.2f} | {r['lever_s']:.2f} | {r['speedup_s_per_step']:.2f}× | "
              f"{r['speedup_cpu_s']:.2f}× | {r['speedup_tokens_per_s']:.2f}× | {r['loss_diff']:.1e} | {r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
