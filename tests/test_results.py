"""Saved model rows (dpolab.evaluate.results): one field per quantity, a save/load round trip, and files of earlier
versions."""

import json
import math

import pytest

from dpolab.evaluate.results import ModelRow, load_model_rows, save_model_row


def test_round_trip_keeps_every_field_and_the_extra_keys(tmp_path):
    row = {"policy": "dpo_beta0.1", "method": "DPO", "reward": 0.4, "reward_se": 0.05, "kl": 2.5, "kl_se": 0.3,
           "judge": 0.1, "judge_se": 0.02, "n_samples": 12, "beta": 0.1, "heldout_acc": 0.75, "heldout_acc_se": 0.1,
           "heldout_pairs": 18, "heldout_prompts": 3, "examples": ["a", "b"], "final_metrics": {"loss": 0.5},
           "prompts": ["x", "y", "z"], "prompt_rewards": [0.3, 0.4, 0.5], "prompt_lengths": [4.0, 5.0, 6.0]}
    path = save_model_row(row, tmp_path, source="02_training")
    assert path.name == "02_training__dpo_beta0.1.json"
    assert json.loads(path.read_text()) == {**row, "source": "02_training"}  # the file is the flat dict
    [loaded] = load_model_rows(tmp_path)
    assert loaded.kl == 2.5 and loaded.beta == 0.1 and loaded.heldout_acc == 0.75 and loaded.source == "02_training"
    assert loaded.extra == {"examples": ["a", "b"], "final_metrics": {"loss": 0.5}}
    assert loaded.to_dict() == {**row, "source": "02_training"}
    assert load_model_rows(tmp_path / "none") == []


def test_rows_of_earlier_versions_read_their_accuracy_under_one_name():
    """The held-out implicit-reward accuracy was saved as implicit_accuracy, or only inside final_metrics (trl's
    eval_ name, and the name before dpolab took trl's eval_ prefix); the training pairs' accuracy is not held out."""
    base = {"policy": "p", "prompts": ["x"], "prompt_rewards": [0.0]}
    assert ModelRow.from_dict({**base, "implicit_accuracy": 0.75}).heldout_acc == 0.75
    assert ModelRow.from_dict({**base, "final_metrics": {"eval_rewards/accuracies": 0.6, "loss": 0.3}}).heldout_acc == 0.6
    assert ModelRow.from_dict({**base, "final_metrics": {"eval/rewards/accuracies": 0.7}}).heldout_acc == 0.7
    assert ModelRow.from_dict({**base, "final_metrics": {"rewards/accuracies": 0.9}}).heldout_acc is None
    assert ModelRow.from_dict(base).heldout_acc is None
    assert ModelRow.from_dict({**base, "implicit_accuracy": math.nan}).heldout_acc is None
    old = ModelRow.from_dict({**base, "implicit_accuracy": 0.75})
    assert "implicit_accuracy" not in old.extra and old.to_dict()["heldout_acc"] == 0.75


def test_bad_files_and_rows_name_the_file_and_field(tmp_path):
    """A row needs a name; one without per-prompt rewards loads (a table can show it) and ranking refuses it."""
    from dpolab.experiments.ranking_report import align_rows

    (tmp_path / "a.json").write_text('{"policy": "a", "prompts": ["x"], "reward": 0.5}')
    (tmp_path / "b.json").write_text('{"policy": "b", "prompts": ["x"], "prompt_rewards": [0.1]}')
    assert load_model_rows(tmp_path)[0].reward == 0.5
    with pytest.raises(ValueError, match=r"saved, row 0 \(a\), field 'prompt_rewards': missing"):
        align_rows(load_model_rows(tmp_path), source="saved")
    (tmp_path / "b.json").write_text('{"prompts": ["x"]}')
    with pytest.raises(ValueError, match=r"b.json \(\?\), field 'policy': missing"):
        load_model_rows(tmp_path)
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="a.json: not a valid results file"):
        load_model_rows(tmp_path)


def test_committed_results_rows_load():
    """Every final row of the committed frontier results reads as a ModelRow (the files on disk stay readable)."""
    from dpolab.data.cache import REPO_ROOT

    results = json.loads((REPO_ROOT / "results" / "sentiment_default.json").read_text())
    reference = next(r for r in results["policies"] if r["method"] == "Reference")
    rows = [ModelRow.from_dict({"prompts": reference["prompts"], **r}) for r in results["policies"]]
    assert all(len(r.prompt_rewards) == len(reference["prompts"]) for r in rows)
    assert any(r.heldout_acc is not None for r in rows)
