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
    "Reference": {"color": "black", "marker": "*"},
}


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
    ax.set_xlabel("KL(π‖π_ref) per completion (nats)")
    ax.set_ylabel("mean ground-truth reward (VADER compound)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
