"""Evaluation inputs (issue 20): pandas Series are matched by index label, never by position; mismatched indexes and
non-numeric scores are refused, naming the field and row."""

import numpy as np
import pandas as pd
import pytest

from dpolab.evaluate import length_controlled_win_rate, preference_accuracy, win_rate


def test_series_are_aligned_by_label_not_position():
    """A wins on prompt 'x' (1 > 0) and loses on 'y' (0 < 1) and 'z' (0 < 2): win rate 1/3 by label. By position the
    reordered B, (2, 1, 0) against A's (1, 0, 0), gives 0 wins, 2 losses, 1 tie: 1/6 — the test tells them apart."""
    a = pd.Series([1.0, 0.0, 0.0], index=["x", "y", "z"])
    b = pd.Series([2.0, 1.0, 0.0], index=["z", "y", "x"])
    result = win_rate(a, b, n_bootstrap=10)
    assert result["win_rate"] == pytest.approx(1 / 3)
    assert (result["n_wins"], result["n_losses"], result["n_ties"]) == (1, 2, 0)


def test_series_with_different_labels_are_refused():
    a = pd.Series([1.0, 2.0], index=["x", "y"])
    b = pd.Series([1.0, 2.0], index=["x", "w"])
    with pytest.raises(ValueError, match=r"indexes of 'scores_a' and 'scores_b' differ.*'w'"):
        win_rate(a, b, n_bootstrap=10)
    with pytest.raises(ValueError, match="indexes of 'chosen_rewards' and 'rejected_rewards' differ"):
        preference_accuracy(a, b)


def test_duplicate_labels_are_refused():
    a = pd.Series([1.0, 2.0], index=["x", "x"])
    with pytest.raises(ValueError, match="duplicate labels"):
        win_rate(a, pd.Series([1.0, 2.0], index=["x", "y"]), n_bootstrap=10)


def test_length_controlled_aligns_all_four_series():
    """The same values given in another label order give the same length-controlled result."""
    rng = np.random.default_rng(0)
    index = [f"p{i}" for i in range(40)]
    a, b = pd.Series(rng.normal(size=40), index), pd.Series(rng.normal(size=40), index)
    la, lb = pd.Series(rng.integers(5, 30, 40).astype(float), index), pd.Series(rng.integers(5, 30, 40).astype(float),
                                                                               index)
    order = index[::-1]
    same = length_controlled_win_rate(a, b, la, lb, n_bootstrap=20)
    shuffled = length_controlled_win_rate(a, b[order], la, lb[order], n_bootstrap=20)
    assert shuffled["win_rate"] == pytest.approx(same["win_rate"])


@pytest.mark.parametrize("scores, row", [([1.0, "n/a", 2.0], 1), (["high", 1.0], 0), ([1.0, None], 1)])
def test_non_numeric_score_names_its_row_and_field(scores, row):
    with pytest.raises(ValueError, match=rf"row {row}, field 'scores_b': .* is not a (finite )?number"):
        win_rate([0.0] * len(scores), scores, n_bootstrap=10, source="judge.jsonl")
