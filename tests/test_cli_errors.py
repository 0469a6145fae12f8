"""User errors on the command line: one line naming the file, row and field, exit code 2; --debug raises instead."""

import json

import pytest

from dpolab.cli import main


@pytest.fixture
def bad_data(tmp_path):
    """A JSONL file whose second row misspells 'prompt'."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Hi", "chosen": " there", "rejected": " no"}, {"promt": "Hi", "chosen": " a", "rejected": " b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_data_is_one_line_with_file_row_and_field(bad_data, tmp_path, capsys):
    code = main(["train", "model=tiny-gpt2", f"train_data={bad_data}", f"output_dir={tmp_path / 'run'}",
                 "max_steps=1", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    last = err[-1]
    assert last.startswith("dpolab train: error:") and "pairs.jsonl" in last and "promt" in last
    assert not any(line.startswith("Traceback") for line in err)


def test_debug_shows_the_traceback(bad_data, tmp_path):
    with pytest.raises(ValueError, match="promt"):
        main(["--debug", "train", "model=tiny-gpt2", f"train_data={bad_data}", f"output_dir={tmp_path / 'run'}",
              "max_steps=1", "progress=false"])


def test_missing_results_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a results.json"):
        main(["reproduce", "--from-results", str(tmp_path / "missing.json")])


def test_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch):
    """A hub id that is not in the local cache, on a machine that cannot reach the hub (here: an endpoint on a closed
    local port), is refused with a message that says so, without transformers' minute of retries."""
    from dpolab.models import hub_reachable, load_model

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not hub_reachable()
    with pytest.raises(OSError, match=r"not in the local Hugging Face cache, and the hub \(http://127.0.0.1:9\) cannot"):
        load_model("someone-who-does-not-exist/no-such-model-xyz")


def test_hub_offline_setting_counts_as_unreachable(monkeypatch):
    from dpolab.models import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()


def test_module_entry_point_runs_the_same_command(tmp_path):
    """``python -m dpolab.cli`` (what torchrun starts) is the ``dpolab`` console script."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dpolab.cli", "train", "max_steps=3", "--print-config"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["max_steps"] == 3
