"""Batch runs of a notebook over a grid of parameters with papermill, and their collected results.

``dpolab sweep notebooks/03_beta_sweep.ipynb --grid beta=0.05,0.1,0.5`` executes the notebook once per point
of the grid (the Cartesian product of the listed values), writes each executed copy to
``<out>/<notebook>__<key>=<value>….ipynb`` (never over the source; ``out`` is ``runs/sweeps/<notebook>`` unless
given), records the sweep in ``<out>/manifest.json`` (:mod:`dpolab.cli.sweep_manifest`), and prints one table of the
results that its points saved with :func:`dpolab.evaluate.results.save_model_row`. Grid values read as override values do
(:func:`dpolab.train.overrides.parse_value`): ``0.1`` is a number, ``true`` a bool, ``sigmoid`` a string.

A failing point stops the sweep once the manifest records it, unless ``continue_on_error`` is set: then it is
recorded with its error and the other points run. ``resume`` skips the points that the folder's manifest records
as completed; ``jobs`` runs that many points at once, each in its own process and kernel.
"""

from __future__ import annotations

import ast
import itertools
import json
import time
import warnings
from pathlib import Path

from dpolab.cli.sweep_manifest import MANIFEST_NAME, Manifest, Point, repo_relative, row_files, written_rows
from dpolab.data.cache import from_repo_root, sha256_file
from dpolab.evaluate.results import ModelRow
from dpolab.train.overrides import parse_value, read_yaml

TABLE_COLUMNS = ["policy", "method", "beta", "reward", "reward_se", "kl", "kl_se", "judge", "judge_se", "n_samples",
                 "source"]
"""The columns of the collected table, in order, where some row has them."""
EMPTY_COLUMNS = ["policy", "method", "reward", "reward_se", "kl", "kl_se", "judge", "source"]


class SweepPointError(RuntimeError):
    """A point that ran in a worker process (``jobs > 1``) failed; its error is in the manifest and the message."""


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["beta=0.05,0.1", "seed=0,1"]`` → ``{"beta": [0.05, 0.1], "seed": [0, 1]}`` (each value by
    :func:`dpolab.train.overrides.parse_value`)."""
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


def notebook_parameters(notebook: Path) -> dict:
    """The parameters papermill can set in ``notebook`` (those of its ``parameters`` cell), with their defaults."""
    import papermill

    return {name: info.get("default") for name, info in papermill.inspect_notebook(str(notebook)).items()}


def describe_error(err: BaseException) -> str:
    """One line for the manifest: a failing cell's exception name and message (and its execution count)."""
    if getattr(err, "ename", None):  # papermill's PapermillExecutionError
        where = f" (cell [{err.exec_count}])" if getattr(err, "exec_count", None) else ""
        return f"{err.ename}: {err.evalue}{where}"
    return f"{type(err).__name__}: {err}"


def execute_point(notebook: str, output: str, params: dict, models_folder: str | None,
                  progress: bool) -> tuple[dict, Exception | None]:
    """Execute one point with papermill; return its outcome (the :class:`~dpolab.cli.sweep_manifest.Point` fields
    status, error, seconds, rows) and the exception when it failed (recorded, not raised)."""
    from dpolab.cli.notebook_output import execute_notebook

    folder = Path(models_folder) if models_folder else None
    before, started, error = row_files(folder), time.perf_counter(), None
    try:
        execute_notebook(notebook, output, parameters=params, kernel_name="python3", cwd=str(Path(notebook).parent),
                         progress_bar=progress)
    except Exception as err:  # a failing cell, a dead kernel: the point failed, the sweep decides what follows
        error = err
    outcome = {"status": "failed" if error else "completed", "error": describe_error(error) if error else None,
               "seconds": round(time.perf_counter() - started, 3), "rows": written_rows(folder, before)}
    return outcome, error


def execute_in_worker(args: tuple) -> dict:
    """:func:`execute_point` in a worker process: the outcome only (its error is in the outcome as text)."""
    return execute_point(*args)[0]


def models_folder(params: dict, defaults: dict, models_dir: str | Path | None) -> str | None:
    """Where a point saves its model rows: ``models_dir`` when given, else ``<output_dir>/models`` of the point's
    (or the notebook's default) ``output_dir``; None for a notebook without one."""
    if models_dir:
        return str(from_repo_root(models_dir))
    output_dir = params.get("output_dir", ast.literal_eval(defaults["output_dir"]) if "output_dir" in defaults else "")
    return str(from_repo_root(output_dir) / "models") if output_dir else None


def run_sweep(notebook: str | Path, grid: dict[str, list], *, parameters: dict | None = None,
              parameters_file: str | Path | None = None, out_dir: str | Path | None = None,
              models_dir: str | Path | None = None, first_only: dict | None = None, progress: bool = True,
              continue_on_error: bool = False, resume: bool = False, jobs: int = 1) -> Manifest:
    """Execute ``notebook`` once per grid point; return the sweep's manifest (also saved in ``out_dir``).

    Args:
        notebook: the source notebook (paths are taken from the repository root when relative).
        grid: parameter name → list of values.
        parameters: fixed parameters for every run.
        parameters_file: a YAML file of fixed parameters (e.g. ``notebooks/03_beta_sweep.full.yaml``).
        out_dir: the sweep's folder: executed copies and ``manifest.json`` (default ``runs/sweeps/<notebook>``).
        models_dir: where the points save model rows (default: ``<output_dir>/models`` of the notebook's
            ``output_dir`` parameter); the rows written there during a point are recorded in the manifest.
        first_only: parameters for the first run only (e.g. ``{"baselines": True}``), the opposite for the rest
            when the value is a bool — baselines need to be computed once per sweep, not once per β.
        progress: show papermill's cell progress bar (with ``jobs=1``).
        continue_on_error: record a failing point with its error and run the others; otherwise the sweep stops at
            the first failure (after recording it) and raises its error.
        resume: skip the points that the manifest in ``out_dir`` records as completed (same notebook and fixed
            parameters required; the grid may grow).
        jobs: points run at once, each in its own process.
    """
    notebook = from_repo_root(notebook)
    fixed = read_yaml(from_repo_root(parameters_file)) if parameters_file else {}
    fixed.update(parameters or {})
    defaults = notebook_parameters(notebook)
    unknown = sorted((set(grid) | set(fixed) | set(first_only or {})) - set(defaults))
    if unknown:  # papermill itself only warns, and the run would silently ignore them
        raise ValueError(f"{notebook.name} has no parameter(s) {unknown}; its parameters are {sorted(defaults)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = from_repo_root(out_dir or Path("runs/sweeps") / notebook.stem)
    points = []
    for i, point in enumerate(grid_points(grid)):
        varied = dict(point)
        for key, value in (first_only or {}).items():
            varied[key] = value if i == 0 else (not value if isinstance(value, bool) else value)
        points.append(Point(varied, repo_relative(out / f"{run_name(notebook, point)}.ipynb")))
    manifest = Manifest(out, repo_relative(notebook), grid, fixed, dict(first_only or {}), points)
    earlier = Manifest.load(out) if resume and (out / MANIFEST_NAME).is_file() else None
    if earlier is not None and earlier.differences(manifest):
        raise ValueError(f"--resume: {earlier.path} records another sweep ({'; '.join(earlier.differences(manifest))})"
                         "; use another --out folder, or run without --resume to start this sweep afresh")
    todo = []
    for i, point in enumerate(manifest.points):
        done = earlier.completed(point.parameters) if earlier is not None else None
        if done is not None:
            manifest.points[i] = done
        else:
            todo.append((point, [str(notebook), str(from_repo_root(point.output)), {**fixed, **point.parameters},
                                 models_folder({**fixed, **point.parameters}, defaults, models_dir)]))
    out.mkdir(parents=True, exist_ok=True)
    manifest.save()
    if jobs == 1 or len(todo) <= 1:
        _run_in_turn(manifest, todo, progress, continue_on_error)
    else:
        _run_in_parallel(manifest, todo, jobs, continue_on_error)
    return manifest


def _record(manifest: Manifest, point: Point, outcome: dict) -> None:
    for key, value in outcome.items():
        setattr(point, key, value)
    manifest.save()


def _run_in_turn(manifest: Manifest, todo: list, progress: bool, continue_on_error: bool) -> None:
    for point, args in todo:
        _record(manifest, point, {"status": "running"})
        outcome, error = execute_point(*args, progress)
        _record(manifest, point, outcome)
        if error is not None and not continue_on_error:
            raise error


def _run_in_parallel(manifest: Manifest, todo: list, jobs: int, continue_on_error: bool) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    first_failure = None
    # spawn: a fresh interpreter per worker (forking a process that holds threads and zmq sockets is unsafe)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(execute_in_worker, (*args, False)): point for point, args in todo}
        for point in futures.values():
            point.status = "running"
        manifest.save()
        for future in as_completed(futures):
            point = futures[future]
            if future.cancelled():  # never started: the sweep stopped at an earlier failure
                _record(manifest, point, {"status": "pending"})
                continue
            try:
                outcome = future.result()
            except Exception as err:  # the worker process itself died
                outcome = {"status": "failed", "error": describe_error(err), "seconds": None, "rows": []}
            _record(manifest, point, outcome)
            if outcome["status"] == "failed" and not continue_on_error and first_failure is None:
                first_failure = point
                for other in futures:
                    other.cancel()
    if first_failure is not None:
        raise SweepPointError(f"point {first_failure.parameters} failed: {first_failure.error}; the executed copy "
                              f"{first_failure.output} shows the cell (--continue-on-error runs the other points)")


def collect(sweep_dir: str | Path):
    """One table (pandas) of the model rows that this sweep's completed points saved, best reward first, then one
    row per failed point with its parameters and error.

    Only the rows recorded in the sweep's manifest are read, so rows an earlier run left in the same models folder
    never appear; a recorded row file that was rewritten since (another run overwrote it) is left out with a warning.
    """
    import pandas as pd

    manifest = Manifest.load(from_repo_root(sweep_dir))
    rows, seen, changed = [], set(), []
    for point in manifest.points:
        for saved in point.rows if point.status == "completed" else []:
            if saved["path"] in seen:
                continue
            seen.add(saved["path"])
            path = from_repo_root(saved["path"])
            if not path.is_file() or sha256_file(path) != saved["sha256"]:
                changed.append(saved["path"])
                continue
            rows.append(ModelRow.from_dict(json.loads(path.read_text()), where=str(path)).to_dict())
    if changed:
        warnings.warn(f"{manifest.path}: left out {len(changed)} row file(s) rewritten or removed since this sweep "
                      f"wrote them: {changed}", stacklevel=2)
    table = pd.DataFrame(columns=EMPTY_COLUMNS)
    if rows:
        table = pd.DataFrame(rows)
        table = table[[c for c in TABLE_COLUMNS if c in table.columns]]
        table = table.sort_values("reward", ascending=False).reset_index(drop=True)
    failed = [{**p.parameters, "status": "failed", "error": p.error} for p in manifest.points if p.status == "failed"]
    if failed:
        table = pd.concat([table.assign(status="completed"), pd.DataFrame(failed)], ignore_index=True)
    return table
