"""The entry points the README documents stay importable where it says, and are the canonical objects."""

import importlib

import pytest

DOCUMENTED = [
    ("dpolab.losses", "dpo_loss"), ("dpolab.losses", "LOSSES"), ("dpolab.logprobs", "sequence_logprobs"),
    ("dpolab.rewards", "implicit_reward"), ("dpolab.evaluate", "win_rate"), ("dpolab.evaluate", "bradley_terry"),
    ("dpolab.trainer", "train"),
]


@pytest.mark.parametrize("module, name", DOCUMENTED)
def test_documented_entry_point(module, name):
    assert callable(getattr(importlib.import_module(module), name)) or name == "LOSSES"


def test_reexports_are_the_canonical_objects():
    from dpolab.evaluate import bradley_terry
    from dpolab.evaluate.rank import bradley_terry as canonical_bt
    from dpolab.train.trainer import train as canonical_train
    from dpolab.trainer import train

    assert train is canonical_train and bradley_terry is canonical_bt


def test_library_code_does_not_import_the_experiments():
    """Layering: no library module imports dpolab.experiments (lazily or not); only the experiments themselves and
    the command line (``dpolab/cli/``: the command, its plan, sweeps), the top layer that runs them, do."""
    import re
    from pathlib import Path

    import dpolab

    root = Path(dpolab.__file__).parent
    importing = re.compile(r"^\s*(from dpolab\.experiments|import dpolab\.experiments)", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "experiments" not in p.parts and p.relative_to(root).parts[0] != "cli"
                 and importing.search(p.read_text())]
    assert offenders == []


def test_the_root_holds_the_maths_the_entry_points_and_packages():
    """Issue 34's layout: the root of dpolab/ holds the paper's maths (logprobs, rewards), the entry points and
    packages; every other module lives in the package of its concept."""
    from pathlib import Path

    import dpolab

    root = Path(dpolab.__file__).parent
    modules = sorted(p.name for p in root.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "logprobs.py", "rewards.py", "trainer.py"]
