"""The data axis (dpolab.experiments.sentiment.data_axis): DPO at several data sizes against the same comparators,
numbers by hand on hand-made results files."""

import json

import pytest

from dpolab.cli import main
from dpolab.experiments.sentiment.curves import RESULTS_FORMAT
from dpolab.experiments.sentiment.data_axis import data_axis, data_axis_markdown


def _row(method, step, kl, reward, queries=None, knob=0.1):
    """A checkpoint row whose two held-out prefixes have the same KL and reward (no prefix noise)."""
    row = {"policy": f"{method.lower()}_{knob:g}_step{step}", "method": method, "knob": knob, "step": step,
           "reward": reward, "reward_se": 0.0, "kl": kl, "kl_se": 0.0, "gain": reward, "gain_se": 0.0,
           "prompt_rewards": [reward, reward], "prompt_kls": [kl, kl], "prompts": ["a", "b"]}
    if queries is not None:
        row["reward_queries"] = queries
    return row


def _file(path, rows, n_train_prompts, pairs=None):
    reference = {**_row("Reference", 0, 0.0, 0.0), "knob": 0.0, "policy": "reference"}
    results = {"format": RESULTS_FORMAT, "config": {"seed": 0, "n_train_prompts": n_train_prompts},
               "pair_stats": None if pairs is None else {"num_pairs": pairs}, "policies": [reference, *rows],
               "comparisons": [], "timings": {"total": 1.0}}
    rows[-1]["final"] = True  # each file holds one curve; its last checkpoint is the final one
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def files(tmp_path):
    """RLOO-GT: (0, 0) → (4, 1), 2,048 queries in 64 steps. DPO on 150 pairs: (0, 0) → (4, 0.5), the gap to RLOO-GT
    is −kl/8, whose mean over [0, 4] is −0.25. DPO on 2,400 pairs: (0, 0) → (2, 0.75), on [0, 2] a gap of
    0.375·kl − 0.25·kl = kl/8, mean +0.125. With no prefix noise both intervals are the point."""
    rloo = _file(tmp_path / "rloo.json", [_row("RLOO-GT", 0, 0, 0, 0, 0.01), _row("RLOO-GT", 64, 4, 1, 2048, 0.01)],
                 128)
    small = _file(tmp_path / "small.json", [_row("DPO", 0, 0, 0, 128), _row("DPO", 56, 4, 0.5, 128)], 32, 150)
    large = _file(tmp_path / "large.json", [_row("DPO", 0, 0, 0, 2048), _row("DPO", 900, 2, 0.75, 2048)], 512, 2400)
    return rloo, small, large


def test_data_axis_by_hand(files):
    rloo, small, large = files
    axis = data_axis([large, small], [rloo])
    rows = axis["rows"]
    assert [(r["n_train_prompts"], r["pairs"], r["method_b"]) for r in rows] == [(32, 150, "RLOO-GT"),
                                                                                (512, 2400, "RLOO-GT")]
    assert rows[0]["reward_diff"] == pytest.approx(-0.25) and (rows[0]["kl_low"], rows[0]["kl_high"]) == (0.0, 4.0)
    assert rows[1]["reward_diff"] == pytest.approx(0.125) and rows[1]["kl_high"] == 2.0
    for r in rows:
        assert r["ci_low"] == pytest.approx(r["reward_diff"]) and r["ci_high"] == pytest.approx(r["reward_diff"])
    assert (rows[1]["reward_queries_a"], rows[1]["reward_queries_b"], rows[1]["steps_a"], rows[1]["steps_b"]) == (
        2048, 2048, 900, 64)
    assert (rows[1]["final_reward"], rows[1]["final_kl"]) == (0.75, 2.0)
    table = data_axis_markdown(axis).splitlines()
    assert table[3] == ("| 512 | 2400 | DPO | RLOO-GT | 2048, 2048 | 900, 64 | 0.00–2.00 | +0.125 | [+0.125, +0.125] "
                        "| 0.750, 2.00, — |")


def test_data_axis_command_and_bad_files(files, tmp_path, capsys):
    rloo, small, large = files
    out = tmp_path / "axis.json"
    figure = tmp_path / "axis.png"
    assert main(["data-axis", str(small), str(large), "--against", str(rloo), "--save", str(out), "--figure",
                 str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "| 32 | 150 | DPO | RLOO-GT |" in printed and figure.stat().st_size > 0
    assert [r["pairs"] for r in json.loads(out.read_text())["rows"]] == [150, 2400]

    no_pairs = _file(tmp_path / "no_pairs.json", [_row("DPO", 0, 0, 0), _row("DPO", 5, 1, 0.1)], 64)
    with pytest.raises(SystemExit, match="no_pairs.json: field 'pair_stats.num_pairs' is missing"):
        main(["data-axis", str(no_pairs), "--against", str(rloo)])
    other = json.loads(large.read_text())
    other["policies"][0]["prompt_rewards"] = [0.5, 0.5]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other.json: its π_ref row"):
        main(["data-axis", str(tmp_path / "other.json"), "--against", str(rloo)])
