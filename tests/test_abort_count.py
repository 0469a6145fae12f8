"""The abort counter of benchmarks/abort_count.py in its quick form (issue 28): two distributed tests and one real
``torchrun -m dpolab.cli train``, each a launch of two gloo processes, none aborting at exit and none retried.
The full count (30+ launches, README's test section) is the same script with more rounds."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_abort_count_finds_no_abort():
    sys.path.insert(0, str(BENCHMARKS))
    import abort_count

    result = abort_count.count(rounds=1, tests=["tests/test_loss_distributed.py"], log=lambda *_: None)
    problems = [(r["launch"], r["outcome"], r["detail"][-800:]) for r in result["records"] if r["outcome"] != "ok"]
    assert (result["launches"], result["abort"], result["failed"]) == (3, 0, 0), problems
