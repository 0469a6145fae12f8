"""The golden trajectory: a tiny DPO run (tests/golden/make_golden.py) gives the committed numbers of every step.

8 optimizer steps of 2 accumulated micro-batches and one held-out evaluation; every number that metrics.jsonl
records (loss, rewards/*, logps/*, logits/*, entropy, grad_norm, learning_rate, num_tokens, eval_*) must agree with
tests/golden/dpo_tiny_metrics.json to 1e-6, absolute or relative. A refactoring that changes any of them changes
behaviour; an intended change regenerates the file with the script and says why in its commit.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import GOLDEN, RUN, golden_file, golden_run  # noqa: E402

TOLERANCE = 1e-6


def test_the_run_in_the_script_is_the_run_of_the_golden_file():
    for path in sorted(GOLDEN.parent.glob("dpo_tiny_metrics*.json")):
        assert json.loads(path.read_text())["run"] == json.loads(GOLDEN.read_text())["run"], path.name
    committed = json.loads(GOLDEN.read_text())["run"]
    assert {k: v for k, v in RUN.items() if not k.endswith("_data")} == \
        {k: v for k, v in committed.items() if not k.endswith("_data")}, "RUN changed: regenerate the golden file"


def test_tiny_dpo_run_reproduces_the_golden_trajectory(tmp_path):
    path = golden_file()  # this CPU kind's file where it has one (float32 sums in another order elsewhere)
    expected = json.loads(path.read_text())["records"]
    actual = golden_run(tmp_path)
    assert [(r["step"], "eval_loss" in r) for r in actual] == [(r["step"], "eval_loss" in r) for r in expected]
    wrong = []
    for got, want in zip(actual, expected):
        kind = "eval" if "eval_loss" in want else "train"
        if got.keys() != want.keys():
            wrong.append(f"step {want['step']} ({kind}): fields missing {sorted(want.keys() - got.keys())}, "
                         f"new {sorted(got.keys() - want.keys())}")
        for field in sorted(want.keys() & got.keys()):
            a, b = got[field], want[field]
            same = a is None and b is None or (
                a is not None and b is not None and math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE))
            if not same:
                wrong.append(f"step {want['step']} ({kind}) {field}: {a!r}, golden {b!r}")
    assert not wrong, f"the golden trajectory changed (against {path.name}):\n" + "\n".join(wrong)
