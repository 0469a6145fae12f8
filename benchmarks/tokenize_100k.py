"""Tokenizing 100k synthetic preference pairs: seconds and peak memory, before and after the columnar store.

Arms, each in a fresh process (so that one arm's memory never counts in another's peak):

- ``list``: what ``prepare_pairs`` did before ``dataset_num_proc``: every row validated into an example, then
  tokenized into one ``TokenizedPair`` of Python lists per pair (``load_jsonl`` + ``tokenize_examples``).
- ``store``: ``prepare_pairs`` now, rows validated and tokenized a chunk at a time into flat numpy columns
  (``PairStore``), in this process (``num_proc=1``) or in worker processes (``num_proc=2``, …).

Reported per arm: wall seconds, pairs/s, the process's RSS before tokenizing (tokenizer loaded, data file
read), its peak RSS, the RSS still held once the pairs exist (the pairs themselves, plus the prompts and the
report), the largest worker's peak RSS, and the bytes of the columns. Run from the repository root::

    .venv/bin/python benchmarks/tokenize_100k.py                  # 100k pairs, SmolLM2's tokenizer, all arms
    .venv/bin/python benchmarks/tokenize_100k.py --pairs 2000 --tokenizer tiny-gpt2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a movie film story actor scene plot script ending music camera light dark warm cold funny dull "
         "sharp slow quick long short good bad great awful wonderful terrible fine superb mess loud quiet wise "
         "bright heavy simple clever honest strange familiar new old young human real cheap rich kind cruel "
         "and but so yet because while when then never always often rarely almost quite very too rather").split()


def synthetic_rows(n: int, seed: int = 0):
    """``n`` text pairs: prompts of 6–20 words, chosen and rejected responses of 8–40 words (seeded)."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    for i in range(n):
        yield {"prompt": f"Review {i}: " + words(6, 20), "chosen": " " + words(8, 40), "rejected": " " + words(8, 40)}


def rss_kib() -> int:
    """This process's resident set size now, in KiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def load_tokenizer(name: str):
    if name == "smollm2":
        from transformers import AutoTokenizer

        from dpolab.models import default_model_dir

        return AutoTokenizer.from_pretrained(default_model_dir())
    from dpolab.models.tiny import tiny_tokenizer

    return tiny_tokenizer(name.removeprefix("tiny-"))


def worker(arm: str, data: Path, tokenizer_name: str, max_length: int) -> dict:
    """Run one arm in this process and measure it (module docstring)."""
    from dpolab.data.prepare import prepare_pairs
    from dpolab.data.readers import load_jsonl
    from dpolab.data.tokenize import TokenizeConfig, tokenize_examples

    tokenizer = load_tokenizer(tokenizer_name)
    settings = TokenizeConfig(max_length=max_length, max_prompt_length=max_length // 2)
    tokenizer("warm up", add_special_tokens=False)
    before = rss_kib()
    start = time.perf_counter()
    if arm == "list":
        examples = load_jsonl(data)
        pairs, report = tokenize_examples(examples, tokenizer, settings, on_error="drop")
        prompts = [examples[i].prompt for i in report.index]
        del examples
        columns = 0
    else:
        num_proc = int(arm.split("-")[1])
        prepared = prepare_pairs(data, tokenizer, settings, num_proc=num_proc)
        pairs, prompts, columns = prepared.pairs, prepared.prompts, prepared.pairs.nbytes
    seconds = time.perf_counter() - start
    held = rss_kib() - before
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return {"arm": arm, "pairs": len(pairs), "tokens": tokens, "prompts": len(prompts), "seconds": seconds,
            "rss_before_mib": before / 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "held_mib": held / 1024, "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "columns_mib": columns / 2**20}


def table(rows: list[dict]) -> str:
    head = ("| arm | pairs | tokens | seconds | pairs/s | RSS before (MiB) | peak RSS (MiB) | held after (MiB) | "
            "largest worker peak (MiB) | columns (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    def workers(r: dict) -> str:  # only the store-N arms with N > 1 start workers of their own
        return f"{r['worker_peak_mib']:.0f}" if r["arm"].startswith("store-") and r["arm"] != "store-1" else "—"

    lines = [f"| {r['arm']} | {r['pairs']} | {r['tokens']} | {r['seconds']:.1f} | {r['pairs'] / r['seconds']:.0f} | "
             f"{r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | {r['held_mib']:.0f} | {workers(r)} | "
             f"{r['columns_mib']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "tiny-gpt2", "tiny-llama"])
    parser.add_argument("--arms", default="list,store-1,store-2", help="comma-separated: list, store-N")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.tokenizer, args.max_length)))
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dpolab-tokenize-") as folder:
        data = Path(folder) / "pairs.jsonl"
        with data.open("w") as f:
            for row in synthetic_rows(args.pairs):
                f.write(json.dumps(row) + "\n")
        rows = []
        for arm in args.arms.split(","):
            done = subprocess.run([sys.executable, __file__, "--worker", arm, "--data", str(data), "--tokenizer",
                                   args.tokenizer, "--max-length", str(args.max_length)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{arm}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    if len({(r["pairs"], r["tokens"]) for r in rows}) != 1:
        raise SystemExit(f"the arms disagree on the pairs: {[(r['arm'], r['pairs'], r['tokens']) for r in rows]}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"load average (1 min) at the start {load_before:.2f}, at the end {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
