"""The results file of the controlled-sentiment experiment: assembled, validated, written, re-rendered.

Format ``dpolab.sentiment/2`` (a JSON object):

- ``policies``: one row per evaluated checkpoint (:mod:`dpolab.experiments.sentiment.curves`) with at least
  :data:`POLICY_FIELDS` and the per-prefix means ``prompt_rewards`` and ``prompt_kls``;
- ``comparisons``: one row per pair of methods (:func:`dpolab.evaluate.frontier.compare_all`) with at least
  :data:`COMPARISON_FIELDS`: the reward difference at matched KL over the common KL range with its bootstrap CI;
- ``learning_curves``: per trained curve, the per-step training records (RLOO's ``reward`` and ``kl`` are the
  reward and KL of its own training samples, so a reader sees whether it plateaued);
- ``timings``: seconds per stage; ``config``, ``pair_stats``, ``format``, ``versions``.

The README's tables and figure are regenerated from such a file with ``dpolab reproduce --from-results``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dpolab.experiments.sentiment.curves import COMPARISON_FIELDS, OLD_FORMATS, POLICY_FIELDS, RESULTS_FORMAT

METHOD_ORDER = ("DPO", "PPO", "RLOO", "Online DPO", "Online DPO-GT", "PPO-GT", "RLOO-GT", "Preferred-FT",
                "Unlikelihood", "Best of N")
"""Methods in the order of the comparisons: DPO first, then the RLHF arms (a learned reward model), then the
ground-truth oracles and the other baselines."""

GROUND_TRUTH_NAMES = {"RLOO": "RLOO-GT", "PPO": "PPO-GT"}
"""Format 2's RL arms, which read the ground truth, and their names in format 3."""


def upgrade(results: dict) -> dict:
    """A format-2 file in format 3: its RL arms read the ground truth, so RLOO → RLOO-GT and PPO → PPO-GT (rows,
    policy slugs, learning-curve keys and comparisons), and every trained row gets its ``reward_source``."""
    if results.get("format") not in OLD_FORMATS:
        return results
    rows = []
    for row in results.get("policies", []):
        row = dict(row)
        new = GROUND_TRUTH_NAMES.get(row.get("method"))
        if new is not None:
            row["method"], row["reward_source"] = new, "ground truth"
            row["policy"] = row.get("policy", "").replace(f"{new.split('-')[0].lower()}_", _slug(new) + "_", 1)
        elif row.get("method") in ("DPO", "Preferred-FT", "Unlikelihood"):
            row.setdefault("reward_source", "pairs (ground truth)")
        rows.append(row)
    curves = {(_slug(GROUND_TRUTH_NAMES[k.split("_")[0].upper()]) + k[len(k.split("_")[0]):]
               if k.split("_")[0].upper() in GROUND_TRUTH_NAMES else k): v
              for k, v in results.get("learning_curves", {}).items()}
    comparisons = [{**c, "method_a": GROUND_TRUTH_NAMES.get(c["method_a"], c["method_a"]),
                    "method_b": GROUND_TRUTH_NAMES.get(c["method_b"], c["method_b"])}
                   for c in results.get("comparisons", [])]
    return {**results, "format": RESULTS_FORMAT, "upgraded_from": results["format"], "policies": rows,
            "learning_curves": curves, "comparisons": comparisons}


def curve_key(row: dict) -> tuple:
    """The curve a checkpoint row belongs to: its method, knob and training seed (None for π_ref and Best-of-N)."""
    return row["method"], row["knob"], row.get("train_seed")


def fill_train_seeds(results: dict) -> dict:
    """Rows written before training seeds were recorded were trained with the run's ``seed``: say so in each
    trained row (``train_seed``), so a file from then merges with runs of other training seeds."""
    config = results.get("config")
    seed = config.get("seed", 0) if isinstance(config, dict) else 0
    for row in results.get("policies", []):
        if row.get("method") not in ("Reference", "Best of N"):
            row.setdefault("train_seed", seed)
    return results


def _slug(method: str) -> str:
    return method.lower().replace(" ", "_").replace("-", "_")


def check_reward_sources(rows: list[dict], source: str) -> None:
    """Every curve of one method name must read the same reward (a learned model vs the ground truth)."""
    seen = {}
    for row in rows:
        if "reward_source" not in row or row["method"] in ("Reference", "Best of N"):
            continue
        first = seen.setdefault(row["method"], row["reward_source"])
        if first != row["reward_source"]:
            raise ValueError(f"{source}: method {row['method']!r} has rows that read {first!r} and rows that read "
                             f"{row['reward_source']!r}; one name must mean one reward source")


def annotate_checkpoints(comparisons: list[dict], rows: list[dict]) -> list[dict]:
    """Add to each matched-KL comparison what each side spent (the most ground-truth reward queries and optimizer
    steps among its curves: ``reward_queries_a/b``, ``steps_a/b``) and how many checkpoints of each method lie inside
    its common KL range (``checkpoints_a/b``)."""
    for c in comparisons:
        for side in ("a", "b"):
            mine = [r for r in rows if r["method"] == c[f"method_{side}"]]
            queries = [r["reward_queries"] for r in mine if isinstance(r.get("reward_queries"), int | float)]
            c[f"reward_queries_{side}"] = max(queries) if queries else None
            c[f"steps_{side}"] = max((r["step"] for r in mine), default=0)
            if not c.get("note"):
                c[f"checkpoints_{side}"] = sum(1 for r in mine if c["kl_low"] <= r["kl"] <= c["kl_high"])
    return comparisons


def assemble(config, rows: list[dict], learning_curves: dict, timings: dict, pair_stats) -> dict:
    """The results dict: rows with the last checkpoint of each curve marked ``final``, and the comparisons."""
    import platform

    import torch
    import transformers

    from dpolab.evaluate.frontier import compare_all

    last = {}
    for row in rows:
        key = curve_key(row)
        if key not in last or row["step"] > last[key]["step"]:
            last[key] = row
    for row in rows:
        row["final"] = row is last[curve_key(row)] and row["method"] not in ("Reference", "Best of N")
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    curve_rows = [r for r in rows if r["method"] != "Reference"]
    comparisons = compare_all(curve_rows, methods, seed=config.seed) if len(methods) > 1 else []
    annotate_checkpoints(comparisons, curve_rows)
    return {"format": RESULTS_FORMAT, "config": dataclasses.asdict(config), "pair_stats": pair_stats,
            "policies": rows, "comparisons": comparisons, "learning_curves": learning_curves, "timings": timings,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def write_results(results: dict, path: Path, copy_to: Path | None, figure: Path | None) -> dict:
    """Write the results JSON (atomically, to ``path`` and ``copy_to``), the Markdown tables and the figure."""
    from dpolab.data.cache import atomic_write_text

    text = json.dumps(results, indent=1, default=float)
    for target in (path, copy_to):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text + "\n")
    atomic_write_text(path.with_suffix(".md"), report_markdown(results) + "\n")
    written = draw_figures(results, figure) if figure else None
    return {"table": path, "figure": written}


def draw_figures(results: dict, figure: Path) -> Path:
    """The frontier figure at ``figure``, and beside it (``*_rl_training.png``) the RL baseline's learning curves
    when the results hold any. Returns the frontier figure's path."""
    import matplotlib.pyplot as plt

    from dpolab.evaluate.plotting import frontier_curves_figure, rl_learning_curves_figure, save_figure

    fig = frontier_curves_figure(results["policies"])
    written = save_figure(fig, figure)
    plt.close(fig)
    if results.get("temperature_win_rates"):
        from dpolab.evaluate.plotting import temperature_win_rate_figure

        fig = temperature_win_rate_figure(results["temperature_win_rates"])
        save_figure(fig, figure.with_name(figure.stem + "_temperature.png"))
        plt.close(fig)
    if any(name.startswith(("rloo_", "ppo_")) for name in results.get("learning_curves", {})):
        fig = rl_learning_curves_figure(results["learning_curves"])
        save_figure(fig, figure.with_name(figure.stem + "_rl_training.png"))
        plt.close(fig)
    return written


def validate(results, source: str) -> dict:
    """Check a loaded results file; a file of another format names what is missing."""
    if not isinstance(results, dict):
        raise ValueError(f"{source}: not a results file of dpolab reproduce (a JSON object expected)")
    if results.get("format") in OLD_FORMATS:
        results = upgrade(results)
    if results.get("format") != RESULTS_FORMAT:
        found = "rows" if "rows" in results else "format"
        raise ValueError(f"{source}: results format {results.get('format')!r} is not {RESULTS_FORMAT!r} (an older "
                         f"file: field 'policies' is missing, it has {found!r}); rerun dpolab reproduce")
    for field in ("policies", "comparisons", "timings"):
        if field not in results:
            raise ValueError(f"{source}: field {field!r} is missing")
    for i, row in enumerate(results["policies"]):
        for field in (*POLICY_FIELDS, "prompt_rewards", "prompt_kls"):
            if field not in row:
                raise ValueError(f"{source}: policies[{i}] has no field {field!r}")
    for i, row in enumerate(results["comparisons"]):
        for field in COMPARISON_FIELDS:
            if field not in row:
                raise ValueError(f"{source}: comparisons[{i}] has no field {field!r}")
    check_reward_sources(results["policies"], source)
    return fill_train_seeds(results)


def results_from_partial(partial: dict, source: str) -> dict:
    """A results dict from the ``results.partial.json`` of a run that was stopped: its finished curves (each with its
    step-0 row, π_ref's own), their learning curves, training seconds and temperature sweeps, and the reward model's
    summary when the run saved one (``output_dir/reward_model/dpolab_reward_model.json``). What the run computes
    only at its end is absent and said so in ``stopped_early``: the Best-of-N rows and π_ref's temperature sweep."""
    import dataclasses

    from dpolab.data.cache import from_repo_root
    from dpolab.experiments.sentiment.config import SentimentConfig

    curves = partial.get("curves") or {}
    if not curves:
        raise ValueError(f"{source}: a partial results file with no finished curve")
    fields = {f.name for f in dataclasses.fields(SentimentConfig)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in partial["config"].items() if k in fields}
    config = SentimentConfig(**settings)
    start = next(iter(curves.values()))["rows"][0]
    reference = {k: v for k, v in start.items() if k not in ("reward_source", "reward_queries", "epoch", "train_seed")}
    reference.update(method="Reference", knob=0.0, policy="reference")
    rows = [reference] + [row for curve in curves.values() for row in curve["rows"]]
    timings = {f"{name} (train)": curve["train_seconds"] for name, curve in curves.items()}
    timings["total"] = sum(timings.values())
    results = assemble(config, rows, {c["key"]: c["learning_curve"] for c in curves.values()}, timings, None)
    sweeps = {name: c["temperature_win_rates"] for name, c in curves.items() if c.get("temperature_win_rates")}
    if sweeps:
        results["temperature_win_rates"] = sweeps
    summary = from_repo_root(config.output_dir) / "reward_model" / "dpolab_reward_model.json"
    if summary.is_file():
        results["reward_model"] = json.loads(summary.read_text())
    pairs = from_repo_root(config.output_dir) / "pairs" / "metadata.json"
    if pairs.is_file():  # the pairs the curves were trained on, as the run saved them
        results["pair_stats"] = json.loads(pairs.read_text()).get("stats")
    results["stopped_early"] = {"source": source, "curves": list(curves), "missing": [
        "Best-of-N rows", "π_ref's temperature sweep", "the unfinished curves", "timings other than training"]}
    return results


def load_results(path: str | Path) -> dict:
    """Read and validate one results file."""
    from dpolab.data.cache import from_repo_root

    path = from_repo_root(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a results.json written by dpolab reproduce ({err!r})") from err
    if isinstance(results, dict) and "curves" in results and "config" in results and "format" not in results:
        results = results_from_partial(results, str(path))  # a stopped run's results.partial.json
    return validate(results, str(path))


def merge_results(parts: list[dict], names: list[str]) -> dict:
    """One results dict from runs of the same setup that trained different methods (e.g. the full run and a PPO
    run added later): their π_ref rows must agree exactly (same held-out prefixes, same per-prefix rewards), so
    the curves are comparable; π_ref comes from the first file, Best-of-N (computed from π_ref's samples, so the
    same in every file that has it) from the first file that has it (a stopped run's file has none), every trained
    curve from the file that has it, and the matched-KL comparisons are recomputed over all methods. Timings keep each run's own
    stages, prefixed by its file name.
    """
    from dpolab.evaluate.frontier import compare_all

    def reference(results, name):
        rows = [r for r in results["policies"] if r["method"] == "Reference"]
        if len(rows) != 1:
            raise ValueError(f"{name}: policies has {len(rows)} Reference rows, 1 expected")
        return rows[0]

    first = reference(parts[0], names[0])
    best_of_n = next(([r for r in p["policies"] if r["method"] == "Best of N"] for p in parts
                      if any(r["method"] == "Best of N" for r in p["policies"])), [])
    rows = [first, *best_of_n]
    seen, curves, timings = {}, {}, {}
    for results, name in zip(parts, names):
        ref = reference(results, name)
        if ref.get("prompts") != first.get("prompts") or ref["prompt_rewards"] != first["prompt_rewards"]:
            raise ValueError(f"{name}: its π_ref row (held-out prefixes and per-prefix rewards) differs from "
                             f"{names[0]}'s, so the runs do not share a setup and their curves cannot be compared")
        for row in results["policies"]:
            if row["method"] in ("Reference", "Best of N"):
                continue
            key = (*curve_key(row), row["step"])
            if key in seen:
                raise ValueError(f"{name}: the {row['method']} row (knob {row['knob']:g}, training seed "
                                 f"{row.get('train_seed')}, step {row['step']}) is also in {seen[key]}; merge runs that "
                                 f"trained different curves")
            seen[key] = name
            rows.append(row)
        curves.update(results.get("learning_curves", {}))
        timings.update({f"{Path(name).stem}: {stage}": s for stage, s in results["timings"].items()
                        if stage != "total"})
        timings["total"] = timings.get("total", 0.0) + results["timings"].get("total", 0.0)
    timings["total"] = timings.pop("total")  # the last row
    check_reward_sources(rows, " + ".join(names))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    curve_rows = [r for r in rows if r["method"] != "Reference"]
    config = parts[0]["config"]
    seed = (config if isinstance(config, dict) else config[0]).get("seed", 0)  # a merged file's config is a list
    comparisons = annotate_checkpoints(compare_all(curve_rows, methods, seed=seed), curve_rows)
    merged = {**parts[0], "config": [p["config"] for p in parts], "policies": rows, "comparisons": comparisons,
              "learning_curves": curves, "timings": timings, "merged_from": list(names)}
    sweeps = {name: rows for p in parts for name, rows in p.get("temperature_win_rates", {}).items()}
    if sweeps:
        merged["temperature_win_rates"] = sweeps
    models = [p["reward_model"] for p in parts if "reward_model" in p]
    if models:
        merged["reward_model"] = models[0]
    return merged


def from_results(paths, figure: str | Path | None = None) -> dict:
    """Re-render the tables (and the figure, when ``figure`` is a path) from one results file, no recompute; or
    from several runs of one setup, merged by :func:`merge_results`.

    Returns ``{"results", "table_md", "figure"}``.
    """
    from dpolab.data.cache import from_repo_root

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    parts = [load_results(p) for p in paths]
    results = parts[0] if len(parts) == 1 else merge_results(parts, [str(p) for p in paths])
    written = draw_figures(results, from_repo_root(figure)) if figure else None
    return {"results": results, "table_md": report_markdown(results), "figure": written}


def save_results(results: dict, path: str | Path) -> Path:
    """Write a (merged or assembled) results dict as JSON, atomically (``dpolab reproduce --from-results ... --save``)."""
    from dpolab.data.cache import atomic_write_text, from_repo_root

    path = from_repo_root(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1, default=float) + "\n")
    return path


def _fmt(value: float, se: float, digits: int = 3, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{digits}f} ± {se:.{digits}f}"


def table_markdown(rows: list[dict]) -> str:
    """π_ref, the last checkpoint of every trained curve and the Best-of-N points (± one s.e. over prefixes)."""
    lines = ["| method | reads | knob | step | epoch | GT reward queries | reward (VADER) | paired gain vs π_ref | "
             "gain / s.e. | KL(π‖π_ref) (nats) | TextBlob | held-out pair acc. (pairs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not (r["method"] in ("Reference", "Best of N") or r.get("final")):
            continue
        # π_ref and Best-of-1 have a gain of 0 up to rounding: no ratio for them
        ratio = f"{r['gain'] / r['gain_se']:.1f}" if (r.get("gain_se") or 0.0) > 1e-9 else "—"
        acc = (f"{r['heldout_acc']:.3f} ± {r['heldout_acc_se']:.3f} ({r['heldout_pairs']})" if "heldout_acc" in r
               else "—")
        knob = f"{r['knob']:g}" if r["method"] not in ("Reference", "Preferred-FT", "Unlikelihood") else "—"
        reads = r.get("reward_source", "—")
        epoch = f"{r['epoch']:.2f}" if "epoch" in r else "—"
        queries = r.get("reward_queries", "—")
        lines.append(f"| {r['method']} | {reads} | {knob} | {r['step']} | {epoch} | {queries} | "
                     f"{_fmt(r['reward'], r['reward_se'])} | "
                     f"{_fmt(r['gain'], r['gain_se'], sign=True)} | {ratio} | {_fmt(r['kl'], r['kl_se'], 2)} | "
                     f"{_fmt(r['judge'], r['judge_se'])} | {acc} |")
    return "\n".join(lines)


def comparisons_markdown(comparisons: list[dict]) -> str:
    """Reward difference at matched KL (A − B, mean over the common KL range) with its 95% bootstrap CI. When a method
    was trained with several seeds, the table adds the seeds, each seed's own difference, and the interval over the
    prefixes alone beside the one over prefixes and seeds."""
    seeded = any(max(c.get("n_seeds_a", 1), c.get("n_seeds_b", 1)) > 1 for c in comparisons)
    spent = any("steps_a" in c for c in comparisons)
    head = ["A", "B", "common KL range (nats)", "checkpoints in range (A, B)", "reward A − B at matched KL",
            "95% CI" + (" (prefixes and seeds)" if seeded else ""), "share of range A > B (CI > 0)", "share B > A"]
    if spent:
        head += ["GT reward queries (A, B)", "optimizer steps (A, B)"]
    if seeded:
        head += ["seeds (A, B)", "per seed of A; of B", "95% CI (prefixes only)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        seeds = f"{c.get('n_seeds_a', 1)}, {c.get('n_seeds_b', 1)}"
        used = [", ".join("—" if c.get(f"reward_queries_{s}") is None else str(c[f"reward_queries_{s}"])
                          for s in ("a", "b")), f"{c.get('steps_a', '—')}, {c.get('steps_b', '—')}"] if spent else []
        if c.get("note"):
            cells = [c["method_a"], c["method_b"], c["note"]] + ["—"] * 5 + used
            if seeded:
                cells += [seeds, "—", "—"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        counts = f"{c['checkpoints_a']}, {c['checkpoints_b']}" if "checkpoints_a" in c else "—"
        cells = [c["method_a"], c["method_b"], f"{c['kl_low']:.2f}–{c['kl_high']:.2f}", counts,
                 f"{c['reward_diff']:+.3f}", f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]",
                 f"{c['dominance_share']:.2f}", f"{c.get('dominance_share_b', float('nan')):.2f}", *used]
        if seeded:
            per_seed = "; ".join(" ".join(f"{d:+.3f}" for d in c.get(f"seed_diffs_{side}", [])) or "—"
                                 for side in ("a", "b"))
            prefixes = (f"[{c['ci_low_prefixes']:+.3f}, {c['ci_high_prefixes']:+.3f}]" if "ci_low_prefixes" in c
                        else "—")
            cells += [seeds, per_seed, prefixes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reward_model_markdown(results: dict) -> str:
    """The learned reward model's held-out pair accuracy beside every DPO checkpoint's implicit-reward accuracy
    (paper: "your language model is secretly a reward model"), on the same held-out pairs, ± one s.e."""
    rm = results["reward_model"]
    config = results.get("config")
    default = (config if isinstance(config, dict) else (config or [{}])[0]).get("seed", 0)
    lines = ["| model | step | epoch | held-out pair accuracy | pairs |", "|---|---|---|---|---|"]
    for r in rm["eval_history"]:
        tag = " (kept)" if r["step"] == rm["best_step"] else ""
        lines.append(f"| reward model{tag} | {r['step']} | {r['epoch']:.2f} | "
                     f"{r['eval_accuracy']:.3f} ± {r['eval_accuracy_se']:.3f} | {r['eval_pairs']} |")
    for r in results["policies"]:
        if r["method"] == "DPO" and "heldout_acc" in r and r["step"] > 0:
            epoch = f"{r['epoch']:.2f}" if "epoch" in r else "—"
            seed = f" seed {r['train_seed']}" if r.get("train_seed", default) != default else ""
            lines.append(f"| DPO β={r['knob']:g}{seed} (implicit reward) | {r['step']} | {epoch} | "
                         f"{r['heldout_acc']:.3f} ± {r['heldout_acc_se']:.3f} | {r['heldout_pairs']} |")
    return "\n".join(lines)


def temperature_markdown(sweeps: dict) -> str:
    """Win rate against π_ref's samples (temperature 1) by sampling temperature, per final policy (± one s.e.)."""
    temperatures = sorted({r["temperature"] for rows in sweeps.values() for r in rows})
    lines = ["| policy | " + " | ".join(f"T = {t:g}" for t in temperatures) + " |",
             "|---|" + "---|" * len(temperatures)]
    for name, rows in sweeps.items():
        by_t = {r["temperature"]: r for r in rows}
        cells = [f"{by_t[t]['win_rate']:.3f} ± {by_t[t]['win_rate_se']:.3f}" if t in by_t else "—"
                 for t in temperatures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timings_markdown(timings: dict) -> str:
    """Seconds per stage, with the share of the total."""
    total = timings.get("total") or sum(v for k, v in timings.items() if k != "total")
    lines = ["| stage | seconds | share |", "|---|---|---|"]
    for name, seconds in timings.items():
        if name != "total":
            lines.append(f"| {name} | {seconds:.0f} | {seconds / total:.0%} |")
    lines.append(f"| total | {total:.0f} | 100% |")
    return "\n".join(lines)


def report_markdown(results: dict) -> str:
    """All three tables of a results file."""
    parts = [table_markdown(results["policies"])]
    if results["comparisons"]:
        parts.append(comparisons_markdown(results["comparisons"]))
    if results.get("reward_model"):
        parts.append(reward_model_markdown(results))
    if results.get("temperature_win_rates"):
        parts.append(temperature_markdown(results["temperature_win_rates"]))
    parts.append(timings_markdown(results["timings"]))
    return "\n\n".join(parts)
