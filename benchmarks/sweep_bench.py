"""Issue 9 item 3: a β sweep of k values that reuses work, against k independent runs.

Three ways to train the same k policies (same workload, steps and hyperparameters; only β changes):

- ``independent``: k fresh processes, each tokenizing the text pairs, loading the models and training with
  dpolab's default reference (a frozen copy, computed online at every step).
- ``independent-pre``: k fresh processes with reference="precomputed" and an empty cache each, so each one
  computes log π_ref of the whole dataset before training (what a sweep without a shared cache pays).
- ``sweep``: one process that tokenizes once, computes the reference log-probs once (a content-hashed cache
  artifact) and trains the k policies from the same initial weights with reference="precomputed"; every run
  after the first finds the table in the cache.

Every mode reports its wall-clock total, including process start, imports, model loading and tokenization.
``dpo_throughput.py --beta-sweep K`` runs it; each mode runs this file as its worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import prepare  # noqa: E402

BETAS = (0.1, 0.05, 0.2, 0.5, 0.02, 1.0, 0.01, 2.0)
SIZES = {"tiny": {"steps": 30, "pairs": 512}, "smollm": {"steps": 8, "pairs": 256}}
QUICK = {"tiny": {"steps": 3, "pairs": 64}, "smollm": {"steps": 2, "pairs": 16}}


def sweep_worker(mode: str, workload_dir: Path, betas: list[float], steps: int) -> dict:
    """Train one policy per β in this process; ``mode`` as in the module docstring. Returns per-run seconds."""
    import torch
    from arms import dpolab_fields
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from workloads import load_workload

    from dpolab.data.prepare import prepare_pairs, tokenize_config
    from dpolab.train.config import TrainConfig
    from dpolab.train.trainer import train

    workload = load_workload(workload_dir)
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in workload.pairs()]
    tokenizer = AutoTokenizer.from_pretrained(workload.tokenizer_dir)
    reference = "copy" if mode == "independent" else "precomputed"
    runs = []
    data = None
    for beta in betas:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            fields = {**dpolab_fields(steps, out), "beta": beta, "reference": reference, "max_length": 512,
                      "max_prompt_length": 128}
            if data is None or mode != "sweep":
                data = prepare_pairs(records, tokenizer, tokenize_config(TrainConfig.load(None, fields))).pairs
            policy = AutoModelForCausalLM.from_pretrained(workload.policy_dir, dtype=torch.float32)
            ref_model = AutoModelForCausalLM.from_pretrained(workload.reference_dir, dtype=torch.float32)
            result = train(fields, model=policy, tokenizer=tokenizer, reference_model=ref_model, train_pairs=data)
        runs.append({"beta": beta, "seconds": time.perf_counter() - started, "final_loss": result.history[-1]["loss"]})
    return {"mode": mode, "runs": runs}


def _spawn(mode: str, workload_dir: Path, betas: list[float], steps: int, cache: Path) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "DPOLAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--workload-dir", str(workload_dir),
           "--steps", str(steps), "--betas", ",".join(map(str, betas))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sweep worker {mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def run_sweep_benchmark(args, logs: Path) -> str:
    """Run the three modes (interleaved where they are several processes) and return a table."""
    name = "tiny" if args.workload == "all" else args.workload
    sizes = (QUICK if args.quick else SIZES)[name]
    steps, k = args.steps or sizes["steps"], args.beta_sweep
    betas = list(BETAS[:k]) if k <= len(BETAS) else [0.1 * 1.5**i for i in range(k)]
    workload = prepare(name, logs / name, args.pairs or sizes["pairs"])
    load_start = os.getloadavg()[0]
    totals = {"independent": 0.0, "independent-pre": 0.0}
    finals = {}
    for i, beta in enumerate(betas):  # one independent run of each kind per β, alternating
        for mode in totals:
            result = _spawn(mode, workload.folder, [beta], steps, logs / f"cache-{mode}-{i}")
            totals[mode] += result["process_seconds"]
            finals[(mode, beta)] = result["runs"][0]["final_loss"]
    sweep = _spawn("sweep", workload.folder, betas, steps, logs / "cache-sweep")
    totals["sweep"] = sweep["process_seconds"]
    for run in sweep["runs"]:
        finals[("sweep", run["beta"])] = run["final_loss"]
    same = all(abs(finals[("sweep", b)] - finals[("independent-pre", b)]) < 1e-5 for b in betas)
    lines = [f"## β sweep of k={k} on workload {name} ({workload.num_pairs} pairs, {steps} steps per run, "
             f"β ∈ {betas})", "",
             "| mode | wall s (all k runs, process start included) | per run | independent ÷ this |", "|---|---|---|---|"]
    for mode, seconds in totals.items():
        lines.append(f"| {mode} | {seconds:.0f} | {seconds / k:.1f} | {totals['independent'] / seconds:.2f}× |")
    lines += ["", "sweep runs inside its one process (s): "
              + ", ".join(f"β={r['beta']}: {r['seconds']:.1f}" for r in sweep["runs"]),
              f"final losses of the sweep equal the independent precomputed runs' to 1e-5: {same}",
              f"load average {load_start:.1f} → {os.getloadavg()[0]:.1f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One worker process: train one policy per β in ``--mode`` and print the per-run record as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["independent", "independent-pre", "sweep"], required=True)
    parser.add_argument("--workload-dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--betas", required=True, help="comma-separated β values")
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    print(json.dumps(sweep_worker(args.mode, Path(args.workload_dir), betas, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
