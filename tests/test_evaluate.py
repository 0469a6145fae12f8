"""Win rates (hand-derived values and intervals), judges, length control, held-out preference accuracy."""

import warnings

import numpy as np
import pytest
import torch

from dpolab.evaluate import (
    bradley_terry,
    implicit_preference_accuracy,
    implicit_reward_win_rate,
    judge_win_rate,
    length_controlled_win_rate,
    outcomes,
    preference_accuracy,
    summarise_preferences,
    wilson_interval,
    win_rate,
)


def test_win_rate_with_ties_hand_computed():
    """Outcomes [1, 1, ½, 0]: win rate 2.5/4 = 0.625. Deviations 0.375, 0.375, −0.125, −0.625; squares sum to
    0.6875; sample variance 0.6875/3 = 0.229167; standard error √(0.229167/4) = 0.239357."""
    result = win_rate([3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 2.0])
    assert result["win_rate"] == 0.625
    assert result["standard_error"] == pytest.approx(0.239357, abs=1e-6)
    assert (result["n_wins"], result["n_losses"], result["n_ties"], result["n"]) == (2, 1, 1, 4)


def test_win_rate_bootstrap_interval_hand_derived():
    """9 wins, 1 loss: win rate 0.9, sample variance (9·0.1² + 0.9²)/9 = 0.1, standard error √(0.1/10) = 0.1.
    A resample's loss count L ~ Binomial(10, 0.1): P(L ≥ 4) = 0.0128 < 0.025 ≤ P(L ≥ 3) = 0.0702, so the
    2.5% quantile of 1 − L/10 is 0.7; P(L = 0) = 0.349 > 0.025, so the 97.5% quantile is 1.0. With 2,000
    resamples about 26 ± 5 fall at or below 0.6, far from the 50 that would move the empirical quantile."""
    result = win_rate([1.0] * 9 + [0.0], [0.5] * 10, n_bootstrap=2000, seed=0)
    assert result["win_rate"] == 0.9 and result["standard_error"] == pytest.approx(0.1)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(0.7), 1.0)
    assert win_rate([1.0] * 9 + [0.0], [0.5] * 10, n_bootstrap=2000, seed=0) == result  # reproducible


def test_tie_tolerance_and_mirror():
    result = win_rate([0.50, 0.52, 0.9], [0.51, 0.50, 0.1], tie_tolerance=0.05)
    assert (result["n_wins"], result["n_ties"], result["win_rate"]) == (1, 2, pytest.approx(2 / 3))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    forward, backward = win_rate(a, b), win_rate(b, a)
    assert forward["win_rate"] == pytest.approx(1 - backward["win_rate"])
    assert (forward["n_wins"], forward["standard_error"]) == (backward["n_losses"], backward["standard_error"])


def test_pointwise_judge_equals_win_rate_on_its_scores():
    """Judge = text length. Alone: lengths 11 vs 5, 1 vs 3, 10 vs 3, 2 vs 2 → win, loss, win, tie = 2.5/4.
    With the prompt prepended ("p1" … "p4", 2 characters each) the differences, hence the verdicts, stay."""
    prompts = ["p1", "p2", "p3", "p4"]
    a, b = ["long answer", "x", "yes indeed", "ok"], ["short", "xyz", "yes", "ok"]
    result = judge_win_rate(lambda texts: [len(t) for t in texts], prompts, a, b)
    assert result == win_rate([len(r) for r in a], [len(r) for r in b])
    assert result["win_rate"] == pytest.approx((2 + 0.5) / 4)
    seen = []
    judge_win_rate(lambda texts: seen.extend(texts) or [0.0] * len(texts), prompts, a, b, prepend_prompt=True)
    assert seen[:2] == ["p1long answer", "p2x"] and seen[4:6] == ["p1short", "p2xyz"]


def test_pairwise_judge_order_is_randomised():
    """A judge that always prefers the first response it sees: with the order drawn per prompt, A wins
    exactly on the prompts where it was shown first, so win rate = n_a_first / n, and the judge's first-
    position rate is 1. A fair pairwise judge (longer wins) gives the same answer under every seed."""
    prompts, a, b = [f"p{i}" for i in range(40)], ["aaaa"] * 40, ["bb"] * 40
    biased = judge_win_rate(lambda p, first, second: 1.0, prompts, a, b, pairwise=True, seed=3)
    assert biased["win_rate"] == biased["n_a_first"] / 40 and 0 < biased["n_a_first"] < 40
    assert biased["first_position_rate"] == 1.0
    for seed in range(3):
        fair = judge_win_rate(lambda p, first, second: float(len(first) > len(second)), prompts, a, b,
                              pairwise=True, seed=seed)
        assert fair["win_rate"] == 1.0 and fair["n_wins"] == 40


def test_implicit_reward_win_rate_takes_tensors():
    rewards_a = torch.tensor([0.5, -0.25, 0.25], requires_grad=True)
    rewards_b = torch.tensor([0.25, 0.0, 0.25], dtype=torch.bfloat16)  # exact in bf16: the third pair ties
    result = implicit_reward_win_rate(rewards_a, rewards_b)
    assert (result["n_wins"], result["n_losses"], result["n_ties"]) == (1, 1, 1)


def test_length_controlled_win_rate_hand_derived():
    """A is 20 tokens longer on 16 prompts (wins 12, p = ¾) and 20 shorter on 4 (wins 1, p = ¼): raw win rate
    13/20 = 0.65. Δ = ±20 with mean 12, sd √(400 − 144) = 16, so z = ±1.25. Two z values make the logistic
    model saturated: θ₀ ± 1.25·θ₁ = ±ln 3, so θ₀ = 0 and θ₁ = ln 3 / 1.25 = 0.8789; LC = σ(0) = 0.5.
    The 0.15 gap exceeds the 0.10 threshold, so it warns."""
    a = [1.0] * 12 + [0.0] * 4 + [1.0] + [0.0] * 3
    len_a, len_b = [60] * 16 + [40] * 4, [40] * 16 + [60] * 4
    with pytest.warns(UserWarning, match="length-controlled win rate 0.500 differs from the raw win rate 0.650"):
        result = length_controlled_win_rate(a, [0.5] * 20, len_a, len_b, l2=0, n_bootstrap=50)
    assert result["win_rate"] == pytest.approx(0.65) and result["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert result["length_coefficient"] == pytest.approx(np.log(3) / 1.25, abs=1e-9)
    assert result["length_difference_sd"] == 16.0
    with pytest.warns(UserWarning):  # the default weak ridge moves the estimate by far less than 0.001
        ridge = length_controlled_win_rate(a, [0.5] * 20, len_a, len_b, n_bootstrap=200)
    assert ridge["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert ridge["lc_ci_low"] < 0.5 < ridge["lc_ci_high"]


def test_length_controlled_equals_raw_without_length_effect():
    """A wins 7 of 10 both where it is longer and where it is shorter: θ₁ = 0 and LC = raw = 0.7; no warning.
    Equal lengths everywhere: nothing to control, LC = raw. A constant non-zero difference: NaN and a warning."""
    a = ([1.0] * 7 + [0.0] * 3) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = length_controlled_win_rate(a, [0.5] * 20, [50] * 10 + [30] * 10, [30] * 10 + [50] * 10, l2=0)
        same = length_controlled_win_rate(a, [0.5] * 20, [10] * 20, [10] * 20)
    assert result["lc_win_rate"] == pytest.approx(0.7, abs=1e-9)
    assert result["length_coefficient"] == pytest.approx(0.0, abs=1e-9)
    assert same["lc_win_rate"] == same["win_rate"] == 0.7
    with pytest.warns(UserWarning, match="cannot be separated"):
        assert np.isnan(length_controlled_win_rate(a, [0.5] * 20, [12] * 20, [10] * 20)["lc_win_rate"])


def test_wilson_interval_hand_computed():
    """8 of 10, z = 1.959964, z² = 3.841459: centre (0.8 + z²/20)/(1 + z²/10) = 0.992073/1.384146 = 0.716740;
    half-width z·√(0.8·0.2/10 + z²/400)/1.384146 = 1.959964·√0.0256036/1.384146 = 0.226578, so
    [0.490162, 0.943318] (the textbook Wilson interval for 8/10, 0.4902 to 0.9433)."""
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    result = preference_accuracy([1.0] * 8 + [0.0] * 2, [0.5] * 10)
    assert (result["accuracy"], result["n_correct"]) == (0.8, 8)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.490162, 0.943318), abs=1e-6)


def test_implicit_preference_accuracy_with_and_without_reference():
    """Pair 1: the policy gives chosen −12 and rejected −10 (reference-free: wrong); the reference gave −15 and
    −9, so the implicit rewards are +3β and −1β (with reference: right). Pair 2: right both ways. Pair 3: the
    policy equals the reference (rewards 0 and 0) and its log-probs tie: ½ both ways."""
    policy_c, policy_r = torch.tensor([-12.0, -5.0, -7.0]), torch.tensor([-10.0, -9.0, -7.0])
    ref_c, ref_r = torch.tensor([-15.0, -6.0, -7.0]), torch.tensor([-9.0, -8.0, -7.0])
    result = implicit_preference_accuracy(policy_c, policy_r, ref_c, ref_r)
    assert result["with_reference"]["accuracy"] == pytest.approx(2.5 / 3)
    assert result["without_reference"]["accuracy"] == pytest.approx(1.5 / 3)
    assert result["with_reference"]["n_ties"] == 1
    assert set(implicit_preference_accuracy(policy_c, policy_r)) == {"without_reference"}


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"scores, row 2, field 'scores_b': nan is not a finite number"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match=r"judge, row 1, field 'scores_a': nan is not a finite number"):
        judge_win_rate(lambda texts: [1.0, np.nan] if texts[0] == "a" else [0.0, 0.0], ["p", "q"], ["a", "b"],
                       ["c", "d"])
    with pytest.raises(ValueError, match=r"judge, row 0, field 'preference': nan is not a finite number"):
        judge_win_rate(lambda p, x, y: None, ["p"], ["a"], ["b"], pairwise=True)
    with pytest.raises(ValueError, match=r"mismatched lengths \{'scores_a': 3, 'scores_b': 2\}"):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"mismatched lengths .*'lengths_a': 2"):
        length_controlled_win_rate([1, 2, 3], [1, 2, 3], [5, 6], [5, 6, 7])
    with pytest.raises(ValueError, match="no prompts"):
        win_rate([], [])
    with pytest.raises(ValueError, match=r"row 0, field 'preference': 1.5 is outside \[0, 1\]"):
        summarise_preferences([1.5, 0.0])
    with pytest.raises(ValueError, match="give both ref_chosen_logps and ref_rejected_logps"):
        implicit_preference_accuracy([0.0], [0.0], [0.0], None)


def test_bradley_terry_is_exported_here():
    table = bradley_terry([{"model_a": "x", "model_b": "y", "outcome": o} for o in (1, 1, 1, 0)], n_bootstrap=100)
    assert list(table.columns[:5]) == ["model", "rating", "ci_low", "ci_high", "n"]


def test_outcomes_win_tie_loss():
    """Differences 1, 0.05, 0, −0.05, −1 with tolerance 0.1: win, tie, tie, tie, loss; with tolerance 0 the small
    differences decide."""
    a, b = np.array([1.0, 0.05, 0.0, -0.05, -1.0]), np.zeros(5)
    assert outcomes(a, b, 0.1).tolist() == [1.0, 0.5, 0.5, 0.5, 0.0]
    assert outcomes(a, b).tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
