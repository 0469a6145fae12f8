"""Ranking: Bradley–Terry (hand-derived, slow reference, recovery, interval coverage), Elo, τ, selection."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.stats import binom

from dpolab.evaluate.logistic import fit_logistic
from dpolab.evaluate.rank import bradley_terry, kendall_tau, online_elo, select_best

ELO_PER_NAT = 400 / np.log(10)  # rating points per unit of natural-log strength


def _table(rows):
    return pd.DataFrame(rows, columns=["model_a", "model_b", "outcome"])


def _simulate(true: dict, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` comparisons of uniformly drawn distinct pairs; a wins with P = 1 / (1 + 10^((R_b − R_a)/400))."""
    names = np.array(list(true))
    ratings = np.array(list(true.values()))
    i = rng.integers(0, len(names), n)
    j = (i + rng.integers(1, len(names), n)) % len(names)
    p = 1 / (1 + 10 ** ((ratings[j] - ratings[i]) / 400))
    return _table({"model_a": names[i], "model_b": names[j], "outcome": (rng.random(n) < p).astype(float)})


def test_two_models_hand_derived():
    """x beats y 3 times of 4: the MLE sets P(x beats y) = 3/4, i.e. 10^((R_x − R_y)/400) = 3, so
    R_x − R_y = 400·log10(3) = 190.849; y is the anchor at 1000. A tie is half a win to each side, so
    one win and one tie (1.5 of 2) gives the same fit."""
    rows = [("x", "y", 1), ("y", "x", 0), ("x", "y", 1), ("x", "y", 0)]
    table = bradley_terry(_table(rows), anchor="y", l2=0, n_bootstrap=0)
    assert table["model"].tolist() == ["x", "y"] and table["rank"].tolist() == [1, 2]
    assert table["rating"].tolist() == pytest.approx([1000 + 400 * np.log10(3), 1000], abs=1e-6)
    assert table["n"].tolist() == [4, 4] and table["wins"].tolist() == [3, 1]
    with_tie = bradley_terry([{"model_a": "x", "model_b": "y", "outcome": o} for o in (1, 0.5)], l2=0, anchor="y",
                             n_bootstrap=0)
    assert with_tie["rating"].tolist() == pytest.approx(table["rating"].tolist(), abs=1e-6)


def test_symmetric_cycle_gives_equal_ratings():
    """a beats b, b beats c, c beats a, each 2 of 3: by symmetry every model has the same strength, so all
    three sit at the anchor's 1000 (the default anchor is the first name alphabetically, a)."""
    rows = [(w, l_, 1) for w, l_ in [("a", "b"), ("b", "c"), ("c", "a")] for _ in range(2)]
    rows += [(w, l_, 0) for w, l_ in [("a", "b"), ("b", "c"), ("c", "a")]]
    table = bradley_terry(_table(rows), l2=0, n_bootstrap=0)
    assert table.attrs["anchor"] == "a"
    np.testing.assert_allclose(table["rating"], 1000, atol=1e-6)


def test_matches_slow_reference_and_anchor_only_shifts():
    """Newton on grouped counts agrees with scipy's BFGS on the per-comparison likelihood (θ_anchor = 0)."""
    true = {"a": 1000, "b": 1100, "c": 950, "d": 1200}
    comparisons = _simulate(true, 400, np.random.default_rng(1))
    table = bradley_terry(comparisons, l2=0, n_bootstrap=0).set_index("model")
    names = sorted(true)
    idx_a = comparisons["model_a"].map(names.index).to_numpy()
    idx_b = comparisons["model_b"].map(names.index).to_numpy()
    y = comparisons["outcome"].to_numpy()

    def nll(free):
        theta = np.r_[0.0, free]
        z = theta[idx_a] - theta[idx_b]
        return np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))

    reference = minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(table.loc[names, "rating"], 1000 + ELO_PER_NAT * np.r_[0, reference], atol=1e-3)
    shifted = bradley_terry(comparisons, l2=0, n_bootstrap=0, anchor="c", anchor_rating=1500).set_index("model")
    np.testing.assert_allclose(shifted.loc[names, "rating"] - shifted.loc["c", "rating"],
                               table.loc[names, "rating"] - table.loc["c", "rating"], atol=1e-6)
    assert shifted.loc["c", "rating"] == pytest.approx(1500)


def test_recovers_known_strengths():
    """3,000 simulated comparisons among 5 models 100 points apart. The MLE is asymptotically normal with
    covariance the inverse Fisher information I = Σ p(1−p)(e_a − e_b)(e_a − e_b)ᵀ (anchor row dropped), so
    each estimate must lie within 4 standard errors of the truth, and the order must be exactly right."""
    true = {"a": 1000, "b": 1200, "c": 900, "d": 1300, "e": 1100}
    comparisons = _simulate(true, 3000, np.random.default_rng(2))
    table = bradley_terry(comparisons, n_bootstrap=0).set_index("model")
    names = sorted(true)
    i, j = comparisons["model_a"].map(names.index), comparisons["model_b"].map(names.index)
    ratings = np.array([true[m] for m in names])
    p = 1 / (1 + 10 ** ((ratings[j] - ratings[i]) / 400))
    x = np.zeros((len(comparisons), len(names)))
    x[np.arange(len(x)), i], x[np.arange(len(x)), j] = 1, -1
    fisher = (x * (p * (1 - p))[:, None]).T @ x
    se = ELO_PER_NAT * np.sqrt(np.diag(np.linalg.inv(fisher[1:, 1:])))
    error = table.loc[names[1:], "rating"].to_numpy() - ratings[1:]
    assert np.all(np.abs(error) < 4 * se), (error, se)
    assert kendall_tau(table.reset_index(), true)["tau"] == pytest.approx(1.0)


def test_bootstrap_intervals_cover_truth_at_nominal_rate():
    """200 independent simulations (4 models, 200 comparisons, 200 resamples each). Each contributes one
    indicator (the models b, c, d in turn) of whether the 95% interval holds the true rating, so a nominal
    interval makes the count Binomial(200, 0.95); its central 99.9% range is [179, 198] (computed below)."""
    true = {"a": 1000, "b": 1100, "c": 950, "d": 1200}
    sims = 200
    covered = 0
    for s in range(sims):
        table = bradley_terry(_simulate(true, 200, np.random.default_rng(100 + s)), n_bootstrap=200,
                              seed=s).set_index("model")
        model = "bcd"[s % 3]
        covered += table.loc[model, "ci_low"] <= true[model] <= table.loc[model, "ci_high"]
    low, high = binom.ppf(0.0005, sims, 0.95), binom.isf(0.0005, sims, 0.95)
    assert (low, high) == (179, 198)
    assert low <= covered <= high, covered


def test_invariant_to_order_and_orientation_of_comparisons():
    """Shuffling the rows and writing some as (b, a, 1 − outcome) changes nothing, intervals included;
    online Elo, by contrast, depends on the order."""
    comparisons = _simulate({"a": 1000, "b": 1100, "c": 950}, 300, np.random.default_rng(3))
    rng = np.random.default_rng(4)
    shuffled = comparisons.sample(frac=1, random_state=5).reset_index(drop=True)
    flip = rng.random(len(shuffled)) < 0.5
    shuffled.loc[flip, ["model_a", "model_b"]] = shuffled.loc[flip, ["model_b", "model_a"]].to_numpy()
    shuffled.loc[flip, "outcome"] = 1 - shuffled.loc[flip, "outcome"]
    pd.testing.assert_frame_equal(bradley_terry(comparisons, n_bootstrap=300),
                                  bradley_terry(shuffled, n_bootstrap=300))
    forward = online_elo(comparisons).set_index("model")["rating"]
    backward = online_elo(comparisons.iloc[::-1]).set_index("model")["rating"]
    assert not np.allclose(forward.sort_index(), backward.sort_index())


def test_online_elo_hand_computed():
    """Equal ratings: E = ½, so a win moves ±K/2 = 16 → 1016 / 984. Second win: E = 1/(1 + 10^(−32/400))
    = 0.545922, a gains 32·(1 − 0.545922) = 14.5305 → 1030.5305 / 969.4695."""
    table = online_elo(_table([("a", "b", 1), ("b", "a", 0)])).set_index("model")
    assert table.loc["a", "rating"] == pytest.approx(1030.5305, abs=1e-4)
    assert table.loc["b", "rating"] == pytest.approx(969.4695, abs=1e-4)
    anchored = online_elo(_table([("a", "b", 1)]), anchor="b").set_index("model")["rating"]
    assert anchored.to_dict() == {"a": 1032, "b": 1000}


def test_fit_logistic_intercept_only_hand_computed():
    """One row x = 1 with target ¾: σ(θ) = ¾ ⇒ θ = ln 3; weights 0 and 4 of a second row (target 0) give
    σ(θ) = ¾ and σ(θ) = 3/7 ⇒ θ = ln(3/4) for the two weightings fitted at once."""
    theta = fit_logistic(np.ones((2, 1)), np.array([0.75, 0.0]), np.array([[4.0, 0.0], [4.0, 3.0]]))
    np.testing.assert_allclose(theta[:, 0], [np.log(3), np.log(3 / 4)], atol=1e-9)


def test_kendall_tau_hand_computed():
    """One adjacent swap among 4 models: 5 concordant and 1 discordant pairs of 6, τ = (5 − 1)/6 = 2/3."""
    truth = {"a": 4, "b": 3, "c": 2, "d": 1}
    assert kendall_tau({"a": 4, "b": 2, "c": 3, "d": 1}, truth)["tau"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"only estimated \['e'\], only truth \[\]"):
        kendall_tau({**truth, "e": 0}, truth)


def test_select_best_paired_bootstrap_hand_derived():
    """Runs A = [1, 0] and B = [0, 3] on the same two examples: mean 0.5 vs 1.5, so B is best by "max".
    A paired resample picks examples (1,1), (1,2), (2,1), (2,2) with probability ¼ each; A − B averages
    1, −1, −1, −3, so A wins only the first: selected ≈ ¼ and ¾. 4,000 resamples: sd √(¼·¾/4000)
    = 0.0068, tolerance 4 sd. With "min", A is best."""
    runs = [{"run": "A", "beta": 0.1, "reward": [1.0, 0.0]}, {"run": "B", "beta": 0.5, "reward": [0.0, 3.0]}]
    selection = select_best(runs, "reward", n_bootstrap=4000)
    assert selection.best == "B" and selection.table["beta"].tolist() == [0.5, 0.1]
    assert selection.stability == pytest.approx(0.75, abs=4 * 0.0068)
    assert selection.table["mean"].tolist() == [1.5, 0.5] and selection.table["n"].tolist() == [2, 2]
    assert select_best(runs, "reward", mode="min", n_bootstrap=100).best == "A"
    long = pd.DataFrame({"run": ["B", "A", "A", "B"], "example": [1, 1, 0, 0], "reward": [3.0, 0.0, 1.0, 0.0]})
    aligned = select_best(long, "reward", n_bootstrap=4000)  # aligned on `example`: the same resamples
    assert aligned.table["selected"].tolist() == selection.table["selected"].tolist()


def test_select_best_dominating_run_is_always_chosen():
    """A run better on every example wins every paired resample: stability exactly 1. Runs on different
    examples are resampled separately; one whose every value beats the other's best also always wins."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    runs = pd.DataFrame({"run": np.repeat(["step100", "step200"], 50), "loss": np.r_[base, base - 0.01]})
    selection = select_best(runs, "loss", mode="min", n_bootstrap=500)
    assert selection.best == "step200" and selection.stability == 1.0
    unequal = [{"run": "A", "reward": [10.0, 10.0, 10.0]}, {"run": "B", "reward": [0.0, 0.0, 0.0, 0.0, 1.0]}]
    assert select_best(unequal, "reward", n_bootstrap=200).stability == 1.0  # resampled apart; B's mean ≤ 1 < 10


def test_bad_input_messages():
    ok = _table([("a", "b", 1), ("b", "c", 0.5), ("c", "a", 0)])
    with pytest.raises(ValueError, match=r"comparisons: model\(s\) \['d'\] have no comparisons"):
        bradley_terry(ok, models=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"row 1, field 'model_b': model 'c' is not among the expected models"):
        bradley_terry(ok, models=["a", "b"])
    disconnected = _table([("a", "b", 1), ("b", "a", 1), ("c", "d", 1), ("d", "c", 0), ("e", "c", 0.5)])
    with pytest.raises(ValueError, match=r"disconnected into 2 components: \{a, b\} \| \{c, d, e\}"):
        bradley_terry(disconnected)
    with pytest.raises(ValueError, match=r"games.jsonl, row 1, field 'outcome': nan is not a number in \[0, 1\]"):
        bradley_terry(_table([("a", "b", 1), ("a", "b", np.nan)]), source="games.jsonl")
    with pytest.raises(ValueError, match=r"row 0, field 'outcome': 2 is not a number"):
        bradley_terry(_table([("a", "b", 2)]))
    with pytest.raises(ValueError, match=r"row 0, field 'model_b': model 'a' compared with itself"):
        bradley_terry(_table([("a", "a", 1)]))
    with pytest.raises(ValueError, match=r"row 1, field 'model_a': missing model name"):
        bradley_terry(_table([("a", "b", 1), ("", "b", 1)]))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['outcome'\]"):
        bradley_terry([{"model_a": "a", "model_b": "b", "winner": "a"}])
    with pytest.raises(ValueError, match=r"anchor 'z' is not among"):
        bradley_terry(ok, anchor="z")
    never_lost = _table([("a", "b", 1), ("a", "b", 1), ("b", "c", 1), ("c", "b", 1)])
    with pytest.raises(ValueError, match=r"\{a\} never lost to the other models; \{b, c\} never beat the other"):
        bradley_terry(never_lost, l2=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = bradley_terry(never_lost, n_bootstrap=0)
    assert "those ratings are set by the ridge penalty" in str(caught[0].message) and table["model"].iloc[0] == "a"
    with pytest.raises(ValueError, match=r"runs, row 1, field 'reward': nan is not a number \(run 'A'\)"):
        select_best(pd.DataFrame({"run": ["A", "A"], "reward": [1.0, np.nan]}), "reward")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['accuracy'\]"):
        select_best(pd.DataFrame({"run": ["A"], "reward": [1.0]}), "accuracy")
