"""The ``dpolab`` command: batch runs outside notebooks.

    dpolab train config.yaml beta=0.5 lr=1e-5          # a YAML file, then key=value overrides
    dpolab train model=tiny-gpt2 train_data=pairs.jsonl max_steps=10
    dpolab train config.yaml --print-config            # check and show the resolved config; no work
    torchrun --nproc_per_node=2 -m dpolab.cli train config.yaml   # data parallel (DDP; fsdp=true to shard)
    dpolab train --help                                # every config field with its type, default, meaning

Subcommands are listed in :data:`SUBCOMMANDS` as ``name -> "module:function"``; the function receives
the argparse sub-parsers object, adds its parser and sets ``func`` (a callable of the parsed args that
returns an exit code). Modules are imported only when their subcommand is built, so adding one is a line
here plus a function in its own module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, str] = {
    "train": "dpolab.cli:add_train",
    "reproduce": "dpolab.commands:add_reproduce",
    "sweep": "dpolab.commands:add_sweep",
    "notebooks": "dpolab.commands:add_notebooks",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="dpolab", description="dpolab: Direct Preference Optimization research kit")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (also after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for target in SUBCOMMANDS.values():
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
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
    parser.set_defaults(func=_train, parser=parser)


def _train(args) -> int:
    from dpolab.train.config import ConfigError, TrainConfig

    path, overrides = None, list(args.settings)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    try:
        config = TrainConfig.load(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        args.parser.error(str(err))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if not config.train_data:
        args.parser.error("the config field train_data is empty: name a JSONL file or a saved datasets folder")

    from dpolab.train.trainer import train

    result = train(config)
    if result.history and _is_main():
        summary = {**result.history[-1], **(result.eval_history[-1] if result.eval_history else {})}
        summary.pop("warnings", None)
        print(json.dumps({"output_dir": str(result.output_dir), "checkpoint": str(result.checkpoint),
                          "final": summary}, indent=2))
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
