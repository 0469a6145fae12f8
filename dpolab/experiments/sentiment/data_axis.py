"""The data axis of the controlled-sentiment experiment: offline DPO at several amounts of preference data, each
compared at matched KL with the same on-policy arms (issue "On-policy or more data?").

Each DPO results file is one run at one ``n_train_prompts`` (``configs/sentiment_data_*.yaml``); its held-out
prefixes are drawn before the training prefixes, so every size shares π_ref's rows with the comparison files and
:func:`dpolab.experiments.sentiment.report.merge_results` checks that they do. For every size, DPO's curve is set
against every other method of the comparison files (RLOO-GT, Online DPO-GT, the RLHF arm, ...), and each row says
what each side spent: ground-truth reward queries and optimizer steps.

    dpolab data-axis results/sentiment_data_32.json results/sentiment_rlhf.json results/sentiment_data_512.json \\
        --against results/sentiment_baselines.json results/sentiment_online.json results/sentiment_rlhf.json \\
        --figure figures/sentiment_data_axis.png --save results/sentiment_data_axis.json

The figure is :func:`dpolab.evaluate.plotting.data_axis_figure`; ``--save`` writes the rows with
:func:`dpolab.experiments.sentiment.report.save_results`.
"""

from __future__ import annotations

from dpolab.experiments.sentiment.report import load_results, merge_results

DATA_AXIS_FORMAT = "dpolab.sentiment_data_axis/1"


def _only(results: dict, keep) -> dict:
    """``results`` with the policies ``keep(row)`` accepts (and π_ref's row, which the merge checks)."""
    rows = [r for r in results["policies"] if r["method"] == "Reference" or keep(r)]
    return {**results, "policies": rows}


def _pairs(results: dict, name: str) -> int:
    stats = results.get("pair_stats") or {}
    if "num_pairs" not in stats:
        raise ValueError(f"{name}: field 'pair_stats.num_pairs' is missing (reassemble a stopped run's file with "
                         f"dpolab reproduce --from-results PARTIAL --save, which reads the run's pairs metadata)")
    return int(stats["num_pairs"])


def data_axis(dpo_paths, against_paths, method: str = "DPO") -> dict:
    """DPO at each data size against every method of the comparison files, at matched KL.

    Args:
        dpo_paths: results files, one DPO run (one ``n_train_prompts``) each; other methods in them are ignored.
        against_paths: results files of the same setup whose other methods are the comparators (their ``method``
            rows are ignored, so a file that also holds a DPO run at one size can serve both roles).
        method: the offline method put on the data axis.

    Returns:
        ``{"format", "rows", "sources"}``; ``rows`` (ordered by pairs, then comparator): ``n_train_prompts``,
        ``pairs``, ``method_a`` (= ``method``), ``method_b``, the matched-KL fields of
        :func:`dpolab.evaluate.frontier.matched_kl_comparison` (``reward_diff``, ``ci_low``, ``ci_high``, ``kl_low``,
        ``kl_high``, ``note``, ...), ``reward_queries_a/b`` and ``steps_a/b`` (what each side used), and DPO's final
        checkpoint (``final_reward``, ``final_kl``, ``final_epoch``).
    """
    against = [(str(p), load_results(p)) for p in against_paths]
    if not against:
        raise ValueError("data_axis: no comparison file (--against)")
    rows = []
    for path in dpo_paths:
        name = str(path)
        results = load_results(path)
        mine = _only(results, lambda r: r["method"] == method)
        if len(mine["policies"]) < 2:
            raise ValueError(f"{name}: no {method} rows")
        # the comparators first: π_ref and Best-of-N come from the first file of a merge
        parts = [_only(r, lambda row: row["method"] != method) for _, r in against] + [mine]
        merged = merge_results(parts, [n for n, _ in against] + [name])
        config = results["config"] if isinstance(results["config"], dict) else results["config"][0]
        final = next(r for r in mine["policies"] if r.get("final") and r["method"] == method)
        for c in merged["comparisons"]:
            if method not in (c["method_a"], c["method_b"]):
                continue
            if c["method_a"] != method:
                raise ValueError(f"data_axis: {method} is expected first in the comparisons, got {c['method_a']}")
            # c carries what each side spent (reward_queries_a/b, steps_a/b): merge_results annotates it
            rows.append({"n_train_prompts": config["n_train_prompts"], "pairs": _pairs(results, name),
                         "source": name, **c, "final_reward": final["reward"], "final_kl": final["kl"],
                         "final_epoch": final.get("epoch")})
    rows.sort(key=lambda r: (r["pairs"], r["method_b"]))
    return {"format": DATA_AXIS_FORMAT, "rows": rows, "sources": {"dpo": [str(p) for p in dpo_paths],
                                                                   "against": [n for n, _ in against]}}


def data_axis_markdown(axis: dict) -> str:
    """One line per (data size, comparator): the matched-KL difference with its 95% CI and what each side used."""
    lines = ["| prompts | pairs | A | B | GT reward queries (A, B) | optimizer steps (A, B) | common KL range (nats) | "
             "reward A − B at matched KL | 95% CI | A's last checkpoint: reward, KL, epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in axis["rows"]:
        queries = f"{r['reward_queries_a']}, {r['reward_queries_b'] if r['reward_queries_b'] is not None else '—'}"
        last = f"{r['final_reward']:.3f}, {r['final_kl']:.2f}, " + (f"{r['final_epoch']:.2f}"
                                                                    if r["final_epoch"] is not None else "—")
        if r.get("note"):
            gap = f"{r['note']} | — | — "
        else:
            gap = (f"{r['kl_low']:.2f}–{r['kl_high']:.2f} | {r['reward_diff']:+.3f} | "
                   f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] ")
        lines.append(f"| {r['n_train_prompts']} | {r['pairs']} | {r['method_a']} | {r['method_b']} | {queries} | "
                     f"{r['steps_a']}, {r['steps_b']} | {gap}| {last} |")
    return "\n".join(lines)
