"""Write the golden trajectory of one tiny DPO run: tests/golden/dpo_tiny_metrics.json.

The run: random tiny GPT-2 (``tiny-gpt2``, seed 0), DPO with β = 0.5 from the initial policy (no SFT), 16 training
pairs in 8 optimizer steps of 2 micro-batches × 2 pairs (so every step accumulates), a cosine learning rate after
2 warm-up steps, and one held-out evaluation (6 pairs, KL from 2 samples of 4 tokens) at the end. On one CPU
thread the run is bit-for-bit repeatable; tests/test_golden.py reruns it and compares every number.

Regenerate only when a change of the numbers is intended, and say why in the commit::

    OMP_NUM_THREADS=1 .venv/bin/python tests/golden/make_golden.py

float32 kernels of another instruction set sum in another order, so the same run on a CPU of another kind differs
in the sixth digit (AVX2 against the AVX-512 machine that wrote dpo_tiny_metrics.json: grad_norm 2.8003223 against
2.8003266 at step 4, eval_kl −0.2406883 against −0.2406855). A CPU kind (``torch.backends.cpu.get_cpu_capability()``)
may therefore have its own file, ``dpo_tiny_metrics.<capability>.json``, written with ``--this-cpu`` from the same
code; the test compares with it at the same 1e-6, and with dpo_tiny_metrics.json where there is none.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from dpolab.train.metrics import read_metrics
from dpolab.trainer import train

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "dpo_tiny_metrics.json"


def golden_file(capability: str | None = None) -> Path:
    """The golden file of this CPU kind when it has one (see the module docstring), else :data:`GOLDEN`."""
    own = HERE / f"dpo_tiny_metrics.{capability or torch.backends.cpu.get_cpu_capability()}.json"
    return own if own.is_file() else GOLDEN
RUN = {
    "model": "tiny-gpt2", "stage": "dpo", "loss": "sigmoid", "beta": 0.5, "seed": 0,
    "lr": 1e-3, "warmup_steps": 2, "lr_scheduler_type": "cosine",
    "max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2,
    "eval_every": 0, "eval_batch_size": 4, "kl_samples": 2, "kl_max_new_tokens": 4,
    "train_data": str(HERE / "dpo_tiny_train.jsonl"), "eval_data": str(HERE / "dpo_tiny_eval.jsonl"),
    "progress": False, "report_to": ["jsonl"],
}
# wall-clock fields differ from run to run; every other number of metrics.jsonl is recorded
TIMING = {"tokens_per_s"}


def numbers(record: dict) -> dict[str, float]:
    """The numeric fields of one metrics line, without the timing ones (NaN/inf stay as JSON null)."""
    return {k: v for k, v in sorted(record.items())
            if k not in TIMING and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))}


def golden_run(output_dir: str | Path) -> list[dict[str, float]]:
    """Run :data:`RUN` on one thread into ``output_dir``; the numeric fields of every line of metrics.jsonl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # another thread count may sum in another order
    try:
        train({**RUN, "output_dir": str(output_dir)})
    finally:
        torch.set_num_threads(before)
    return [numbers(r) for r in read_metrics(Path(output_dir) / "metrics.jsonl")]


def main() -> None:
    target = GOLDEN
    if "--this-cpu" in sys.argv[1:]:
        target = HERE / f"dpo_tiny_metrics.{torch.backends.cpu.get_cpu_capability()}.json"
    with tempfile.TemporaryDirectory() as tmp:
        records = golden_run(tmp)
    assert all(v is None or math.isfinite(v) for r in records for v in r.values()), "non-finite metric in the golden run"
    target.write_text(json.dumps({"run": RUN | {"train_data": "dpo_tiny_train.jsonl",
                                                "eval_data": "dpo_tiny_eval.jsonl"},
                                  "records": records}, indent=1) + "\n")
    print(f"wrote {len(records)} records to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
