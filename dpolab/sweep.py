"""Batch runs of a notebook over a grid of parameters with papermill, and their collected results.

``dpolab sweep notebooks/03_beta_sweep.ipynb --grid beta=0.05,0.1,0.5`` executes the notebook once per point
of the grid (the Cartesian product of the listed values), writes each executed copy to
``runs/notebooks/<notebook>__<key>=<value>….ipynb`` (never over the source), and prints one table of the
results that the runs saved with :func:`dpolab.results.save_model_row`. Grid values read as override values do
(:func:`dpolab.overrides.parse_value`): ``0.1`` is a number, ``true`` a bool, ``sigmoid`` a string.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from dpolab.cache import from_repo_root
from dpolab.overrides import parse_value, read_yaml
from dpolab.results import load_model_rows


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["beta=0.05,0.1", "seed=0,1"]`` → ``{"beta": [0.05, 0.1], "seed": [0, 1]}`` (each value by
    :func:`dpolab.overrides.parse_value`)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"grid item {item!r}: expected key=value[,value...]")
        grid[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the order the keys and values were given."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(notebook: Path, params: dict) -> str:
    """The executed copy's name: the notebook's stem, then ``key=value`` for each grid parameter."""
    return "__".join([notebook.stem, *(f"{k}={v}" for k, v in params.items())])


def notebook_parameters(notebook: Path) -> set[str]:
    """The names papermill can set in ``notebook`` (those of its ``parameters`` cell)."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def run_sweep(notebook: str | Path, grid: dict[str, list], *, parameters: dict | None = None,
              parameters_file: str | Path | None = None, out_dir: str | Path = "runs/notebooks",
              first_only: dict | None = None, progress: bool = True) -> list[Path]:
    """Execute ``notebook`` once per grid point; return the executed copies' paths.

    Args:
        notebook: the source notebook (paths are taken from the repository root when relative).
        grid: parameter name → list of values.
        parameters: fixed parameters for every run.
        parameters_file: a YAML file of fixed parameters (e.g. ``notebooks/03_beta_sweep.full.yaml``).
        out_dir: where the executed copies go.
        first_only: parameters for the first run only (e.g. ``{"baselines": True}``), the opposite for the rest
            when the value is a bool — baselines need to be computed once per sweep, not once per β.
        progress: show papermill's cell progress bar.
    """
    import papermill

    notebook = from_repo_root(notebook)
    fixed = read_yaml(from_repo_root(parameters_file)) if parameters_file else {}
    fixed.update(parameters or {})
    known = notebook_parameters(notebook)
    unknown = sorted((set(grid) | set(fixed) | set(first_only or {})) - known)
    if unknown:  # papermill itself only warns, and the run would silently ignore them
        raise ValueError(f"{notebook.name} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
    out = from_repo_root(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, point in enumerate(grid_points(grid)):
        params = {**fixed, **point}
        for key, value in (first_only or {}).items():
            params[key] = value if i == 0 else (not value if isinstance(value, bool) else value)
        path = out / f"{run_name(notebook, point)}.ipynb"
        papermill.execute_notebook(str(notebook), str(path), parameters=params, kernel_name="python3",
                                   cwd=str(notebook.parent), progress_bar=progress)
        paths.append(path)
    return paths


def collect(models_dir: str | Path):
    """One table (pandas) of every evaluated policy saved under ``models_dir``, best reward first."""
    import pandas as pd

    rows = load_model_rows(models_dir)
    if not rows:
        return pd.DataFrame(columns=["policy", "method", "reward", "reward_se", "kl", "kl_se", "judge", "source"])
    table = pd.DataFrame([row.to_dict() for row in rows])
    keep = [c for c in ["policy", "method", "beta", "reward", "reward_se", "kl", "kl_se", "judge", "judge_se",
                        "n_samples", "source"] if c in table.columns]
    return table[keep].sort_values("reward", ascending=False).reset_index(drop=True)
