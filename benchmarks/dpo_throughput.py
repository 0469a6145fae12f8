"""dpolab vs trl 1.16's DPOTrainer on the same work: tokens/s, s/step, peak memory, first-step loss, MFU.

Each arm (see ``arms.py``) runs in a fresh subprocess, so its peak resident memory is its own; arms are
interleaved (dpolab, trl, dpolab, trl, …, order reversed on every other repeat) so that load from other
processes falls on both trainers alike, and the 1-minute load average is recorded at the start and end
of each. The first ``--warmup`` steps and the last step (where dpolab writes its final checkpoint) are
excluded from the timing. Run from the repository root::

    .venv/bin/python benchmarks/dpo_throughput.py --workload tiny            # issue 9 workload (a)
    .venv/bin/python benchmarks/dpo_throughput.py --workload smollm          # workload (b)
    .venv/bin/python benchmarks/dpo_throughput.py --quick                    # a few minutes, smoke-sized
    .venv/bin/python benchmarks/dpo_throughput.py --beta-sweep 3             # item 3: sweep vs independent runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from arms import MALLOC_ENV, parse_spec, run_arm  # noqa: E402
from sweep_bench import run_sweep_benchmark  # noqa: E402
from workloads import prepare  # noqa: E402

LOSS_TOLERANCE = 1e-5
# workload -> steps, warm-up steps, repeats, pairs; trl as shipped (bf16 autocast on a CPU without bf16 units is
# several times slower) runs fewer steps unless --shipped-steps says otherwise
DEFAULTS = {
    "tiny": {"steps": 30, "warmup": 2, "repeats": 3, "pairs": 512, "shipped_steps": 8},
    "smollm": {"steps": 8, "warmup": 2, "repeats": 2, "pairs": 256, "shipped_steps": 5},
}
QUICK = {"tiny": {"steps": 5, "warmup": 2, "repeats": 1, "pairs": 64, "shipped_steps": 4},
         "smollm": {"steps": 4, "warmup": 1, "repeats": 1, "pairs": 32, "shipped_steps": 3}}
# interleaved: each dpolab arm next to the trl arm it is compared with
ORDER = ("dpolab", "trl-fast", "dpolab-pre", "trl-fast-pre", "trl-fp32", "trl-shipped")


# ---------------------------------------------------------------------------------------------------------------
# machine


def machine() -> dict:
    """CPU model, cores, memory, library versions: the line under which every number is reported."""
    import torch
    import transformers
    import trl

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory, 1),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
            "glibc": "-".join(platform.libc_ver())}


def matmul_peak(seconds: float = 3.0) -> dict[str, float]:
    """Float32 matrix-multiply GFLOP/s measured now: the best single-thread burst (256³ and 512³ products) times
    the cores, and the best burst with all threads.

    On a machine shared with other processes a multi-threaded burst rarely gets every core at once (one
    descheduled thread stalls the others), so the machine's peak is taken as cores × the single-core peak.
    """
    import torch

    threads = torch.get_num_threads()
    best = {1: 0.0, threads: 0.0}
    try:
        for n in best:
            torch.set_num_threads(n)
            for size in (256, 512):
                a, b = torch.randn(size, size), torch.randn(size, size)
                torch.mm(a, b)
                deadline = time.perf_counter() + seconds / 4
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    torch.mm(a, b)
                    best[n] = max(best[n], 2 * size**3 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(threads)
    cores = len(os.sched_getaffinity(0))
    return {"per_core": best[1], "cores": cores, "machine": best[1] * cores, "all_threads": best[threads]}


# ---------------------------------------------------------------------------------------------------------------
# one arm in its own process


def worker(args) -> None:
    """Run one arm and write its record (with load averages) to ``args.result``."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    record = run_arm(args.worker, Path(args.workload_dir), args.steps, json.loads(args.extra) if args.extra else None)
    record.update(arm=args.worker, load_start=load_start, load_end=os.getloadavg()[0])
    Path(args.result).write_text(json.dumps(record))


def spawn(spec: str, workload_dir: Path, steps: int, *, threads: int, logs: Path, extra: dict | None = None) -> dict:
    """Run the arm ``spec`` (see ``arms.parse_spec``) in a fresh Python process and return its record."""
    _, malloc, _ = parse_spec(spec)
    stamp = time.time_ns()
    result = logs / f"{spec}-{stamp}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DPOLAB_CACHE": str(logs / f"cache-{stamp}"), "HF_DATASETS_CACHE": str(logs / "hf-datasets"),
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    for key in MALLOC_ENV:
        env.pop(key, None)
    if malloc:
        env.update(MALLOC_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--workload-dir", str(workload_dir),
           "--steps", str(steps), "--result", str(result), "--threads", str(threads)]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    log = logs / f"{result.stem}.log"
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"arm {spec} failed (exit {code}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------------------
# summary


def steady_state(record: dict, warmup: int) -> dict:
    """tokens/s and s/step over the steps after the warm-up and before the last (checkpoint) step."""
    ends, tokens = record["step_end_s"], record["tokens"]
    last = len(ends) - 1  # excluded: dpolab saves its final checkpoint inside it
    if last - warmup < 1:
        raise ValueError(f"{len(ends)} steps leave nothing to time after {warmup} warm-up steps and the last step")
    seconds = ends[last - 1] - ends[warmup - 1] if warmup else ends[last - 1]
    measured = tokens[warmup:last]
    cpu = record["step_end_cpu_s"]
    cpu_seconds = cpu[last - 1] - cpu[warmup - 1] if warmup else float("nan")
    return {"tokens_per_s": sum(measured) / seconds, "s_per_step": seconds / len(measured),
            "cpu_s_per_step": cpu_seconds / len(measured),
            "tokens_per_step": sum(measured) / len(measured), "setup_s": record["setup_s"]}


def flops_per_token(spec: str, params: int) -> int:
    """Model FLOPs per trained token: 6·P for the policy's forward and backward, 2·P for an online reference."""
    online = spec.split("+")[0] in ("dpolab", "trl-shipped", "trl-fp32", "trl-fast")
    return (6 + 2 * online) * params


def summarise(records: list[dict], warmup: int, params: int, peak_gflops: float) -> dict[str, dict]:
    """Median and range of each arm's repeats, keyed by arm spec."""
    by_arm: dict[str, list[dict]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], []).append(r)
    rows = {}
    for name, runs in by_arm.items():
        stats = [steady_state(r, warmup) for r in runs]

        def spread(key, stats=stats):
            values = [s[key] for s in stats]
            return statistics.median(values), min(values), max(values)

        tps = spread("tokens_per_s")
        rows[name] = {
            "tokens_per_s": tps, "s_per_step": spread("s_per_step"), "setup_s": spread("setup_s")[0],
            "cpu_s_per_step": spread("cpu_s_per_step")[0],
            "total_s": statistics.median(r["step_end_s"][-1] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "first_loss": runs[0]["first_loss"], "first_losses": [r["first_loss"] for r in runs],
            "mfu": tps[0] * flops_per_token(runs[0]["arm"], params) / (peak_gflops * 1e9),
            "load": [(r["load_start"], r["load_end"]) for r in runs], "n": len(runs),
            "tokens_per_step": stats[0]["tokens_per_step"], "first_rows": runs[0]["first_rows"],
            "steps": len(runs[0]["step_end_s"]),
        }
    return rows


def loss_check(rows: dict[str, dict]) -> dict[str, float]:
    """Largest first-step loss difference of each arm from dpolab's (over its repeats)."""
    base = rows.get("dpolab", rows.get("dpolab+malloc", next(iter(rows.values()))))["first_loss"]
    return {name: max(abs(x - base) for x in row["first_losses"]) for name, row in rows.items()}


def counterparts(spec: str, rows: dict) -> dict[str, str]:
    """The trl arms a dpolab arm is compared with: as shipped, fp32 defaults, fastest with the same reference
    strategy (each with the dpolab arm's malloc setting where that trl arm was run with it)."""
    base, malloc, _ = parse_spec(spec)
    suffix = "+malloc" if malloc else ""
    fastest = "trl-fast-pre" if base == "dpolab-pre" else "trl-fast"
    pick = {}
    for role, arm in (("shipped", "trl-shipped"), ("fp32", "trl-fp32"), ("fastest", fastest)):
        name = arm + suffix if arm + suffix in rows else arm
        if name in rows:
            pick[role] = name
    return pick


def format_table(rows: dict[str, dict], *, title: str, warmup: int) -> str:
    """The result table, the loss check, and the ratios the issue asks for."""
    diffs = loss_check(rows)
    lines = [f"## {title}", "",
             f"timed: the steps after the first {warmup} (warm-up) and before the last (dpolab writes its final "
             "checkpoint there); median [min–max] over repeats; tokens = non-padding tokens of prompt+chosen and "
             "prompt+rejected rows; CPU s = process CPU time (all threads, user+system); setup = start of the arm "
             "(before loading the models) to the policy's first training forward; total = arm start to the end of the "
             "last step",
             "",
             "| arm | steps | tokens/s | s/step | CPU s/step | tokens/step | setup s | total s | peak RSS MB | first-step loss "
             "| Δ vs dpolab | MFU | load 1-min (start→end) | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, s = r["tokens_per_s"], r["s_per_step"]
        load = ", ".join(f"{a:.1f}→{b:.1f}" for a, b in r["load"])
        flag = "" if diffs[name] <= LOSS_TOLERANCE else " **≠**"
        lines.append(f"| {name} | {r['steps']} | {t[0]:.0f} [{t[1]:.0f}–{t[2]:.0f}] | {s[0]:.2f} [{s[1]:.2f}–{s[2]:.2f}] | "
                     f"{r['cpu_s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['setup_s']:.1f} | {r['total_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['first_loss']:.7f} | {diffs[name]:.1e}{flag} | {100 * r['mfu']:.1f}% | {load} | {r['n']} |")
    lines.append("")
    void = [n for n, d in diffs.items() if d > LOSS_TOLERANCE]
    if not void:
        lines.append(f"First-step losses agree to {LOSS_TOLERANCE:g} across all arms: the comparison holds.")
    else:
        lines.append(f"**First-step loss differs from dpolab's by more than {LOSS_TOLERANCE:g} for {', '.join(void)}: "
                     "the comparison with these arms is VOID (not the same computation"
                     + ("; trl-shipped runs under bf16 autocast" if any("shipped" in n for n in void) else "")
                     + ").**")
    lines += ["", "Ratios of tokens/s (dpolab ÷ trl; issue targets: ≥ 2× trl's defaults, ≥ 1.3× trl's fastest settings "
              "with the same reference strategy, peak memory ≤ trl's):", "",
              "| dpolab arm | ÷ trl as shipped (bf16) | ÷ trl defaults, bf16=False | ÷ trl fastest, same reference "
              "| peak RSS ÷ that trl arm |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        if not name.startswith("dpolab"):
            continue
        other = counterparts(name, rows)

        def ratio(role, row=row, other=other, name=name):
            if role not in other:
                return "—"
            mark = " (void)" if max(diffs[name], diffs[other[role]]) > LOSS_TOLERANCE else ""
            return f"{row['tokens_per_s'][0] / rows[other[role]]['tokens_per_s'][0]:.2f}×{mark}"

        rss = (f"{row['peak_rss_mb'] / rows[other['fastest']]['peak_rss_mb']:.2f} ({other['fastest']})"
               if "fastest" in other else "—")
        fastest = f"{ratio('fastest')} ({other['fastest']})" if "fastest" in other else "—"
        lines.append(f"| {name} | {ratio('shipped')} | {ratio('fp32')} | {fastest} | {rss} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# runs


def arm_list(args) -> list[str]:
    """Arm specs in interleaved order (dpolab next to its trl counterpart), with ``+malloc`` as asked."""
    rank = {a: i for i, a in enumerate(ORDER)}
    arms = sorted(args.arms, key=lambda spec: (rank.get(spec.split("+")[0], len(ORDER)), spec))
    suffixes = {"off": [""], "on": ["+malloc"], "both": ["", "+malloc"]}[args.malloc]
    return [a + s for s in suffixes for a in arms]


def run_workload(args, name: str, logs: Path, peak: float) -> str:
    sizes = (QUICK if args.quick else DEFAULTS)[name]
    steps, warmup = args.steps or sizes["steps"], sizes["warmup"] if args.warmup is None else args.warmup
    repeats = args.repeats or sizes["repeats"]
    shipped_steps = args.shipped_steps or (args.steps or sizes["shipped_steps"])
    started = time.perf_counter()
    workload = prepare(name, logs / name, args.pairs or sizes["pairs"])
    print(f"[{name}] workload prepared in {time.perf_counter() - started:.0f} s: {workload.num_pairs} pairs, "
          f"{workload.matmul_params / 1e6:.2f} M matmul parameters", flush=True)
    records = []
    for repeat in range(repeats):
        order = arm_list(args)
        for arm in order if repeat % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            arm_steps = shipped_steps if arm.startswith("trl-shipped") else steps
            record = spawn(arm, workload.folder, arm_steps, threads=args.threads, logs=logs)
            records.append(record)
            state = steady_state(record, warmup)
            print(f"[{name}] repeat {repeat + 1}/{repeats} {arm}: "
                  f"{state['tokens_per_s']:.0f} tokens/s, {state['s_per_step']:.2f} s/step, "
                  f"loss₁ {record['first_loss']:.7f}, peak {record['peak_rss_mb']:.0f} MB, "
                  f"load {record['load_start']:.1f}→{record['load_end']:.1f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    rows = summarise(records, warmup, workload.matmul_params, peak)
    title = (f"workload {name}: {workload.num_pairs} pairs, batch 8, sigmoid DPO β=0.1, AdamW lr 5e-5, "
             f"{workload.matmul_params / 1e6:.2f} M matmul parameters")
    table = format_table(rows, title=title, warmup=warmup)
    if args.json:
        Path(args.json).with_suffix(f".{name}.json").write_text(json.dumps({"records": records, "rows": rows}))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["tiny", "smollm", "all"], default="tiny")
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument("--arms", default=",".join(ORDER),
                        help=f"comma-separated arm specs: {','.join(ORDER)}, each optionally with +PATCH "
                             "(dpolab arms; see patches.py) and +malloc")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default per workload)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default per workload)")
    parser.add_argument("--repeats", type=int, help="runs of each arm (default per workload)")
    parser.add_argument("--shipped-steps", type=int, help="optimizer steps of trl-shipped (default: per workload)")
    parser.add_argument("--pairs", type=int, help="pairs in the workload (default per workload)")
    parser.add_argument("--malloc", choices=["off", "on", "both"], default="off",
                        help="run arms with the glibc malloc settings of DESIGN.md (both: each arm twice)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    parser.add_argument("--beta-sweep", type=int, default=0, metavar="K",
                        help="instead of the table: a sweep of K β values reusing cached reference log-probs and "
                             "tokenized pairs vs K independent runs")
    parser.add_argument("--workdir", help="folder for workloads and logs (default: a temporary folder)")
    parser.add_argument("--json", help="also write the raw records to JSON.<workload>.json")
    # internal: one arm in this process
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--extra", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for spec in args.arms:
        try:
            parse_spec(spec)
        except ValueError as err:
            parser.error(str(err))

    info = machine()
    peak = matmul_peak()
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    command = shlex.join([exe, *sys.argv])
    print(f"command: {command}")
    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['capability']}), {info['memory_gib']} GiB; "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
          f"python {info['python']}, {info['glibc']}")
    print(f"float32 matmul peak measured now: {peak['machine']:.0f} GFLOP/s = {peak['cores']} cores × "
          f"{peak['per_core']:.0f} (best single-thread burst; best burst with all threads: "
          f"{peak['all_threads']:.0f}); load average {os.getloadavg()[0]:.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        logs = Path(args.workdir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        if args.beta_sweep:
            print(run_sweep_benchmark(args, logs))
            return 0
        names = ["tiny", "smollm"] if args.workload == "all" else [args.workload]
        tables = [run_workload(args, name, logs, peak["machine"]) for name in names]
    peak_end = matmul_peak()
    print()
    print("\n\n".join(tables))
    print(f"\nMFU = model FLOPs/s ÷ the matmul peak ({peak['machine']:.0f} GFLOP/s at the start; "
          f"{peak_end['machine']:.0f} at the end, load average {os.getloadavg()[0]:.2f}); "
          "model FLOPs per token = 6·P (policy forward+backward) + 2·P (online reference forward), P = matmul "
          "parameters (embedding lookups excluded, tied LM head counted once), attention score FLOPs ignored.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
