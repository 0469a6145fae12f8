"""The experiment sub-commands of the ``dpolab`` command line: ``reproduce``, ``sweep`` and ``notebooks``.

``dpolab train`` lives in :mod:`dpolab.cli` with the trainer; these compose experiments and notebooks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

NOTEBOOK_ORDER = ["01_derivation", "02_training", "03_beta_sweep", "04_multi_turn", "05_ranking", "06_loss_family"]


def add_reproduce(sub) -> None:
    from dpolab.experiments.sentiment import SentimentConfig

    p = sub.add_parser("reproduce", help="the controlled-sentiment experiment (paper §6.1, Fig. 2 left)",
                       description="Run the controlled-sentiment reproduction on the embedded default and write the "
                                   "reward–KL frontier figure and the results table. Overrides: key=value.")
    p.add_argument("overrides", nargs="*", help="SentimentConfig fields, e.g. betas=0.1,0.5 steps=48; fields: " +
                   ", ".join(f.name for f in dataclasses.fields(SentimentConfig)))
    p.add_argument("--config", help="YAML file of SentimentConfig fields (e.g. configs/sentiment_full.yaml)")
    p.add_argument("--from-results", metavar="RESULTS_JSON", nargs="+",
                   help="print the tables of a finished run's results.json without rerunning; several files of runs "
                        "with the same setup (e.g. the full run and the PPO run) are merged and compared together")
    p.add_argument("--figure", metavar="PNG", help="with --from-results: also redraw the frontier figure to this path")
    p.set_defaults(func=cmd_reproduce)


def sentiment_config(path: str | None, overrides: list[str]):
    """A SentimentConfig from defaults, then a YAML file, then ``key=value`` strings (type-checked)."""
    import yaml

    from dpolab.experiments.sentiment import SentimentConfig
    from dpolab.sweep import _literal

    fields = {f.name: f for f in dataclasses.fields(SentimentConfig)}
    values = dict(yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"dpolab reproduce: override {item!r} is not key=value")
        values[key] = _literal(text)
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise SystemExit(f"dpolab reproduce: unknown config key {key!r}; known: {', '.join(fields)}")
        default = fields[key].default
        if isinstance(default, tuple):
            if isinstance(value, str) and default and isinstance(default[0], str):
                value = [v.strip() for v in value.split(",") if v.strip()]  # methods=dpo,rloo
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if default and isinstance(default[0], str):
                if not all(isinstance(v, str) for v in value):
                    raise SystemExit(f"dpolab reproduce: config key {key!r} needs names, got {value!r}")
            elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise SystemExit(f"dpolab reproduce: config key {key!r} needs numbers, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise SystemExit(f"dpolab reproduce: config key {key!r} needs true/false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
            raise SystemExit(f"dpolab reproduce: config key {key!r} needs {type(default).__name__}, got {value!r}")
        checked[key] = value
    return SentimentConfig(**checked)


def cmd_reproduce(args) -> int:
    from dpolab.experiments.sentiment import run
    from dpolab.experiments.sentiment_report import from_results, report_markdown

    if args.from_results:
        try:
            out = from_results(args.from_results, args.figure)
        except ValueError as err:
            raise SystemExit(f"dpolab reproduce --from-results: {err}") from None
        print(out["table_md"])
        if out["figure"]:
            print(f"figure: {out['figure']}")
        return 0
    config = sentiment_config(args.config, args.overrides)
    result = run(config)
    print(report_markdown(result["results"]))
    print(f"\npairs: {result['pair_stats']}")
    print(f"table: {result['table']}\nfigure: {result['figure']}")
    return 0


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill",
                       description="Execute a notebook once per grid point (papermill), name each executed copy by "
                                   "its parameters, and print the collected results table.")
    p.add_argument("notebook")
    p.add_argument("--grid", nargs="+", required=True, help="key=v1,v2 ... (Cartesian product)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="a fixed parameter for every run")
    p.add_argument("-f", "--parameters-file", help="YAML of fixed parameters (e.g. the notebook's .full.yaml)")
    p.add_argument("--out", default="runs/notebooks", help="folder of the executed copies")
    p.add_argument("--models-dir", default="runs/03_beta_sweep/models", help="where the runs save evaluated models")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from dpolab.sweep import _literal, collect, parse_grid, run_sweep

    fixed = {k: _literal(v) for k, v in args.parameter}
    paths = run_sweep(args.notebook, parse_grid(args.grid), parameters=fixed, parameters_file=args.parameters_file,
                      out_dir=args.out, first_only={"baselines": True} if "03_beta_sweep" in args.notebook else None)
    print("\n".join(f"executed: {p}" for p in paths))
    print(collect(args.models_dir).round(3).to_string())
    return 0


def add_notebooks(sub) -> None:
    p = sub.add_parser("notebooks", help="execute the six notebooks with papermill into runs/notebooks/")
    p.add_argument("--only", nargs="*", default=NOTEBOOK_ORDER, help="notebook stems to run")
    p.add_argument("--full", action="store_true", help="use each notebook's .full.yaml overrides")
    p.add_argument("--out", default="runs/notebooks")
    p.add_argument("--html", action="store_true",
                   help="also write each executed notebook as one self-contained HTML file (figures and offline "
                        "MathJax inlined) beside it, for a browser without Jupyter")
    p.set_defaults(func=cmd_notebooks)


def cmd_notebooks(args) -> int:
    import nbformat
    import papermill
    import yaml

    from dpolab.cache import REPO_ROOT
    from dpolab.notebook_output import missing_figures, write_html

    out = REPO_ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    problems = []
    for stem in args.only:
        source = REPO_ROOT / "notebooks" / f"{stem}.ipynb"
        params = {"save_figures": True}
        if args.full:
            params.update(yaml.safe_load(source.with_suffix(".full.yaml").read_text()) or {})
        executed = out / source.name
        print(f"running {source.name} → {executed}", file=sys.stderr)
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name="python3",
                                   cwd=str(source.parent))
        problems += [f"{executed.name}: {p}" for p in missing_figures(nbformat.read(str(executed), as_version=4).cells)]
        if args.html:
            print(f"rendered {write_html(executed)}", file=sys.stderr)
    if problems:  # a figure that never reached the notebook (see notebooks/conftest.py)
        print("figures missing from the executed notebooks:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    """Add this module's sub-commands to the ``dpolab`` parser's subparsers."""
    add_reproduce(sub)
    add_sweep(sub)
    add_notebooks(sub)


def main(argv: list[str] | None = None) -> int:
    from dpolab.cli import use_headless_backend

    use_headless_backend()
    parser = argparse.ArgumentParser(prog="dpolab")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)
