"""The ground floor of the layout: the losses and the implicit reward import with torch alone, and the label
convention is a leaf (checked in a fresh interpreter, where nothing else has been imported yet)."""

import json
import subprocess
import sys


def _loaded_after(statement: str) -> dict:
    code = (f"import sys; {statement}; import json; "
            "print(json.dumps({'dpolab': sorted(m for m in sys.modules if m.startswith('dpolab')), "
            "'transformers': 'transformers' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_losses_import_with_torch_alone():
    """`import dpolab.losses` loads the losses package and nothing else of dpolab: no trainer, model, data or
    sampling module, and not transformers."""
    loaded = _loaded_after("import dpolab.losses")
    assert not loaded["transformers"]
    others = [m for m in loaded["dpolab"] if m != "dpolab" and not m.startswith("dpolab.losses")]
    assert others == [], f"importing dpolab.losses also loaded {others}"


def test_the_label_convention_is_a_leaf():
    """`IGNORE_INDEX` comes from a module that imports nothing of dpolab (its package's __init__ is a docstring), so
    the log-prob kernels (dpolab.fast) do not reach into the data pipeline for it."""
    assert _loaded_after("import dpolab.data.labels")["dpolab"] == ["dpolab", "dpolab.data", "dpolab.data.labels"]
    kernels = _loaded_after("import dpolab.fast.pairtree")["dpolab"]
    assert "dpolab.data.batch" not in kernels and "dpolab.data.tokenize" not in kernels


def test_the_re_exports_are_the_same_objects():
    """dpolab.rewards.implicit_rewards and dpolab.data.batch.IGNORE_INDEX, where callers found them before, are the
    leaf modules' objects."""
    from dpolab.data.batch import IGNORE_INDEX as from_batch
    from dpolab.data.labels import IGNORE_INDEX
    from dpolab.losses.implicit import implicit_rewards
    from dpolab.rewards import implicit_rewards as from_rewards

    assert from_rewards is implicit_rewards and from_batch == IGNORE_INDEX == -100
