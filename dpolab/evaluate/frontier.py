"""The reward–KL frontier of each method, and methods compared at matched KL (paper §6.1, Fig. 2 left).

An evaluated checkpoint is a row: a dict with ``method`` (``"DPO"``, ``"RLOO"``, ``"Preferred-FT"``,
``"Best of N"``, ...), ``knob`` (β, the KL coefficient or N), ``step``, and per held-out prefix the mean
ground-truth reward ``prompt_rewards`` and the mean sample KL(π‖π_ref) in nats ``prompt_kls`` (P values
each, the same P prefixes in the same order in every row).

A method's frontier is the upper envelope of its (KL, reward) points: the points that no other point of
the method beats on both axes. Two methods are compared by the mean vertical gap between their
piecewise-linear frontiers over the KL range both cover, with a percentile bootstrap over prefixes: a
resample of prefix indices moves every row's mean reward *and* mean KL, and both frontiers are rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NO_COMMON_RANGE = "no common KL range"


def _row_arrays(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prefix rewards and KLs of every row, validated. Shapes: (R, P), (R, P)."""
    if not rows:
        raise ValueError("frontier: no rows")
    n_prompts = len(rows[0]["prompt_rewards"])
    rewards, kls = [], []
    for i, row in enumerate(rows):
        for field, out in (("prompt_rewards", rewards), ("prompt_kls", kls)):
            values = np.asarray(row[field], dtype=np.float64).reshape(-1)
            if len(values) != n_prompts or n_prompts == 0:
                raise ValueError(f"frontier: row {i} ({row.get('method')}), field '{field}': {len(values)} values, "
                                 f"expected {n_prompts} > 0 (one per held-out prefix, as in row 0)")
            if not np.isfinite(values).all():
                raise ValueError(f"frontier: row {i} ({row.get('method')}), field '{field}': non-finite value")
            out.append(values)
    return np.stack(rewards), np.stack(kls)


def _prefix_means(values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Means over prefixes, ``(R, P) -> (R,)``, or per resample with ``counts`` (B, P): ``-> (R, B)``.

    Centred on the first prefix so that a row whose values are all equal (Best-of-N's analytic KL)
    keeps exactly that value in every resample; otherwise rounding would move it by an ulp and the
    frontier's end could fall just short of a grid point it covers.
    """
    centred = values - values[:, :1]
    if counts is None:
        return values[:, 0] + centred.mean(axis=1)
    return values[:, :1] + centred @ counts.T / values.shape[1]


def upper_envelope(kls: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (KL ≤ and reward ≥, one strictly), sorted by KL.

    Exact duplicates collapse to one index, so the envelope is strictly increasing in both KL and reward.

    Args:
        kls: KL of each point. Shape: (K,).
        rewards: reward of each point. Shape: (K,).

    Returns:
        Integer indices into the inputs. Shape: (F,), 1 ≤ F ≤ K.
    """
    kls, rewards = np.asarray(kls, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    order = np.lexsort((-rewards, kls))  # KL ascending, ties by reward descending
    # after this sort, a point survives iff it beats the reward of every point before it
    best_before = np.maximum.accumulate(np.r_[-np.inf, rewards[order][:-1]])
    return order[rewards[order] > best_before]


def interpolate_frontier(kls: np.ndarray, rewards: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Piecewise-linear frontier reward at each grid KL; NaN outside [kls[0], kls[-1]].

    Args:
        kls: the frontier's KLs, ascending. Shape: (F,).
        rewards: the frontier's rewards. Shape: (F,).
        grid: KLs to read the frontier at. Shape: (G,).

    Returns:
        Rewards at the grid. Shape: (G,).
    """
    kls, rewards, grid = (np.asarray(a, dtype=np.float64) for a in (kls, rewards, grid))
    if len(kls) == 0 or np.any(np.diff(kls) < 0):
        raise ValueError("interpolate_frontier: kls must be non-empty and ascending (pass a frontier)")
    values = np.interp(grid, kls, rewards)
    return np.where((grid >= kls[0]) & (grid <= kls[-1]), values, np.nan)


def frontier_points(rows: Sequence[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Per method, the point estimates (means over prefixes) of every row and the method's frontier.

    Args:
        rows: evaluated checkpoints (see the module docstring).

    Returns:
        ``{method: {"kl", "reward", "knob", "step": (K,) arrays over the method's rows in input order,
        "frontier": (F,) indices into them sorted by KL, "frontier_kl", "frontier_reward": (F,)}}``,
        methods in order of first appearance.
    """
    rewards, kls = _row_arrays(rows)
    mean_reward, mean_kl = _prefix_means(rewards), _prefix_means(kls)
    out: dict[str, dict[str, np.ndarray]] = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        idx = np.array([i for i, row in enumerate(rows) if row["method"] == method])
        front = upper_envelope(mean_kl[idx], mean_reward[idx])
        out[method] = {"kl": mean_kl[idx], "reward": mean_reward[idx],
                       "knob": np.array([float(rows[i]["knob"]) for i in idx]),
                       "step": np.array([int(rows[i]["step"]) for i in idx]), "frontier": front,
                       "frontier_kl": mean_kl[idx][front], "frontier_reward": mean_reward[idx][front]}
    return out


def _frontier_on_grid(kl: np.ndarray, reward: np.ndarray, grid: np.ndarray) -> np.ndarray:
    front = upper_envelope(kl, reward)
    return interpolate_frontier(kl[front], reward[front], grid)


def seed_groups(rows: Sequence[dict], method: str) -> list[np.ndarray]:
    """Indices of ``method``'s rows, one array per training seed (``train_seed``; rows without one form one group),
    seeds in order of first appearance."""
    groups: dict = {}
    for i, row in enumerate(rows):
        if row["method"] == method:
            groups.setdefault(row.get("train_seed"), []).append(i)
    return [np.array(idx) for idx in groups.values()]


def _common_range(fronts: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """The KL range every frontier covers (each: its KLs, ascending); None if empty or of zero width (unless every
    frontier is one same single point)."""
    low, high = max(f[0] for f in fronts), min(f[-1] for f in fronts)
    same_single = all(len(f) == 1 for f in fronts) and len({float(f[0]) for f in fronts}) == 1
    return (float(low), float(high)) if low < high or same_single else None


def matched_kl_comparison(rows: Sequence[dict], method_a: str, method_b: str, *, n_grid: int = 50,
                          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean reward gap frontier_a(kl) − frontier_b(kl) over the KL range both frontiers cover.

    A method trained with several seeds (rows with different ``train_seed``) has one frontier per seed; its
    frontier is their mean, read on the grid, over the KL range every seed's frontier covers (pooling the seeds'
    points into one envelope would take the best seed at each KL and flatter the method). With one seed per
    method this is the plain comparison of two frontiers.

    The grid is ``n_grid`` evenly spaced KLs on [kl_low, kl_high], fixed by the point estimates. Each
    bootstrap replicate resamples prefix indices with replacement, recomputes every row's mean reward and
    KL, rebuilds the frontiers and reads them on the same grid; where a method has several seeds, the
    replicate also resamples its seeds with replacement, so the interval ``ci_low``–``ci_high`` covers training
    noise as well as the prefixes (``ci_low_prefixes``–``ci_high_prefixes``: the prefixes alone, every seed kept).
    A replicate whose frontiers do not cover a grid point is dropped *for that point*: its average gap is the mean
    over the grid points it covers (a replicate covering none is dropped), and the pointwise intervals use the
    replicates covering the point. Near the ends of the range, where the end points' KLs jitter, fewer
    replicates count.

    Args:
        rows: evaluated checkpoints of (at least) both methods.
        method_a: the method whose frontier is on the left of the difference.
        method_b: the method subtracted.
        n_grid: grid points on the common KL range.
        n_boot: bootstrap replicates; 0 gives NaN intervals and shares.
        seed: seed of the resampling.
        level: confidence level of the percentile intervals.

    Returns:
        ``method_a``, ``method_b``, ``kl_low``, ``kl_high``, ``reward_diff`` (mean gap on the grid),
        ``ci_low``, ``ci_high`` (percentile interval of the replicates' mean gaps), ``dominance_share``
        (share of the grid points whose pointwise interval of the gap lies entirely above 0),
        ``dominance_share_b`` (entirely below 0), ``n_prompts``, ``n_boot``, ``n_seeds_a``, ``n_seeds_b``,
        ``seed_diffs_a`` (each seed of A: its frontier's mean gap to B's mean frontier), ``seed_diffs_b`` (A's mean
        frontier against each seed of B), ``ci_low_prefixes``, ``ci_high_prefixes``, ``note`` (``""``, or
        ``"no common KL range"`` with every number NaN when the ranges do not overlap).
    """
    if not 0 < level < 1 or n_grid < 1 or n_boot < 0:
        raise ValueError(f"matched_kl_comparison: need 0 < level < 1, n_grid ≥ 1, n_boot ≥ 0 (got {level}, "
                         f"{n_grid}, {n_boot})")
    if method_a == method_b:
        raise ValueError(f"matched_kl_comparison: method_a and method_b are both {method_a!r}")
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in (method_a, method_b):
        if method not in methods:
            raise ValueError(f"matched_kl_comparison: no rows of method {method!r} (have {methods})")
    rows = [row for row in rows if row["method"] in (method_a, method_b)]
    rewards, kls = _row_arrays(rows)
    groups = {m: seed_groups(rows, m) for m in (method_a, method_b)}
    nan = math.nan
    result = {"method_a": method_a, "method_b": method_b, "kl_low": nan, "kl_high": nan, "reward_diff": nan,
              "ci_low": nan, "ci_high": nan, "dominance_share": nan, "dominance_share_b": nan,
              "n_prompts": rewards.shape[1], "n_boot": n_boot, "n_seeds_a": len(groups[method_a]),
              "n_seeds_b": len(groups[method_b]), "seed_diffs_a": [], "seed_diffs_b": [], "ci_low_prefixes": nan,
              "ci_high_prefixes": nan, "note": ""}
    mean_reward, mean_kl = _prefix_means(rewards), _prefix_means(kls)
    fronts = {m: [mean_kl[g][upper_envelope(mean_kl[g], mean_reward[g])] for g in groups[m]]  # sorted by KL
              for m in groups}
    common = _common_range(fronts[method_a] + fronts[method_b])
    if common is None:
        return result | {"note": NO_COMMON_RANGE}
    grid = np.linspace(*common, n_grid)
    on_grid = {m: np.stack([_frontier_on_grid(mean_kl[g], mean_reward[g], grid) for g in groups[m]])
               for m in groups}  # (seeds, G) per method
    mean_a, mean_b = on_grid[method_a].mean(axis=0), on_grid[method_b].mean(axis=0)
    result |= {"kl_low": common[0], "kl_high": common[1], "reward_diff": float(np.mean(mean_a - mean_b)),
               "seed_diffs_a": [float(np.mean(f - mean_b)) for f in on_grid[method_a]],
               "seed_diffs_b": [float(np.mean(mean_a - f)) for f in on_grid[method_b]]}
    if n_boot == 0:
        return result

    n_prompts = rewards.shape[1]
    counts = np.random.default_rng(seed).multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot)
    boot_reward, boot_kl = _prefix_means(rewards, counts), _prefix_means(kls, counts)  # (R, B) each
    # per method, per replicate and seed, the seed's frontier on the grid: (B, seeds, G)
    boot = {m: np.stack([np.stack([_frontier_on_grid(boot_kl[g, b], boot_reward[g, b], grid) for g in groups[m]])
                         for b in range(n_boot)]) for m in groups}
    draw = np.random.default_rng([seed, 1])  # the seeds' resampling: its own stream, so the prefixes' is unchanged

    def resampled(m: str) -> np.ndarray:
        k = len(groups[m])
        if k == 1:
            return boot[m][:, 0]
        picks = draw.integers(0, k, size=(n_boot, k))
        return np.take_along_axis(boot[m], picks[:, :, None], axis=1).mean(axis=1)

    alpha = (1.0 - level) / 2

    def interval(gaps: np.ndarray) -> tuple[float, float, np.ndarray]:
        covered = ~np.isnan(gaps)  # (B, G)
        mean_gaps = np.array([g[c].mean() for g, c in zip(gaps, covered, strict=True) if c.any()])
        ci = tuple(float(q) for q in np.quantile(mean_gaps, [alpha, 1 - alpha])) if len(mean_gaps) else (nan, nan)
        low, high = np.full(n_grid, np.nan), np.full(n_grid, np.nan)
        seen = covered.any(axis=0)
        if seen.any():
            low[seen], high[seen] = np.nanquantile(gaps[:, seen], [alpha, 1 - alpha], axis=0)
        return *ci, np.stack([low, high])

    with np.errstate(invalid="ignore"):  # a seed's frontier that misses a grid point makes the mean NaN there
        prefixes_only = boot[method_a].mean(axis=1) - boot[method_b].mean(axis=1)
        result["ci_low_prefixes"], result["ci_high_prefixes"], bounds = interval(prefixes_only)
        if len(groups[method_a]) > 1 or len(groups[method_b]) > 1:
            result["ci_low"], result["ci_high"], bounds = interval(resampled(method_a) - resampled(method_b))
        else:
            result["ci_low"], result["ci_high"] = result["ci_low_prefixes"], result["ci_high_prefixes"]
    low, high = bounds
    # a grid point no replicate covers has no interval and counts for neither method
    result["dominance_share"] = float(np.mean(low > 0))
    result["dominance_share_b"] = float(np.mean(high < 0))
    return result


def compare_all(rows: Sequence[dict], methods: Sequence[str] | None = None, **kw) -> list[dict]:
    """Every unordered pair of methods once, the earlier method as ``method_a``.

    With ``methods=None`` the order is first appearance in ``rows`` with ``"DPO"`` moved to the front, so
    DPO is ``method_a`` against each baseline; an explicit ``methods`` order is used as given. Every pair
    uses the same ``seed`` (common random resamples across pairs).

    Args:
        rows: evaluated checkpoints.
        methods: the methods to compare, in order; None for all.
        **kw: passed to :func:`matched_kl_comparison` (``n_grid``, ``n_boot``, ``seed``, ``level``).

    Returns:
        One :func:`matched_kl_comparison` dict per pair.
    """
    if methods is None:
        methods = list(dict.fromkeys(row["method"] for row in rows))
        methods.sort(key=lambda m: m != "DPO")  # stable: only DPO moves
    methods = list(methods)
    return [matched_kl_comparison(rows, a, b, **kw) for i, a in enumerate(methods) for b in methods[i + 1:]]


def best_of_n_kl(n: int) -> float:
    """The analytic KL(π_BoN‖π_ref) = log N − (N − 1)/N of best-of-N sampling (an upper bound in general)."""
    if n < 1:
        raise ValueError(f"best_of_n_kl: N must be ≥ 1, got {n}")
    return math.log(n) - (n - 1) / n


def expected_best_of_n(rewards: np.ndarray, n: int) -> np.ndarray:
    """Unbiased per-prompt estimate of E[max of N draws], from M ≥ N reference samples per prompt.

    Averages the maximum over all C(M, N) subsets without forming them: with the rewards sorted
    ascending, r_(i) is the maximum of C(i − 1, N − 1) subsets, so its weight is C(i − 1, N − 1)/C(M, N).
    Lower variance than the maximum of the first N samples, with the same expectation.

    Args:
        rewards: reference-sample rewards. Shape: (P, M).
        n: N, 1 ≤ N ≤ M.

    Returns:
        The estimate per prompt. Shape: (P,).
    """
    rewards = np.sort(np.asarray(rewards, dtype=np.float64), axis=-1)
    m = rewards.shape[-1]
    if not 1 <= n <= m:
        raise ValueError(f"expected_best_of_n: need 1 ≤ N ≤ M, got N={n}, M={m}")
    return rewards @ best_of_n_weights(m, n)


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """Weight of the i-th smallest of M samples in E[max of N draws without replacement]: C(i−1, N−1)/C(M, N).

    Shape: (M,).
    """
    total = math.comb(m, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, m + 1)])  # exact big-int ratios


def best_of_n_curve(rewards: np.ndarray, ns: Sequence[int], *, estimator: str = "unbiased") -> list[dict]:
    """Best-of-N rows for each N in ``ns``, from the rewards of M reference samples per prompt.

    Args:
        rewards: reference-sample rewards. Shape: (P, M).
        ns: the Ns, each ≤ M.
        estimator: ``"unbiased"`` (:func:`expected_best_of_n`) or ``"first"`` (best of the first N samples).

    Returns:
        Rows with ``method="Best of N"``, ``knob=N``, ``step=0``, ``prompt_rewards`` (P,) and ``prompt_kls``
        all equal to :func:`best_of_n_kl` (N).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"best_of_n_curve: rewards must be (P, M), got shape {rewards.shape}")
    if estimator not in ("unbiased", "first"):
        raise ValueError(f"best_of_n_curve: estimator must be 'unbiased' or 'first', got {estimator!r}")
    out = []
    for n in ns:
        if not 1 <= n <= rewards.shape[1]:
            raise ValueError(f"best_of_n_curve: need 1 ≤ N ≤ M={rewards.shape[1]}, got N={n}")
        best = expected_best_of_n(rewards, n) if estimator == "unbiased" else rewards[:, :n].max(axis=1)
        out.append({"method": "Best of N", "knob": float(n), "step": 0, "prompt_rewards": best.tolist(),
                    "prompt_kls": [best_of_n_kl(n)] * rewards.shape[0]})
    return out
