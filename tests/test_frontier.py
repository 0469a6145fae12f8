"""Tests of dpolab.evaluate.frontier: envelopes, interpolation, matched-KL comparisons and Best-of-N, numbers by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dpolab.evaluate.frontier import (
    best_of_n_curve,
    best_of_n_kl,
    compare_all,
    expected_best_of_n,
    frontier_points,
    interpolate_frontier,
    matched_kl_comparison,
    upper_envelope,
)


def _row(method, knob, kls, rewards, step=0):
    return {"method": method, "knob": knob, "step": step, "prompt_kls": list(kls), "prompt_rewards": list(rewards)}


def _hand_rows():
    """Method A's points (0, 0) and (2, 1); method B's (1, 0) and (3, 0.5); two prefixes each.

    Means over the two prefixes: A: kl (0+0)/2 = 0, reward (-1+1)/2 = 0; kl (1+3)/2 = 2, reward (0.5+1.5)/2 = 1.
    B: kl (0.5+1.5)/2 = 1, reward 0; kl (3+3)/2 = 3, reward (0.25+0.75)/2 = 0.5.
    """
    return [_row("A", 1.0, [0, 0], [-1, 1]), _row("A", 0.1, [1, 3], [0.5, 1.5]),
            _row("B", 1.0, [0.5, 1.5], [0, 0]), _row("B", 0.1, [3, 3], [0.25, 0.75])]


def test_upper_envelope_hand_made_points():
    """Points 0 (0, 0), 1 (1, .5), 2 (1, .3), 3 (2, .4), 4 (3, 1), 5 (2.5, 1), 6 (.5, .5), 7 = 0 repeated.

    6 dominates 1 (lower KL, same reward), 2 (lower KL, higher reward) and 3; 5 dominates 4 (lower KL, same
    reward); 7 duplicates 0 and collapses into it. Left: 0, 6, 5 in KL order.
    """
    kls = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 2.5, 0.5, 0.0])
    rewards = np.array([0.0, 0.5, 0.3, 0.4, 1.0, 1.0, 0.5, 0.0])
    assert upper_envelope(kls, rewards).tolist() == [0, 6, 5]
    assert upper_envelope(np.array([1.0]), np.array([2.0])).tolist() == [0]


def test_upper_envelope_keeps_every_point_of_an_increasing_curve():
    """Rewards rising with KL: nothing dominates anything, all points stay, sorted by KL."""
    assert upper_envelope(np.array([2.0, 0.0, 1.0]), np.array([3.0, 1.0, 2.0])).tolist() == [1, 2, 0]


def test_interpolate_frontier_hand_values():
    """Frontier (0, 0), (.5, .5), (2.5, 1): at 0.25 → .25; at 1.5 → .5 + (1.5 − .5)·(1 − .5)/(2.5 − .5) = .75.

    Outside [0, 2.5] → NaN; the end points are inside.
    """
    grid = np.array([-0.1, 0.0, 0.25, 0.5, 1.5, 2.5, 3.0])
    got = interpolate_frontier(np.array([0.0, 0.5, 2.5]), np.array([0.0, 0.5, 1.0]), grid)
    np.testing.assert_allclose(got, [np.nan, 0.0, 0.25, 0.5, 0.75, 1.0, np.nan])
    single = interpolate_frontier(np.array([1.0]), np.array([0.3]), np.array([0.5, 1.0, 1.5]))
    np.testing.assert_allclose(single, [np.nan, 0.3, np.nan])
    with pytest.raises(ValueError, match="ascending"):
        interpolate_frontier(np.array([1.0, 0.0]), np.array([0.0, 1.0]), grid)


def test_frontier_points_means_and_frontier():
    """Means as in :func:`_hand_rows`; a third A point (kl 3, reward 0.5) is dominated by (2, 1)."""
    rows = _hand_rows() + [_row("A", 0.01, [2, 4], [0, 1], step=7)]
    points = frontier_points(rows)
    assert list(points) == ["A", "B"]
    np.testing.assert_allclose(points["A"]["kl"], [0, 2, 3])
    np.testing.assert_allclose(points["A"]["reward"], [0, 1, 0.5])
    assert points["A"]["step"].tolist() == [0, 0, 7]
    assert points["A"]["knob"].tolist() == [1.0, 0.1, 0.01]
    assert points["A"]["frontier"].tolist() == [0, 1]
    np.testing.assert_allclose(points["A"]["frontier_kl"], [0, 2])
    np.testing.assert_allclose(points["B"]["frontier_reward"], [0, 0.5])


def test_matched_kl_hand_example():
    """Common range [max(0, 1), min(2, 3)] = [1, 2]. There A(kl) = kl/2 and B(kl) = (kl − 1)·0.5/2, so the gap is
    kl/2 − (kl − 1)/4 = kl/4 + 1/4, linear: its mean over an even grid on [1, 2] is its value at 1.5, 0.625.
    With 3 grid points: gaps 0.5, 0.625, 0.75, mean 0.625.
    """
    for n_grid in (3, 50):
        got = matched_kl_comparison(_hand_rows(), "A", "B", n_grid=n_grid, n_boot=0)
        assert (got["kl_low"], got["kl_high"]) == (1.0, 2.0)
        assert got["reward_diff"] == pytest.approx(0.625, abs=1e-12)
        assert got["note"] == "" and got["n_prompts"] == 2 and got["n_boot"] == 0
        assert math.isnan(got["ci_low"]) and math.isnan(got["dominance_share"])
    assert matched_kl_comparison(_hand_rows(), "B", "A", n_boot=0)["reward_diff"] == pytest.approx(-0.625)


def test_matched_kl_hand_example_bootstrap_by_hand():
    """Two prefixes: a resample is {0, 1} (the point estimate, 0.625; drawn half the time), {0, 0} or {1, 1}
    (a quarter each), so the 2.5% and 97.5% percentiles are the two extreme resamples' gaps.

    {0, 0}: A (0, −1), (1, 0.5); B (0.5, 0), (3, 0.25). A covers only grid point 1 of [1, 2]: A(1) = 0.5,
    B(1) = 0.25·(1 − 0.5)/2.5 = 0.05, gap 0.45.
    {1, 1}: A (0, 1), (3, 1.5); B (1.5, 0), (3, 0.75). B covers only the grid points in [1.5, 2]: the 50-point
    grid's 1 + k/49 for k = 25..49, mean KL 1 + 37/49. Gap 1 + kl/6 − (kl − 1.5)/2 = 1.75 − kl/3, linear, so the
    replicate's mean gap is 1.75 − (1 + 37/49)/3 ≈ 1.16497 (the uncovered points are dropped, not zero).
    """
    got = matched_kl_comparison(_hand_rows(), "A", "B", n_boot=400, seed=1)
    assert got["ci_low"] == pytest.approx(0.45, abs=1e-12)
    assert got["ci_high"] == pytest.approx(1.75 - (1 + 37 / 49) / 3, abs=1e-12)
    assert got["reward_diff"] == pytest.approx(0.625, abs=1e-12)


@pytest.mark.parametrize(("rows_b", "why"), [
    ([_row("B", 1.0, [2, 2], [0, 0]), _row("B", 0.1, [3, 3], [1, 1])], "touching: A [0, 2], B [2, 3], overlap [2, 2] of zero width"),
    ([_row("B", 1.0, [3, 3], [0, 0]), _row("B", 0.1, [4, 4], [1, 1])], "disjoint: A [0, 2], B [3, 4]"),
    ([_row("B", 1.0, [1, 1], [0, 0])], "B a single point at KL 1 inside A's range: zero width"),
])
def test_no_common_range_gives_note_and_nans(rows_b, why):
    """A's frontier covers [0, 2] (the hand rows); each B overlaps it in nothing or in zero width."""
    rows = _hand_rows()[:2] + rows_b
    got = matched_kl_comparison(rows, "A", "B", n_boot=50)
    assert got["note"] == "no common KL range", why
    for key in ("kl_low", "kl_high", "reward_diff", "ci_low", "ci_high", "dominance_share", "dominance_share_b"):
        assert math.isnan(got[key]), key
    assert (got["method_a"], got["method_b"], got["n_prompts"], got["n_boot"]) == ("A", "B", 2, 50)


def test_same_single_kl_is_a_common_range():
    """Both methods one point at KL 0.5: the range is [0.5, 0.5] and the gap 0.75 − 0.25 = 0.5."""
    rows = [_row("A", 1, [0.5, 0.5], [0.5, 1.0]), _row("B", 1, [0.5, 0.5], [0.0, 0.5])]
    got = matched_kl_comparison(rows, "A", "B", n_boot=0)
    assert got["note"] == "" and (got["kl_low"], got["kl_high"]) == (0.5, 0.5)
    assert got["reward_diff"] == pytest.approx(0.5)


def _noisy_rows(rng, n_prompts, method, shift=0.0, kls=None):
    """Four points at KL j + noise and reward j + shift + noise (|noise| ≤ 0.2): steps of 1 keep every mean's
    order in any resample, so every point is on the frontier in every bootstrap replicate."""
    kls = rng.uniform(-0.2, 0.2, (4, n_prompts)) + np.arange(4)[:, None] if kls is None else kls
    rewards = rng.uniform(-0.2, 0.2, (4, n_prompts)) + np.arange(4)[:, None] + shift
    return [_row(method, j, kls[j], rewards[j]) for j in range(4)], kls


def test_bootstrap_without_noise_collapses_to_the_point_estimate():
    """Every prefix identical: every resample has the same means, so ci_low = ci_high = reward_diff."""
    rows = [_row(r["method"], r["knob"], [np.mean(r["prompt_kls"])] * 5, [np.mean(r["prompt_rewards"])] * 5)
            for r in _hand_rows()]
    got = matched_kl_comparison(rows, "A", "B", n_boot=200)
    assert got["ci_low"] == pytest.approx(0.625, abs=1e-12) and got["ci_high"] == pytest.approx(0.625, abs=1e-12)
    assert got["dominance_share"] == 1.0 and got["dominance_share_b"] == 0.0


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_prompts():
    """Tiling the prefixes 4 times keeps every mean (so the point estimate) and the spread of a prefix's values,
    but divides the standard error of each mean by √4 = 2: the interval must be narrower (about half)."""
    rng = np.random.default_rng(3)
    rows_a, _ = _noisy_rows(rng, 40, "A", shift=0.3)
    rows_b, _ = _noisy_rows(rng, 40, "B")
    rows = rows_a + rows_b
    tiled = [r | {"prompt_kls": r["prompt_kls"] * 4, "prompt_rewards": r["prompt_rewards"] * 4} for r in rows]
    small = matched_kl_comparison(rows, "A", "B", n_boot=1000, seed=0)
    large = matched_kl_comparison(tiled, "A", "B", n_boot=1000, seed=0)
    assert large["n_prompts"] == 160
    assert large["reward_diff"] == pytest.approx(small["reward_diff"], abs=1e-12)
    for got in (small, large):
        assert got["ci_low"] < got["reward_diff"] < got["ci_high"]
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]


def test_dominance_share_for_a_constant_shift():
    """A's rewards are B's plus 5 ± 0.1 at the same per-prefix KLs: in every replicate both frontiers hold all four
    points at the same KLs, so every gap on the grid lies in [4.9, 5.1] and every pointwise interval is above 0."""
    rng = np.random.default_rng(0)
    rows_b, kls = _noisy_rows(rng, 30, "B")
    rows_a = [r | {"method": "A", "prompt_rewards": list(np.array(r["prompt_rewards"]) + 5
                                                        + rng.uniform(-0.1, 0.1, 30))} for r in rows_b]
    got = matched_kl_comparison(rows_a + rows_b, "A", "B", n_boot=300)
    assert got["dominance_share"] == 1.0 and got["dominance_share_b"] == 0.0
    assert 4.9 <= got["ci_low"] <= got["reward_diff"] <= got["ci_high"] <= 5.1
    back = matched_kl_comparison(rows_a + rows_b, "B", "A", n_boot=300)
    assert back["dominance_share"] == 0.0 and back["dominance_share_b"] == 1.0


def test_dominance_share_by_hand_on_part_of_the_range():
    """Two prefixes, constant KLs 0 and 1. Gaps A − B per prefix: at KL 0, −1 and 1; at KL 1, 1 and 3. A resample
    is {0, 0}, {0, 1} or {1, 1} (¼, ½, ¼), so its gap line is 2·kl − 1, 2·kl or 2·kl + 1 and the pointwise
    interval is [2·kl − 1, 2·kl + 1]. On the grid 0, .25, .5, .75, 1 the lower ends −1, −.5, 0, .5, 1 are above 0
    at 2 of 5 points (0 is not above 0) and no upper end is below 0. Mean gap: 2·0.5 = 1, interval [0, 2].
    """
    rows = [_row("B", 1, [0, 0], [0, 0]), _row("B", 0, [1, 1], [5, 5]),
            _row("A", 1, [0, 0], [-1, 1]), _row("A", 0, [1, 1], [6, 8])]
    got = matched_kl_comparison(rows, "A", "B", n_grid=5, n_boot=400)
    assert got["dominance_share"] == pytest.approx(0.4) and got["dominance_share_b"] == 0.0
    assert (got["reward_diff"], got["ci_low"], got["ci_high"]) == pytest.approx((1.0, 0.0, 2.0), abs=1e-12)
    back = matched_kl_comparison(rows, "B", "A", n_grid=5, n_boot=400)
    assert back["dominance_share"] == 0.0 and back["dominance_share_b"] == pytest.approx(0.4)


def test_a_method_against_itself_has_no_gap():
    """Identical frontiers in every replicate: gap 0, interval [0, 0], neither dominates (0 is not above 0)."""
    rows_a, _ = _noisy_rows(np.random.default_rng(1), 20, "A")
    rows = rows_a + [r | {"method": "B"} for r in rows_a]
    got = matched_kl_comparison(rows, "A", "B", n_boot=100)
    assert (got["reward_diff"], got["ci_low"], got["ci_high"]) == (0.0, 0.0, 0.0)
    assert got["dominance_share"] == 0.0 and got["dominance_share_b"] == 0.0


def test_compare_all_pairs_dpo_first():
    rows = [_row(m, 1, [k, k], [k, k]) for m in ("RLOO", "DPO", "Best of N") for k in (0.0, 1.0)]
    pairs = [(c["method_a"], c["method_b"]) for c in compare_all(rows, n_boot=0)]
    assert pairs == [("DPO", "RLOO"), ("DPO", "Best of N"), ("RLOO", "Best of N")]
    pairs = [(c["method_a"], c["method_b"]) for c in compare_all(rows, ["Best of N", "DPO"], n_boot=0)]
    assert pairs == [("Best of N", "DPO")]


def test_bad_rows_are_named():
    rows = _hand_rows()
    rows[2] = rows[2] | {"prompt_kls": [0.5]}
    with pytest.raises(ValueError, match="row 2 .*'prompt_kls'"):
        frontier_points(rows)
    with pytest.raises(ValueError, match="no rows of method 'C'"):
        matched_kl_comparison(_hand_rows(), "A", "C")
    with pytest.raises(ValueError, match="both 'A'"):
        matched_kl_comparison(_hand_rows(), "A", "A")


def test_best_of_n_kl_values():
    """log N − (N − 1)/N: N = 1 → 0; N = 2 → log 2 − 1/2 ≈ 0.1931; N = 4 → log 4 − 3/4 ≈ 0.6363."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(4) == pytest.approx(0.6362943611198906)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


@pytest.mark.parametrize("m", [1, 4, 6])
def test_expected_best_of_n_matches_enumeration(m):
    """The weighted order statistics equal the mean of the maximum over all C(M, N) subsets (ties included)."""
    rewards = np.round(np.random.default_rng(m).normal(size=(3, m)), 1)  # rounding makes ties likely
    for n in range(1, m + 1):
        brute = [np.mean([max(s) for s in itertools.combinations(row, n)]) for row in rewards]
        np.testing.assert_allclose(expected_best_of_n(rewards, n), brute, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        expected_best_of_n(rewards, m + 1)


def test_best_of_n_curve_hand_values():
    """Rewards [[.1, .9, .5], [.3, .2, .8]]. First N: N=1 → [.1, .3], N=2 → [.9, .3], N=3 → [.9, .8].
    Unbiased N=2 (M=3): weights of the sorted rewards C(i−1, 1)/C(3, 2) = 0, 1/3, 2/3, so row 0 (sorted .1, .5, .9)
    → (.5 + 2·.9)/3 = 2.3/3 and row 1 (.2, .3, .8) → (.3 + 1.6)/3 = 1.9/3; N=1 is the mean, N=3 the maximum."""
    rewards = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    first = best_of_n_curve(rewards, [1, 2, 3], estimator="first")
    np.testing.assert_allclose([r["prompt_rewards"] for r in first], [[0.1, 0.3], [0.9, 0.3], [0.9, 0.8]])
    unbiased = best_of_n_curve(rewards, [1, 2, 3])
    np.testing.assert_allclose([r["prompt_rewards"] for r in unbiased],
                               [[0.5, 1.3 / 3], [2.3 / 3, 1.9 / 3], [0.9, 0.8]])
    for row, n in zip(unbiased, [1, 2, 3], strict=True):
        assert (row["method"], row["knob"], row["step"]) == ("Best of N", float(n), 0)
        assert row["prompt_kls"] == [best_of_n_kl(n)] * 2
    with pytest.raises(ValueError):
        best_of_n_curve(rewards, [4])
    with pytest.raises(ValueError):
        best_of_n_curve(rewards, [2], estimator="last")


def test_constant_kl_rows_keep_their_exact_kl():
    """Best-of-3's KL repeated over 3 prefixes: a plain mean rounds it by an ulp (sum/3 ≠ value); the frontier
    must keep it exactly, or the bootstrap's grid end point would be randomly uncovered."""
    rows = best_of_n_curve(np.random.default_rng(0).normal(size=(3, 4)), [1, 3])
    assert np.mean(rows[1]["prompt_kls"]) != best_of_n_kl(3)  # the rounding this guards against
    assert frontier_points(rows)["Best of N"]["kl"].tolist() == [0.0, best_of_n_kl(3)]


def _seeded(rows, seed):
    return [{**r, "train_seed": seed} for r in rows]


def test_one_seed_per_method_is_the_plain_comparison():
    """Rows that all carry the same ``train_seed`` (or none) give the numbers of the seedless comparison, and both
    intervals (prefixes alone; prefixes and seeds) are the same interval."""
    rng = np.random.default_rng(3)
    a, kls = _noisy_rows(rng, 8, "A", shift=0.3)
    b, _ = _noisy_rows(rng, 8, "B", kls=kls)
    plain = matched_kl_comparison(a + b, "A", "B", n_boot=200)
    tagged = matched_kl_comparison(_seeded(a, 0) + _seeded(b, 5), "A", "B", n_boot=200)
    for key in ("kl_low", "kl_high", "reward_diff", "ci_low", "ci_high", "dominance_share", "dominance_share_b"):
        assert tagged[key] == plain[key], key
    assert (tagged["ci_low"], tagged["ci_high"]) == (tagged["ci_low_prefixes"], tagged["ci_high_prefixes"])
    assert (tagged["n_seeds_a"], tagged["n_seeds_b"]) == (1, 1)
    assert tagged["seed_diffs_a"] == [pytest.approx(tagged["reward_diff"])]


def test_two_identical_seeds_change_nothing():
    """A trained twice with the same outcome: the mean frontier is that frontier, and resampling the seeds cannot
    move any replicate, so the interval over prefixes and seeds is the prefixes' interval."""
    rng = np.random.default_rng(4)
    a, kls = _noisy_rows(rng, 6, "A", shift=0.2)
    b, _ = _noisy_rows(rng, 6, "B", kls=kls)
    once = matched_kl_comparison(a + b, "A", "B", n_boot=200)
    twice = matched_kl_comparison(_seeded(a, 0) + _seeded(a, 1) + b, "A", "B", n_boot=200)
    assert twice["n_seeds_a"] == 2 and twice["reward_diff"] == pytest.approx(once["reward_diff"], abs=1e-12)
    assert twice["ci_low"] == pytest.approx(once["ci_low"], abs=1e-12)
    assert twice["ci_high"] == pytest.approx(once["ci_high"], abs=1e-12)
    assert twice["ci_low_prefixes"] == pytest.approx(once["ci_low"], abs=1e-12)


def test_seeds_by_hand_mean_frontier_and_seed_interval():
    """No prefix noise (both prefixes equal), B: (0, 0) → (2, 1); A seed 1 is B + 0.1, A seed 2 is B + 0.3.

    A's frontier is the mean of its seeds' frontiers, B + 0.2, so the gap is 0.2 everywhere on [0, 2]; each seed's
    own gap is 0.1 and 0.3. The prefixes alone cannot move anything: their interval is [0.2, 0.2]. Resampling two
    seeds with replacement gives the mean of (1, 1), (1, 2), (2, 1) or (2, 2): 0.1, 0.2, 0.2, 0.3 with
    probabilities 1/4 each, so the 95% interval over 2,000 replicates is [0.1, 0.3]. Pooling the seeds into one
    envelope would have read seed 2 alone (+0.3)."""
    b = [_row("B", 1, [0, 0], [0, 0]), _row("B", 0.1, [2, 2], [1, 1])]
    a = [_row("A", 1, [0, 0], [0.1, 0.1], step=0), _row("A", 1, [2, 2], [1.1, 1.1], step=1)]
    a = _seeded(a, 1) + [{**r, "train_seed": 2, "prompt_rewards": [v + 0.2 for v in r["prompt_rewards"]]} for r in a]
    got = matched_kl_comparison(a + b, "A", "B", n_boot=2000)
    assert (got["kl_low"], got["kl_high"]) == (0.0, 2.0)
    assert got["reward_diff"] == pytest.approx(0.2)
    assert got["seed_diffs_a"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert got["seed_diffs_b"] == [pytest.approx(0.2)]
    assert (got["ci_low_prefixes"], got["ci_high_prefixes"]) == (pytest.approx(0.2), pytest.approx(0.2))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(0.1), pytest.approx(0.3))
    assert got["dominance_share"] == 1.0 and got["dominance_share_b"] == 0.0


def test_seeds_common_range_is_what_every_seed_covers():
    """A seed 1 covers KL [0, 2], seed 2 only [0, 1]; B covers [0, 3]: the comparison runs over [0, 1].

    On [0, 1] seed 1 has reward kl/2 and seed 2 reward kl, so A's mean frontier is 0.75·kl; B is 0.5·kl: the gap is
    0.25·kl, whose mean over [0, 1] is 0.125."""
    a = [_row("A", 1, [0, 0], [0, 0], 0), _row("A", 1, [2, 2], [1, 1], 1)]
    a = _seeded(a, 1) + _seeded([_row("A", 1, [0, 0], [0, 0], 0), _row("A", 1, [1, 1], [1, 1], 1)], 2)
    b = [_row("B", 1, [0, 0], [0, 0]), _row("B", 0.1, [3, 3], [1.5, 1.5])]
    got = matched_kl_comparison(a + b, "A", "B", n_boot=0, n_grid=101)
    assert (got["kl_low"], got["kl_high"]) == (0.0, 1.0)
    assert got["reward_diff"] == pytest.approx(0.125)
