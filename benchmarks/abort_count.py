"""Count aborts at exit of distributed runs: the gloo tests and a real ``torchrun -m dpolab.cli train``, N rounds.

A process of a two-process gloo run used to die now and then *after* its work with SIGABRT, "terminate called
without an active exception" (issue 28): the process group outlived ``destroy_process_group`` and was torn down
inside the interpreter's shutdown (see ``dpolab.train.distributed._import_group_default_holders``). The abort was
rare, so the evidence that it is gone is a count over many launches. Each round runs

1. ``pytest -m "distributed and not slow"`` on the distributed test files: every test launches one
   ``torchrun --nproc_per_node=2`` of two gloo processes (4 launches with both default files);
2. one real ``torchrun --standalone --nproc_per_node=2 -m dpolab.cli train`` of tiny-gpt2 on 16 pairs (3 steps, a
   checkpoint each step, an evaluation).

A launch counts as an abort when a process ended with SIGABRT (torchrun's ``exitcode: -6`` / ``Signal 6``) or
printed ``terminate called``; any other failure is counted apart. Nothing is retried.

    python benchmarks/abort_count.py --rounds 6                     # 30 launches, ~10 minutes on two cores
    python benchmarks/abort_count.py --rounds 1 --tests tests/test_loss_distributed.py   # the quick form (3)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_loss_distributed.py", "tests/test_distributed.py"]
ABORT = re.compile(r"terminate called|Signal 6 \(SIGABRT\)|exitcode\s*:\s*-6|SIGABRT")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _outcome(returncode: int, text: str) -> str:
    if ABORT.search(text) or returncode in (-6, 134):
        return "abort"
    return "ok" if returncode == 0 else "failed"


def run_tests(files: list[str], work: Path) -> list[dict]:
    """One pytest run of the launching tests in ``files``; one record per test (= one torchrun launch)."""
    report = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "distributed and not slow",
           f"--junitxml={report}", *files]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env())
    if not report.is_file():
        return [{"launch": "pytest", "outcome": _outcome(done.returncode or 1, done.stdout + done.stderr),
                 "detail": (done.stdout + done.stderr)[-2000:]}]
    records = []
    for case in ET.parse(report).iter("testcase"):
        problems = [e for e in case if e.tag in ("failure", "error")]
        skipped = any(e.tag == "skipped" for e in case)
        if skipped:
            continue
        text = "\n".join((e.get("message") or "") + (e.text or "") for e in problems)
        records.append({"launch": f"{case.get('classname')}::{case.get('name')}",
                        "outcome": _outcome(1 if problems else 0, text), "detail": text[-2000:]})
    return records


def run_train(work: Path) -> dict:
    """One real ``torchrun -m dpolab.cli train`` of two gloo processes on tiny-gpt2."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_runs import make_examples

    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                            for e in make_examples(16)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dpolab.cli",
           "train", "model=tiny-gpt2", f"train_data={data}", f"eval_data={data}", f"output_dir={work / 'run'}",
           "max_steps=3", "micro_batch_size=2", "save_every=1", "eval_every=3", "eval_batch_size=4", "progress=false",
           "kl_samples=0", "lr=1e-3", "warmup_steps=1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env())
    text = done.stdout + done.stderr
    metrics = work / "run" / "metrics.jsonl"
    steps = sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.is_file() else 0
    outcome = _outcome(done.returncode, text)
    if outcome == "ok" and steps != 3:  # exit 0 without the work is no evidence
        outcome, text = "failed", f"exit 0 but {steps} step records in {metrics}\n{text}"
    return {"launch": "torchrun -m dpolab.cli train", "outcome": outcome, "detail": text[-2000:] if outcome != "ok" else ""}


def count(rounds: int, tests: list[str], train: bool = True, log=print) -> dict:
    """Run ``rounds`` rounds; return the totals and every launch's outcome."""
    launches: list[dict] = []
    started = time.perf_counter()
    for i in range(rounds):
        with tempfile.TemporaryDirectory(prefix="abort-count-") as tmp:
            work = Path(tmp)
            records = run_tests(tests, work) if tests else []
            if train:
                records.append(run_train(work))
        for r in records:
            r["round"] = i + 1
            log(f"round {i + 1}: {r['outcome']:7s} {r['launch']}")
            if r["outcome"] != "ok":
                log(r["detail"])
        launches += records
    totals = {k: sum(r["outcome"] == k for r in launches) for k in ("ok", "abort", "failed")}
    return {"launches": len(launches), **totals, "rounds": rounds, "tests": tests, "train": train,
            "seconds": round(time.perf_counter() - started, 1), "records": launches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (distributed tests + one train run)")
    parser.add_argument("--tests", nargs="*", default=TESTS, help="distributed test files (none: only train runs)")
    parser.add_argument("--no-train", action="store_true", help="skip the real torchrun train run")
    parser.add_argument("--out", help="write the totals and every launch's outcome to this JSON file")
    args = parser.parse_args(argv)
    result = count(args.rounds, args.tests, train=not args.no_train)
    print(f"{result['launches']} launches of 2 gloo processes: {result['abort']} aborted, {result['failed']} failed "
          f"otherwise, {result['ok']} ok ({result['seconds']} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] == result["launches"] else 1


if __name__ == "__main__":
    sys.exit(main())
