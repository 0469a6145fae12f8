"""How many positions the network runs per epoch under each batch layout and bucketing key (no model, no timing).

For every micro-batch of dpolab's seeded batch plan over one epoch it counts the real tokens and the padded
positions of (a) the two-row layout (prompt + chosen, prompt + rejected, padded to the longest row) and (b) the
pair-tree layout (one row per pair: prompt once, both responses, padded to the longest tree), with batches
bucketed by either width. Run from the repository root on a prepared workload::

    .venv/bin/python benchmarks/padding.py --workload-dir DIR/smollm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import load_workload  # noqa: E402


def count(records: list[dict], bucket_by: str, micro: int | None = None, accum: int | None = None) -> dict[str, int]:
    """Real tokens and padded positions of one epoch, for both layouts, with batches bucketed by ``bucket_by``
    (micro-batch size and accumulation: the trainer's defaults unless given)."""
    from dpolab.data.batch import pair_length
    from dpolab.data.tokenize import TokenizedPair
    from dpolab.train.config import TrainConfig
    from dpolab.train.step import BatchPlan

    pairs = [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [], []) for r in records]
    default = TrainConfig()
    config = TrainConfig.load(None, {"micro_batch_size": micro or default.micro_batch_size,
                                     "grad_accum_steps": accum or default.grad_accum_steps})
    plan = BatchPlan([pair_length(p, bucket_by) for p in pairs], config, world_size=1)
    out = dict.fromkeys(("tokens", "rows_positions", "tree_tokens", "tree_positions"), 0)
    for step in range(len(plan.epoch_batches(0))):
        for rows in plan.micro_batches(step, 0)[1]:
            p = [pairs[i] for i in rows]
            two = [len(x.prompt_ids) + len(x.chosen_ids) for x in p] + [len(x.prompt_ids) + len(x.rejected_ids) for x in p]
            tree = [len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in p]
            out["tokens"] += sum(two)
            out["rows_positions"] += len(two) * max(two)
            out["tree_tokens"] += sum(tree)
            out["tree_positions"] += len(tree) * max(tree)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from dpolab.train.config import TrainConfig

    default = TrainConfig()
    parser.add_argument("--workload-dir", required=True)
    parser.add_argument("--micro", type=int, default=default.micro_batch_size, help="pairs per micro-batch")
    parser.add_argument("--accum", type=int, default=default.grad_accum_steps, help="micro-batches per step")
    args = parser.parse_args(argv)
    records = load_workload(Path(args.workload_dir)).pairs()
    print(f"one epoch of {len(records)} pairs, micro-batches of {args.micro} pairs, {args.accum} per optimizer step; "
          "positions = what the linear layers run on\n")
    print("| layout | batches bucketed by | real tokens | positions run | padding | positions ÷ two-row baseline |")
    print("|---|---|---|---|---|---|")
    base = None
    for bucket_by in ("rows", "tree"):
        c = count(records, bucket_by, args.micro, args.accum)
        base = base or c["rows_positions"]
        for layout, real, positions in (("two rows", c["tokens"], c["rows_positions"]),
                                        ("pair tree", c["tree_tokens"], c["tree_positions"])):
            print(f"| {layout} | {bucket_by} width | {real} | {positions} | {1 - real / positions:.1%} | "
                  f"{positions / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
