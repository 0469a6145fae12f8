"""The ``dpolab`` command: batch runs outside notebooks.

    dpolab train config.yaml beta=0.5 lr=1e-5          # a YAML file, then key=value overrides
    dpolab train model=tiny-gpt2 train_data=pairs.jsonl max_steps=10
    dpolab train config.yaml --print-config            # check and show the resolved config; no work
    torchrun --nproc_per_node=2 -m dpolab.cli train config.yaml   # data parallel (DDP; fsdp=true to shard)
    dpolab train --help                                # every config field with its type, default, meaning
    dpolab reproduce betas=0.1,0.5 steps=48            # the controlled-sentiment experiment (SentimentConfig fields)
    dpolab data-axis A.json B.json --against C.json   # offline DPO by amount of data against the on-policy arms
    dpolab sweep notebooks/03_beta_sweep.ipynb --grid beta=0.05,0.1,0.5   # papermill per grid point
    dpolab sweep NOTEBOOK --grid ... --jobs 2 --continue-on-error --resume  # in parallel; failures recorded; skip done
    dpolab notebooks --html                            # the seven notebooks executed into runs/notebooks/
    dpolab course build OUT; dpolab course grade DIR   # the student edition of the exercises; grade submissions
    dpolab course book SITE                            # the executed notebooks as a static site (after dpolab notebooks)

Each subcommand is an ``add_*`` function in :data:`SUBCOMMANDS`: it receives the argparse sub-parsers object,
adds its parser and sets ``func`` (a callable of the parsed args that returns an exit code). The library
modules a subcommand needs are imported when it runs, so ``dpolab --help`` stays quick. Config files and
``key=value`` overrides of ``train`` and ``reproduce`` go through one typed loader (:mod:`dpolab.train.overrides`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

NOTEBOOK_ORDER = ["01_derivation", "02_training", "03_beta_sweep", "04_multi_turn", "05_ranking", "06_loss_family",
                  "07_on_policy_loop"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="dpolab", description="dpolab: Direct Preference Optimization research kit")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (also after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


# Errors that a user's input causes (data, config, files, checkpoints, a diverging run): one line, exit code 2.
# Every error class of the kit (ConfigError, DataError, CheckpointError, ...) derives from ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, FloatingPointError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpolab`` console script; returns the exit code.

    A user error prints one line, ``dpolab COMMAND: error: MESSAGE`` (the message names the file, row and field),
    and returns 2; ``--debug`` anywhere on the command line raises it with its traceback instead.
    """
    use_headless_backend()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"dpolab {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def use_headless_backend() -> None:
    """Draw figures with Agg: the command saves them to files and opens no window (the library never chooses)."""
    import matplotlib

    matplotlib.use("Agg")


def add_train(subparsers) -> None:
    """Register ``dpolab train``."""
    from dpolab.train.config import field_help

    lines = ["config fields (set in the YAML file or as key=value; loss_params.NAME=VALUE sets one loss parameter):"]
    for name, (type_name, default, comment) in field_help().items():
        lines.append(f"  {name} ({type_name}, default {default})")
        lines.append(f"      {comment}")
    parser = subparsers.add_parser(
        "train", help="SFT or DPO training from a YAML config and key=value overrides",
        description="Train a policy with SFT or DPO. Metrics go to OUTPUT_DIR/metrics.jsonl (and to TensorBoard or W&B "
                    "with report_to), checkpoints to OUTPUT_DIR/checkpoints/. Under torchrun every process runs this "
                    "same command.",
        epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="*", metavar="[config.yaml] key=value",
                        help="an optional YAML file first, then overrides of config fields")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.set_defaults(func=cmd_train, parser=parser)


def load_or_exit(parser: argparse.ArgumentParser, cls, path: str | None, overrides: list[str]):
    """``cls.load(path, overrides)``; a bad key, value or file ends the command as a usage error (exit code 2)."""
    from dpolab.train.overrides import ConfigError

    try:
        return cls.load(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        parser.error(str(err))


def cmd_train(args) -> int:
    from dpolab.train.config import TrainConfig

    path, overrides = None, list(args.settings)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    config = load_or_exit(args.parser, TrainConfig, path, overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if not config.train_data:
        args.parser.error("the config field train_data is empty: name a data file (.jsonl, .json, .parquet, .csv, .arrow), a datasets folder or a hub id")

    if config.stage == "reward":
        from dpolab.train.reward_stage import train_reward

        result = train_reward(config)
        print(json.dumps({"output_dir": str(result.output_dir), "best_step": result.best_step,
                          "final": {**result.history[-1], **result.last_eval}}, indent=2, default=float))
        return 0
    from dpolab.train.trainer import train

    result = train(config)
    if result.history and os.environ.get("RANK", "0") == "0":  # under torchrun, the first process reports
        summary = {**result.history[-1], **(result.eval_history[-1] if result.eval_history else {})}
        summary.pop("warnings", None)
        print(json.dumps({"output_dir": str(result.output_dir), "checkpoint": str(result.checkpoint),
                          "final": summary}, indent=2))
    return 0


def add_reproduce(sub) -> None:
    """Register ``dpolab reproduce``."""
    from dpolab.experiments.sentiment.config import SentimentConfig

    p = sub.add_parser("reproduce", help="the controlled-sentiment experiment (paper §6.1, Fig. 2 left)",
                       description="Run the controlled-sentiment reproduction on the embedded default and write the "
                                   "reward–KL frontier figure and the results table. Overrides: key=value.")
    p.add_argument("overrides", nargs="*", help="SentimentConfig fields, e.g. betas=0.1,0.5 steps=48; fields: " +
                   ", ".join(f.name for f in fields(SentimentConfig)))
    p.add_argument("--config", help="YAML file of SentimentConfig fields (e.g. configs/sentiment_full.yaml)")
    p.add_argument("--from-results", metavar="RESULTS_JSON", nargs="+",
                   help="print the tables of a finished run's results.json without rerunning; several files of runs "
                        "with the same setup (e.g. the full run and the PPO run) are merged and compared together")
    p.add_argument("--figure", metavar="PNG", help="with --from-results: also redraw the frontier figure to this path")
    p.add_argument("--save", metavar="RESULTS_JSON", help="with --from-results: also write the (merged) results here; "
                   "a stopped run's results.partial.json is assembled from its finished curves")
    p.set_defaults(func=cmd_reproduce, parser=p)


def cmd_reproduce(args) -> int:
    from dpolab.experiments.sentiment import run
    from dpolab.experiments.sentiment.report import from_results, report_markdown

    if args.from_results:
        try:
            out = from_results(args.from_results, args.figure)
        except ValueError as err:
            raise SystemExit(f"dpolab reproduce --from-results: {err}") from None
        print(out["table_md"])
        if args.save:
            from dpolab.experiments.sentiment.report import save_results

            print(f"results: {save_results(out['results'], args.save)}")
        if out["figure"]:
            print(f"figure: {out['figure']}")
        return 0
    from dpolab.experiments.sentiment.config import SentimentConfig

    config = load_or_exit(args.parser, SentimentConfig, args.config, args.overrides)
    result = run(config)
    print(report_markdown(result["results"]))
    print(f"\npairs: {result['pair_stats']}")
    print(f"table: {result['table']}\nfigure: {result['figure']}")
    return 0


def add_plan(sub) -> None:
    """Register ``dpolab plan``."""
    p = sub.add_parser("plan", help="estimate a config's memory (weights, gradients, optimizer, reference, "
                                    "activations) and whether it fits a device, before running it",
                       description="Count the model's parameters (built on the meta device: nothing is loaded) and "
                                   "estimate each stage's peak memory for a `dpolab train` or `dpolab reproduce` "
                                   "config (dpolab.cli.plan). Estimates, not measurements.")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config's fields")
    p.add_argument("--config", required=True, help="YAML file of TrainConfig or SentimentConfig fields")
    p.add_argument("--device-memory", metavar="SIZE", help="e.g. 80GB or 24GiB (default: CUDA device 0, if any)")
    p.add_argument("--readable-paths", action="store_true",
                   help="estimate the output layer of the readable path (logits at every position), not the fast one")
    p.set_defaults(func=cmd_plan, parser=p)


def cmd_plan(args) -> int:
    from dpolab.cli.plan import default_device_memory, parse_memory, plan_config, report

    memory = parse_memory(args.device_memory) if args.device_memory else default_device_memory()
    print(report(plan_config(args.config, args.overrides, fast=not args.readable_paths), memory))
    return 0


def add_data_axis(sub) -> None:
    """Register ``dpolab data-axis``."""
    p = sub.add_parser("data-axis", help="offline DPO by amount of preference data against the on-policy arms",
                       description="For each DPO results file (one n_train_prompts each), compare DPO's curve at "
                                   "matched KL with every other method of the --against files (same setup: their π_ref "
                                   "rows must agree), and print one row per size and comparator with the reward "
                                   "queries and optimizer steps each side used.")
    p.add_argument("dpo", nargs="+", metavar="DPO_RESULTS_JSON", help="results files of DPO runs, one size each")
    p.add_argument("--against", nargs="+", required=True, metavar="RESULTS_JSON",
                   help="results files whose other methods are the comparators (their DPO rows are ignored)")
    p.add_argument("--figure", metavar="PNG", help="also draw the difference against the number of pairs here")
    p.add_argument("--save", metavar="JSON", help="also write the rows here")
    p.set_defaults(func=cmd_data_axis, parser=p)


def cmd_data_axis(args) -> int:
    from dpolab.experiments.sentiment.data_axis import data_axis, data_axis_markdown
    from dpolab.experiments.sentiment.report import save_results

    try:
        axis = data_axis(args.dpo, args.against)
    except ValueError as err:
        raise SystemExit(f"dpolab data-axis: {err}") from None
    print(data_axis_markdown(axis))
    if args.save:
        print(f"rows: {save_results(axis, args.save)}")
    if args.figure:
        import matplotlib.pyplot as plt

        from dpolab.data.cache import from_repo_root
        from dpolab.evaluate.plotting import data_axis_figure, save_figure

        fig = data_axis_figure(axis["rows"])
        print(f"figure: {save_figure(fig, from_repo_root(args.figure))}")
        plt.close(fig)
    return 0


def add_sweep(sub) -> None:
    """Register ``dpolab sweep``."""
    p = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill",
                       description="Execute a notebook once per grid point (papermill), name each executed copy by "
                                   "its parameters, record the sweep in OUT/manifest.json (grid, fixed parameters, and "
                                   "per point its parameters, status, executed copy, error and seconds), and print the "
                                   "table of the results this sweep's points saved.")
    p.add_argument("notebook")
    p.add_argument("--grid", nargs="+", required=True, help="key=v1,v2 ... (Cartesian product)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="a fixed parameter for every run")
    p.add_argument("-f", "--parameters-file", help="YAML of fixed parameters (e.g. the notebook's .full.yaml)")
    p.add_argument("--out", help="the sweep's folder: executed copies and manifest.json (default runs/sweeps/NOTEBOOK)")
    p.add_argument("--models-dir", help="where the runs save evaluated models (default: OUTPUT_DIR/models of the "
                                        "notebook's output_dir parameter)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="record a failing point with its error in the manifest and the table, and run the others")
    p.add_argument("--resume", action="store_true",
                   help="skip the points the manifest in --out records as completed (same notebook and fixed "
                        "parameters)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="run N points at once, each in its own process")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from dpolab.cli.sweep import collect, parse_grid, run_sweep
    from dpolab.train.overrides import parse_value

    fixed = {k: parse_value(v) for k, v in args.parameter}
    manifest = run_sweep(args.notebook, parse_grid(args.grid), parameters=fixed, parameters_file=args.parameters_file,
                         out_dir=args.out, models_dir=args.models_dir,
                         first_only={"baselines": True} if "03_beta_sweep" in args.notebook else None,
                         continue_on_error=args.continue_on_error, resume=args.resume, jobs=args.jobs)
    for point in manifest.points:
        print(f"{point.status}: {point.output}" + (f" ({point.error})" if point.error else ""))
    print(collect(manifest.folder).round(3).to_string())
    print(f"manifest: {manifest.path}")
    return 1 if any(p.status == "failed" for p in manifest.points) else 0


def add_notebooks(sub) -> None:
    """Register ``dpolab notebooks``."""
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

    from dpolab.cli.notebook_output import execute_notebook, missing_figures, write_html
    from dpolab.data.cache import REPO_ROOT
    from dpolab.train.overrides import read_yaml

    out = REPO_ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    problems = []
    for stem in args.only:
        source = REPO_ROOT / "notebooks" / f"{stem}.ipynb"
        params = {"save_figures": True}
        if args.full:
            params.update(read_yaml(source.with_suffix(".full.yaml")))
        executed = out / source.name
        print(f"running {source.name} → {executed}", file=sys.stderr)
        execute_notebook(source, executed, parameters=params, kernel_name="python3", cwd=str(source.parent))
        problems += [f"{executed.name}: {p}" for p in missing_figures(nbformat.read(str(executed), as_version=4).cells)]
        if args.html:
            print(f"rendered {write_html(executed)}", file=sys.stderr)
    if problems:  # a figure that never reached the notebook (see notebooks/conftest.py)
        print("figures missing from the executed notebooks:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def add_course(sub) -> None:
    """Register ``dpolab course build``, ``dpolab course grade`` and ``dpolab course book``."""
    p = sub.add_parser("course", help="the course edition: build the student notebooks, grade submissions, publish "
                                      "the book",
                       description="Exercises of notebooks 01, 02 and 06 in nbgrader's format (docs/course.md).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="write the student notebooks (solutions stubbed, outputs cleared)",
                               description="Write the student edition to OUT: every solution region becomes a "
                                           "`raise NotImplementedError()` stub, hidden tests are removed, outputs "
                                           "and execution counts cleared; nothing is written if a solution line "
                                           "would still show.")
    build.add_argument("out")
    build.add_argument("--notebooks", nargs="+", default=None, metavar="STEM",
                       help="notebook stems (default: 01_derivation 02_training 06_loss_family)")
    build.add_argument("--source", default=None, help="folder of the solution notebooks (default notebooks/)")
    build.add_argument("--use-nbgrader", action="store_true",
                       help="strip with nbgrader's generate_assignment (pip install 'dpolab[course]')")
    grade = actions.add_parser("grade", help="run submitted notebooks and report points per exercise",
                               description="Grade SUBMISSIONS/<student>/.../<notebook>.ipynb: the test cells are "
                                           "restored from the source notebooks, every cell runs with a timeout, and "
                                           "an exercise earns its points when its test cell runs without an error.")
    grade.add_argument("submissions")
    grade.add_argument("--source", default=None, help="folder of the solution notebooks (default notebooks/)")
    grade.add_argument("--timeout", type=float, default=600, help="seconds per cell (default 600)")
    grade.add_argument("--kernel", default="python3", help="Jupyter kernel to run the submissions in")
    grade.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="assign a notebook parameter after the parameters cell, e.g. -p model tiny-llama")
    grade.add_argument("--json", default=None, help="also write every result and message to this JSON file")
    grade.add_argument("--nbgrader", default=None, metavar="ASSIGNMENT",
                       help="hand over to nbgrader: SUBMISSIONS is an nbgrader course folder (source/ASSIGNMENT/, "
                            "submitted/<student>/ASSIGNMENT/); runs generate_assignment and autograde there and "
                            "reports its gradebook (pip install 'dpolab[course]')")
    book = actions.add_parser("book", help="publish the executed notebooks as a static site (index, navigation)",
                              description="Write OUT/index.html (contents: chapters, sections, exercises) and one "
                                          "page per executed notebook with contents/previous/next links; figures "
                                          "embedded, MathJax copied to OUT/mathjax/, so the folder reads offline. "
                                          "Run `dpolab notebooks` first: it writes the executed notebooks.")
    book.add_argument("out")
    book.add_argument("--notebooks", nargs="+", default=None, metavar="STEM",
                      help="the chapters, in order (default: all seven notebooks)")
    book.add_argument("--executed", default=None,
                      help="folder of the executed notebooks (default the repository's runs/notebooks, where "
                           "`dpolab notebooks` writes them)")
    book.add_argument("--title", default=None, help="the book's title on its contents page")
    book.add_argument("--hide-solutions", action="store_true",
                      help="the students' book: solution regions shown as stubs, hidden tests and the outputs of "
                           "solution and test cells left out")
    p.set_defaults(func=cmd_course)


def cmd_course(args) -> int:
    from pathlib import Path

    from dpolab.course.edition import DEFAULT_NOTEBOOKS, build_edition
    from dpolab.course.grading import (
        autograde_with_nbgrader,
        grade_submissions,
        problems,
        report_table,
        write_json,
    )
    from dpolab.train.overrides import parse_value

    if args.action == "book":
        from dpolab.course.book import DEFAULT_TITLE, build_book
        from dpolab.data.cache import REPO_ROOT

        executed = Path(args.executed) if args.executed else REPO_ROOT / "runs" / "notebooks"
        pages = build_book(Path(args.out), [executed / f"{stem}.ipynb" for stem in args.notebooks or NOTEBOOK_ORDER],
                           args.title or DEFAULT_TITLE, args.hide_solutions)
        print(f"wrote {len(pages) - 1} chapters and the contents page: {pages[0]}")
        return 0
    source = Path(args.source) if args.source else None
    if args.action == "build":
        for path in build_edition(Path(args.out), args.notebooks or DEFAULT_NOTEBOOKS, source, args.use_nbgrader):
            print(f"wrote {path}")
        return 0
    parameters = {k: parse_value(v) for k, v in args.parameter}
    if args.nbgrader:
        if parameters or args.source:
            raise ValueError("--nbgrader grades the course folder's source/ASSIGNMENT/ notebooks as they are: "
                             "-p and --source do not apply")
        results = autograde_with_nbgrader(Path(args.submissions), args.nbgrader, timeout=args.timeout)
    else:
        results = grade_submissions(Path(args.submissions), source, timeout=args.timeout, kernel_name=args.kernel,
                                    parameters=parameters)
    print(report_table(results).to_string())
    for line in problems(results):
        print(line)
    if args.json:
        write_json(results, Path(args.json))
        print(f"results: {args.json}")
    return 0


SUBCOMMANDS = {"train": add_train, "reproduce": add_reproduce, "plan": add_plan, "data-axis": add_data_axis, "sweep": add_sweep,
               "notebooks": add_notebooks, "course": add_course}


if __name__ == "__main__":
    sys.exit(main())
