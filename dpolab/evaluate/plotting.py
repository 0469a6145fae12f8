"""Figures as ``matplotlib`` Figure objects; saving is the caller's choice (``save_figure``).

The library never selects a matplotlib backend: a Jupyter kernel keeps its inline backend, so a figure made
here shows in the notebook; headless scripts choose Agg for themselves (the ``dpolab`` command does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

# one style per method, as in the paper's Fig. 2 (left)
METHOD_STYLE = {
    "DPO": {"color": "tab:blue", "marker": "o"},
    "Preferred-FT": {"color": "tab:green", "marker": "s"},
    "Best of N": {"color": "tab:purple", "marker": "^"},
    "RLOO": {"color": "tab:orange", "marker": "D"},
    "PPO": {"color": "tab:brown", "marker": "P"},
    "RLOO-GT": {"color": "tab:olive", "marker": "d"},
    "Online DPO": {"color": "tab:cyan", "marker": "h"},
    "Online DPO-GT": {"color": "tab:pink", "marker": "H"},
    "PPO-GT": {"color": "tab:gray", "marker": "X"},
    "Unlikelihood": {"color": "tab:red", "marker": "v"},
    "Reference": {"color": "black", "marker": "*"},
}

METHOD_LABEL = {"RLOO": "RLOO (learned reward model)", "PPO": "PPO (learned reward model)",
                "Online DPO": "Online DPO (learned reward model)"}
"""Legend labels that say what an arm reads where its name alone does not (the -GT arms read the ground truth)."""


def frontier_figure(rows: Sequence[dict], title: str = "Reward vs KL(π‖π_ref), held-out prompts"):
    """The reward–KL frontier: one point per policy with ±1 s.e. bars, methods distinguished by colour/marker.

    Args:
        rows: dicts with ``policy``, ``method``, ``reward``, ``reward_se``, ``kl``, ``kl_se`` (and for DPO,
            ``beta`` to label the point).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    seen = set()
    for row in rows:
        style = METHOD_STYLE.get(row["method"], {"color": "gray", "marker": "x"})
        label = None if row["method"] in seen else row["method"]
        seen.add(row["method"])
        ax.errorbar(row["kl"], row["reward"], xerr=row.get("kl_se") or 0.0, yerr=row.get("reward_se") or 0.0,
                    fmt=style["marker"], color=style["color"], label=label, capsize=2, markersize=7)
        tag = f"β={row['beta']:g}" if row.get("beta") is not None and row["method"] == "DPO" else None
        if row["method"] == "Best of N":
            tag = f"N={row['n']}"
        if tag:
            ax.annotate(tag, (row["kl"], row["reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    return _reward_kl_axes(fig, ax, title)


def _reward_kl_axes(fig, ax, title: str):
    """Label the reward–KL axes of ``ax`` and lay out ``fig`` (shared by both frontier figures)."""
    ax.set_xlabel("KL(π‖π_ref) per continuation (nats)")
    ax.set_ylabel("mean ground-truth reward (VADER compound)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def frontier_curves_figure(rows: Sequence[dict], title: str = "Reward vs KL(π‖π_ref), held-out prefixes"):
    """Reward–KL curves: one line per (method, knob, training seed) through its checkpoints in step order, ±1 s.e.
    bars (the seeds of one setting share its colour and label).

    Args:
        rows: checkpoint rows (:mod:`dpolab.experiments.sentiment.curves`) with ``method``, ``knob``, ``step``,
            ``reward``, ``reward_se``, ``kl``, ``kl_se``; Best-of-N rows form one line over N.
    """
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    curves: dict = {}
    for row in rows:
        key = (row["method"], 0.0 if row["method"] == "Best of N" else row["knob"], row.get("train_seed"))
        curves.setdefault(key, []).append(row)
    seen = set()
    for (method, knob, _), points in curves.items():
        points = sorted(points, key=lambda r: (r["knob"], r["step"]) if method == "Best of N" else r["step"])
        style = METHOD_STYLE.get(method, {"color": "gray", "marker": "x"})
        label = None if method in seen else METHOD_LABEL.get(method, method)
        seen.add(method)
        ax.errorbar([r["kl"] for r in points], [r["reward"] for r in points],
                    xerr=[r.get("kl_se") or 0.0 for r in points], yerr=[r.get("reward_se") or 0.0 for r in points],
                    fmt="-" + style["marker"], color=style["color"], label=label, capsize=2, markersize=5,
                    linewidth=1.2, alpha=0.85)
        tag = f"β={knob:g}" if method.startswith(("DPO", "Online DPO")) else f"coef={knob:g}" if method in ("RLOO", "PPO", "RLOO-GT",
                                                                                   "PPO-GT") else None
        if tag and len(points) > 1:
            ax.annotate(tag, (points[-1]["kl"], points[-1]["reward"]), textcoords="offset points", xytext=(5, 3),
                        fontsize=7, color=style["color"])
    return _reward_kl_axes(fig, ax, title)


def rl_learning_curves_figure(learning_curves: dict, window: int = 8):
    """The RL baseline's training curves: reward and KL of each step's own samples, moving mean over ``window``.

    Args:
        learning_curves: curve name -> per-step records with ``step``, ``reward``, ``kl`` (names starting "rloo_" or
            "ppo_"; "rloo_gt_" and "ppo_gt_" read the ground truth); RLOO's curves are solid, PPO's dashed. The
            training reward is what the arm reads: VADER for the -GT arms, the learned reward model otherwise.
    """
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120)
    for name, records in learning_curves.items():
        if not name.startswith(("rloo_", "ppo_")) or not records:
            continue
        method, coef = name.split("_", 1)
        if coef.startswith("gt_"):
            method, coef = method + "-GT", coef[3:]
        coef = coef.replace("_seed", " seed ")
        style = "-" if method.startswith("rloo") else "--"
        steps = np.array([r["step"] for r in records])
        for ax, key in ((left, "reward"), (right, "kl")):
            values = np.array([r[key] for r in records], dtype=float)
            k = min(window, len(values))
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps, values, alpha=0.25, linewidth=0.8, linestyle=style)
            ax.plot(steps[k - 1:], smooth, label=f"{method.upper()} KL coef {coef}", linestyle=style,
                    color=ax.lines[-1].get_color())
    left.set_ylabel("training reward read by the arm, per step")
    right.set_ylabel("KL(π‖π_ref) of the step's samples (nats)")
    for ax in (left, right):
        ax.set_xlabel("RL step (rollout)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"RL baselines' learning curves; thick: moving mean over {window} steps", fontsize=9)
    fig.tight_layout()
    return fig


def temperature_win_rate_figure(sweeps: dict):
    """The paper's Fig. 3 (left) on this task: win rate against π_ref's samples (temperature 1) by the policy's
    sampling temperature, one line per final policy, ±1 s.e. bars.

    Args:
        sweeps: policy name -> rows with ``temperature``, ``win_rate``, ``win_rate_se``.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for name, rows in sweeps.items():
        rows = sorted(rows, key=lambda r: r["temperature"])
        method = name.split(" ")[0]
        style = METHOD_STYLE.get("Reference" if name == "π_ref" else method, {"color": None, "marker": "x"})
        ax.errorbar([r["temperature"] for r in rows], [r["win_rate"] for r in rows],
                    yerr=[r["win_rate_se"] for r in rows], fmt="-" + style["marker"], color=style["color"],
                    label=name, capsize=2, markersize=5, linewidth=1.2, alpha=0.85)
    return _finished(fig, ax, 0.5, "sampling temperature", "win rate vs π_ref samples (T = 1), VADER",
                     "Win rate by sampling temperature, held-out prefixes")


def data_axis_figure(rows: Sequence[dict]):
    """Offline DPO by amount of preference data: its reward difference at matched KL against each comparator
    (rows of :func:`dpolab.experiments.sentiment.data_axis.data_axis`) by the number of pairs, log scale, 95% CI
    bars; comparisons without a common KL range are left out."""
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    by_b: dict = {}
    for r in rows:
        if not r.get("note"):
            by_b.setdefault(r["method_b"], []).append(r)
    for b, points in by_b.items():
        points = sorted(points, key=lambda r: r["pairs"])
        style = METHOD_STYLE.get(b, {"color": None, "marker": "x"})
        ax.errorbar([r["pairs"] for r in points], [r["reward_diff"] for r in points],
                    yerr=[[r["reward_diff"] - r["ci_low"] for r in points],
                          [r["ci_high"] - r["reward_diff"] for r in points]],
                    fmt="-" + style["marker"], color=style["color"], capsize=3,
                    label=f"{points[0]['method_a']} − {METHOD_LABEL.get(b, b)}")
    ax.set_xscale("log")
    sizes = sorted({r["pairs"] for r in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])  # the data sizes themselves, not powers of ten
    ax.xaxis.set_minor_formatter(NullFormatter())
    return _finished(fig, ax, 0.0, "preference pairs DPO trains on (log scale)",
                     "reward difference at matched KL (VADER)", "Offline DPO by amount of preference data, 95% CI")


def _finished(fig, ax, reference: float, xlabel: str, ylabel: str, title: str):
    """The common dress of the small comparison figures: a dotted line at ``reference``, labels, title, grid,
    legend."""
    ax.axhline(reference, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
