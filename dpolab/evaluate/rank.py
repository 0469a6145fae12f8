"""Ranking models from pairwise preferences: Bradley–Terry ratings with bootstrap intervals, Elo, Kendall's τ.

Bradley–Terry (Bradley & Terry, 1952) gives each model a strength; here the coefficient ``β`` is the
*base-10* log-strength, so that

    P(a beats b) = 1 / (1 + 10^(β_b − β_a)),      rating = 400·β + 1000,

which is exactly the Elo convention P(a beats b) = 1 / (1 + 10^((R_b − R_a)/400)): 400 rating points
are a factor of ten in odds, 191 points are 3:1 (p = 0.75). (A natural-log coefficient θ = β·ln 10,
the logistic-regression coefficient Chatbot Arena fits, gives the same ratings as 400·θ/ln 10 + 1000.)
Ratings are only defined up to a common shift, so they are anchored: the anchor model gets exactly
``anchor_rating`` and every interval is an interval for the difference from it. A tie counts as
half a win to each side (target ½ in the likelihood).

The fit is one penalised logistic regression solved by Newton's method, batched over bootstrap
resamples (:func:`dpolab.evaluate.logistic.fit_logistic`); resampling comparisons with replacement is a multinomial draw of
counts over the distinct (pair, outcome) rows, which makes the whole result, intervals included,
independent of the order (and orientation) in which the comparisons arrive.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from dpolab.evaluate.comparisons import as_python, braced, comparison_components, comparison_table, rated_models
from dpolab.evaluate.logistic import fit_logistic

ELO_SCALE = 400.0  # rating points per factor of ten in odds
ELO_BASE = 1000.0


def bradley_terry(comparisons, *, models: Sequence[str] | None = None, anchor: str | None = None,
                  anchor_rating: float = ELO_BASE, n_bootstrap: int = 1000, confidence: float = 0.95,
                  l2: float = 1e-4, seed: int = 0, source: str = "comparisons") -> pd.DataFrame:
    """Bradley–Terry maximum-likelihood ratings on the Elo scale, with bootstrap confidence intervals.

    Args:
        comparisons: a DataFrame or list of records with ``model_a``, ``model_b``, ``outcome`` (1 = a wins,
            0 = b wins, 0.5 = tie; any preference in [0, 1] is accepted), one row per judged comparison.
        models: the models expected to be rated; each must appear in a comparison. Default: those seen.
        anchor: the model pinned at ``anchor_rating`` (default: the first name in alphabetical order).
        anchor_rating: the anchor's rating (the ``+ 1000`` of 400·β + 1000).
        n_bootstrap: resamples of the comparisons (with replacement) for the percentile intervals; 0 skips them.
        confidence: coverage of the intervals.
        l2: ridge on the natural-log coefficients, ½·l2·Σθ². It keeps the fit finite when a model won (or
            lost) every comparison, where the MLE is infinite; at 1e-4 it moves ordinary ratings by far less
            than a rating point. 0 gives the plain MLE (an error when it does not exist).
        seed: seed of the bootstrap.
        source: a name for error messages (e.g. the file the comparisons came from).

    Returns:
        One row per model, best first: ``model``, ``rating``, ``ci_low``, ``ci_high`` (the anchor's interval
        is a point: intervals are for differences from it), ``n`` (comparisons it took part in), ``wins``
        (its summed outcomes, ties ½), ``rank``. ``attrs`` holds ``anchor`` and ``confidence``.
    """
    table = comparison_table(comparisons, source)
    names = rated_models(table, models, source)
    anchor = names[0] if anchor is None else str(anchor)
    if anchor not in names:
        raise ValueError(f"{source}: anchor {anchor!r} is not among the rated models {names}")
    k = len(names)
    a, b = (np.searchsorted(names, table[field].to_numpy(str)) for field in ("model_a", "model_b"))  # names sorted
    y = table["outcome"].to_numpy()
    parts = comparison_components(np.r_[a, b], np.r_[b, a], k, directed=False)
    if len(parts) > 1:
        listed = " | ".join(braced(names, part) for part in parts)
        raise ValueError(f"{source}: the comparison graph is disconnected into {len(parts)} components: {listed}. "
                         "Bradley–Terry ratings are not identifiable across components (nothing links their "
                         "scales); add comparisons between them or rate each component separately")
    # canonical orientation (lower index first) and distinct (pair, outcome) rows: order-free from here on
    flip = a > b
    i, j, y_first = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1.0 - y, y)
    rows, counts = np.unique(np.stack([i, j, y_first], 1), axis=0, return_counts=True)
    ri, rj, ry = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2]
    scored = (counts * ry > 0, counts * (1 - ry) > 0)  # directed edge winner -> loser where any credit flowed
    win_i, win_j = np.r_[ri[scored[0]], rj[scored[1]]], np.r_[rj[scored[0]], ri[scored[1]]]
    groups = comparison_components(win_i, win_j, k, directed=True)
    if len(groups) > 1:  # Zermelo/Ford: the MLE exists iff every group of models beat someone outside it
        label = np.empty(k, int)
        for g, members in enumerate(groups):
            label[members] = g
        cross = label[win_i] != label[win_j]
        lost, beat = set(label[win_j[cross]]), set(label[win_i[cross]])
        verdicts = [f"{braced(names, members)} never {verdict} the other models" for g, members in enumerate(groups)
                    for verdict, seen in (("lost to", lost), ("beat", beat)) if g not in seen]
        message = f"{source}: {'; '.join(verdicts)}, so the maximum-likelihood ratings are infinite"
        if l2 <= 0:
            raise ValueError(message + "; use l2 > 0")
        warnings.warn(message + f"; those ratings are set by the ridge penalty l2={l2}", stacklevel=2)
    design = np.zeros((len(rows), k))
    design[np.arange(len(rows)), ri], design[np.arange(len(rows)), rj] = 1.0, -1.0
    penalty = l2 * np.eye(k) + np.ones((k, k)) / k  # the second term pins mean θ = 0; the likelihood ignores shifts
    weights = counts[None, :].astype(float)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        weights = np.r_[weights, rng.multinomial(counts.sum(), counts / counts.sum(), size=n_bootstrap)]
    theta = fit_logistic(design, ry, weights, penalty)
    ratings = ELO_SCALE / np.log(10.0) * (theta - theta[:, [names.index(anchor)]]) + anchor_rating
    alpha = (1.0 - confidence) / 2
    low, high = (np.quantile(ratings[1:], [alpha, 1 - alpha], axis=0) if n_bootstrap > 0
                 else (np.full(k, np.nan), np.full(k, np.nan)))
    wins = np.bincount(a, y, k) + np.bincount(b, 1.0 - y, k)
    result = pd.DataFrame({"model": names, "rating": ratings[0], "ci_low": low, "ci_high": high,
                           "n": np.bincount(np.r_[a, b], minlength=k), "wins": wins})
    result = result.sort_values(["rating", "model"], ascending=[False, True], kind="stable").reset_index(drop=True)
    result["rank"] = np.arange(1, k + 1)
    result.attrs.update(anchor=anchor, confidence=confidence)
    return result


def online_elo(comparisons, *, k_factor: float = 32.0, initial: float = ELO_BASE, anchor: str | None = None,
               source: str = "comparisons") -> pd.DataFrame:
    """Classic online Elo, one update per comparison in the given order: only a contrast to Bradley–Terry.

    For outcome y: E_a = 1 / (1 + 10^((R_b − R_a)/400)), then R_a += K(y − E_a) and R_b −= K(y − E_a).
    Unlike the Bradley–Terry fit, the result depends on the order of the comparisons and on K.

    Args:
        comparisons: as for :func:`bradley_terry`.
        k_factor: K, the step size.
        initial: every model's starting rating.
        anchor: if given, all ratings are shifted so this model sits at ``initial``.
        source: a name for error messages.

    Returns:
        ``model``, ``rating``, ``n``, best first.
    """
    table = comparison_table(comparisons, source)
    names = rated_models(table, None, source)
    rating, n = dict.fromkeys(names, float(initial)), dict.fromkeys(names, 0)
    for a, b, y in table[["model_a", "model_b", "outcome"]].itertuples(index=False):
        expected = 1.0 / (1.0 + 10.0 ** ((rating[b] - rating[a]) / ELO_SCALE))
        rating[a] += k_factor * (y - expected)
        rating[b] -= k_factor * (y - expected)
        n[a], n[b] = n[a] + 1, n[b] + 1
    if anchor is not None:
        if anchor not in rating:
            raise ValueError(f"{source}: anchor {anchor!r} is not among the rated models {names}")
        shift = initial - rating[anchor]
        rating = {m: r + shift for m, r in rating.items()}
    result = pd.DataFrame({"model": names, "rating": [rating[m] for m in names], "n": [n[m] for m in names]})
    return result.sort_values(["rating", "model"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _as_scores(scores, what: str) -> pd.Series:
    if isinstance(scores, pd.DataFrame):
        if not {"model", "rating"} <= set(scores.columns):
            raise ValueError(f"{what}: a table needs columns 'model' and 'rating', found {list(scores.columns)}")
        scores = pd.Series(scores["rating"].to_numpy(), index=scores["model"].astype(str))
    elif isinstance(scores, Mapping):
        scores = pd.Series(dict(scores))
    elif not isinstance(scores, pd.Series):
        raise TypeError(f"{what}: expected a mapping model -> score, a Series or a table with model and rating")
    values = pd.to_numeric(scores, errors="coerce")
    if values.isna().any():
        raise ValueError(f"{what}, model {values.index[values.isna().to_numpy()][0]!r}: score is not a number")
    return values.astype(float)


def kendall_tau(estimated, truth) -> dict[str, float]:
    """Kendall's τ-b between an estimated ranking and the true one (1 = same order, −1 = reversed).

    Args:
        estimated: model -> score (higher is better), a Series, or a table with ``model`` and ``rating``
            (e.g. the output of :func:`bradley_terry`).
        truth: the same for the ground truth (e.g. mean true reward of each model's samples).

    Returns:
        ``tau``, ``p_value`` (scipy's test of τ = 0), ``n`` models.
    """
    est, true = _as_scores(estimated, "estimated"), _as_scores(truth, "truth")
    if set(est.index) != set(true.index):
        only_est, only_true = sorted(set(est.index) - set(true.index)), sorted(set(true.index) - set(est.index))
        raise ValueError(f"estimated and truth rate different models: only estimated {only_est}, "
                         f"only truth {only_true}")
    if len(est) < 2:
        raise ValueError(f"Kendall's tau needs at least 2 models, got {len(est)}")
    result = kendalltau(est.sort_index().to_numpy(), true.sort_index().to_numpy())
    return {"tau": float(result.statistic), "p_value": float(result.pvalue), "n": len(est)}


@dataclass(frozen=True)
class Selection:
    """The run a sweep selects and how stable that choice is."""

    best: str  # the run with the best mean validation metric
    stability: float  # share of bootstrap resamples of the validation examples in which ``best`` is still best
    table: pd.DataFrame  # run, its parameters, mean, standard_error, n, selected (share of resamples won); best first


def select_best(runs, metric: str, *, mode: str = "max", n_bootstrap: int = 1000, seed: int = 0,
                source: str = "runs") -> Selection:
    """Pick the best run (checkpoint, β, ...) of a sweep by a named validation metric, with its bootstrap stability.

    Args:
        runs: a DataFrame or list of records with a ``run`` column, the ``metric`` column and any parameter
            columns (``beta``, ``step``, ...). Either one row per (run, validation example) with a scalar
            metric, or one row per run whose metric is the list of per-example values. With an ``example``
            column the runs are aligned on it; otherwise per-example values are taken in the same order.
        metric: the column to rank by, e.g. ``"reward"`` or ``"loss"``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        n_bootstrap: resamples of the validation examples (0: none, ``selected`` is NaN). When every run has
            the same examples the resample is paired (the same examples for every run, which is what a shared
            validation set calls for); otherwise each run is resampled on its own.
        seed: seed of the bootstrap.
        source: a name for error messages.

    Returns:
        A :class:`Selection`. A tie for best within a resample goes to the run whose name sorts first.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    table = runs if isinstance(runs, pd.DataFrame) else pd.DataFrame.from_records(list(runs))
    missing = [c for c in ("run", metric) if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(table.columns)}")
    if table[metric].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():  # one row per run: lists
        table = table.explode(metric)
    values = pd.to_numeric(table[metric], errors="coerce")
    if values.isna().any():
        row = np.flatnonzero(values.isna().to_numpy())[0]
        raise ValueError(f"{source}, row {table.index[row]}, field '{metric}': {as_python(table[metric].iloc[row])!r} is "
                         f"not a number (run {table['run'].iloc[row]!r})")
    table = table.assign(**{metric: values.astype(float), "run": table["run"].astype(str)})
    names = sorted(table["run"].unique())
    groups = {name: group for name, group in table.groupby("run", sort=True)}
    if "example" in table.columns:
        examples = {name: sorted(group["example"].tolist()) for name, group in groups.items()}
        paired = all(examples[name] == examples[names[0]] for name in names)
        per_run = [groups[name].sort_values("example", kind="stable")[metric].to_numpy() for name in names]
    else:
        per_run = [groups[name][metric].to_numpy() for name in names]
        paired = len({len(v) for v in per_run}) == 1
    rng = np.random.default_rng(seed)
    if paired:
        n = len(per_run[0])
        draws = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)
        boot = draws @ np.stack(per_run, 1) / n  # (B, runs)
    else:
        boot = np.stack([rng.multinomial(len(v), np.full(len(v), 1.0 / len(v)), size=n_bootstrap) @ v / len(v)
                         for v in per_run], 1)
    sign = 1.0 if mode == "max" else -1.0
    chosen = (np.bincount(np.argmax(sign * boot, axis=1), minlength=len(names)) / n_bootstrap if n_bootstrap > 0
              else np.full(len(names), np.nan))
    params = [c for c in table.columns if c not in ("run", metric, "example")]
    result = pd.DataFrame({"run": names, **{c: [groups[name][c].iloc[0] for name in names] for c in params},
                           "mean": [v.mean() for v in per_run],
                           "standard_error": [v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan
                                              for v in per_run],
                           "n": [len(v) for v in per_run], "selected": chosen})
    result = result.sort_values(["mean", "run"], ascending=[mode == "min", True], kind="stable").reset_index(drop=True)
    best = result["run"].iloc[0]
    return Selection(best=best, stability=float(result["selected"].iloc[0]), table=result)
