"""Win rates of model A over model B, length-controlled win rate, and held-out preference accuracy.

Every number comes with its uncertainty and the counts behind it (the AlpacaEval habit). A prompt's
outcome is 1 when the judge prefers A's response, 0 when it prefers B's, ½ for a tie; the win rate
is their mean, its standard error the sample standard deviation over √n, and its confidence
interval a percentile bootstrap that resamples *prompts* (so A's and B's responses to a prompt stay
together: the paired bootstrap). Ratings of many models live in :mod:`dpolab.evaluate.rank`; both are
re-exported by :mod:`dpolab.evaluate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from dpolab.evaluate.logistic import fit_logistic
from dpolab.evaluate.scores import align_by_label, common_length, score_array


def _bootstrap_means(values: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_bootstrap`` resamples (with replacement) of ``values``. Shape: (n_bootstrap,).

    Resampling rows is a multinomial draw of how often each distinct value is picked, which for
    outcomes in {0, ½, 1} costs three numbers per resample instead of n.
    """
    distinct, counts = np.unique(values, return_counts=True)
    block = max(1, 2_000_000 // len(distinct))  # bounds the (resamples × distinct values) count matrix
    return np.concatenate([rng.multinomial(len(values), counts / len(values), size=min(block, n_bootstrap - start))
                           @ distinct / len(values) for start in range(0, n_bootstrap, block)])


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarise_preferences(preferences, *, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0,
                          source: str = "preferences") -> dict[str, float]:
    """Win rate of A from per-prompt preferences (1 = A better, 0 = B better, ½ = tie; any value in [0, 1]).

    Shape: preferences (n,).

    Returns:
        ``win_rate`` (mean preference), ``standard_error`` (sample sd / √n; NaN for n = 1), ``ci_low``,
        ``ci_high`` (paired percentile bootstrap over prompts), ``n_wins``, ``n_losses``, ``n_ties``
        (preference above, below, exactly at ½), ``n``.
    """
    pref = score_array(preferences, "preference", source)
    n = common_length(source, preferences=pref)
    if ((pref < 0) | (pref > 1)).any():
        row = np.flatnonzero((pref < 0) | (pref > 1))[0]
        raise ValueError(f"{source}, row {row}, field 'preference': {pref[row]} is outside [0, 1]")
    low, high = (_interval(_bootstrap_means(pref, n_bootstrap, np.random.default_rng(seed)), confidence)
                 if n_bootstrap > 0 else (np.nan, np.nan))
    standard_error = float(pref.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    return {"win_rate": float(pref.mean()), "standard_error": standard_error,
            "ci_low": low, "ci_high": high, "n_wins": int((pref > 0.5).sum()), "n_losses": int((pref < 0.5).sum()),
            "n_ties": int((pref == 0.5).sum()), "n": n}


def outcomes(scores_a: np.ndarray, scores_b: np.ndarray, tie_tolerance: float = 0.0) -> np.ndarray:
    """1 where A's score beats B's by more than ``tie_tolerance``, 0 where B's beats A's, ½ otherwise (a tie).
    Shape: (n,), (n,) -> (n,)."""
    difference = scores_a - scores_b
    return np.where(difference > tie_tolerance, 1.0, np.where(difference < -tie_tolerance, 0.0, 0.5))


def win_rate(scores_a, scores_b, *, tie_tolerance: float = 0.0, n_bootstrap: int = 2000, confidence: float = 0.95,
             seed: int = 0, source: str = "scores") -> dict[str, float]:
    """Win rate of model A over model B from per-prompt judge scores of their responses, ties counted ½.

    Args:
        scores_a: the judge's score of A's response to each prompt. Shape: (n,).
        scores_b: the same for B, same prompt order. Shape: (n,).
        tie_tolerance: scores closer than this are a tie.
        n_bootstrap: resamples of the prompts for the interval.
        confidence: coverage of the interval.
        seed: seed of the bootstrap.
        source: a name for error messages (e.g. the file the scores came from).

    Returns:
        See :func:`summarise_preferences`: ``win_rate``, ``standard_error``, ``ci_low``, ``ci_high``,
        ``n_wins``, ``n_losses``, ``n_ties``, ``n``.
    """
    scores_a, scores_b = align_by_label(source, scores_a=scores_a, scores_b=scores_b)
    a, b = score_array(scores_a, "scores_a", source), score_array(scores_b, "scores_b", source)
    common_length(source, scores_a=a, scores_b=b)
    return summarise_preferences(outcomes(a, b, tie_tolerance), n_bootstrap=n_bootstrap, confidence=confidence,
                                 seed=seed, source=source)


def judge_win_rate(judge: Callable, prompts: Sequence, responses_a: Sequence, responses_b: Sequence, *,
                   pairwise: bool = False, prepend_prompt: bool = False, seed: int = 0,
                   **win_rate_kwargs) -> dict[str, float]:
    """Win rate of A over B as decided by a judge function.

    A pointwise judge (a reward function, classifier or reward model: ``vader_reward``, a
    ``dpolab.sample.judges.RewardFunction``) is called as ``judge(texts) -> scores`` (shape (n,)) once per model,
    on the responses alone or, with ``prepend_prompt``, on prompt + response (as ``dpolab.sample.judges``
    scores completions). A pairwise judge ``judge(prompt, first, second) -> preference for first in
    [0, 1]`` may favour a position, so each prompt's order is drawn at random (from ``seed``) and the
    preference mapped back to A.

    Args:
        judge: the judge, as above.
        prompts, responses_a, responses_b: one entry per prompt.
        pairwise: whether ``judge`` is pairwise.
        prepend_prompt: pointwise only: score ``prompt + response`` instead of the response alone.
        seed: seed of the order draw and of the bootstrap.
        **win_rate_kwargs: ``tie_tolerance`` (pointwise only), ``n_bootstrap``, ``confidence``, ``source``.

    Returns:
        The :func:`win_rate` dictionary; a pairwise judge adds ``n_a_first`` (prompts shown with A first)
        and ``first_position_rate`` (how often the judge preferred whichever response came first).
    """
    source = win_rate_kwargs.pop("source", "judge")
    n = common_length(source, prompts=prompts, responses_a=responses_a, responses_b=responses_b)
    if not pairwise:
        def texts(responses):
            return [p + r for p, r in zip(prompts, responses)] if prepend_prompt else list(responses)

        a = score_array(judge(texts(responses_a)), "scores_a", source)
        b = score_array(judge(texts(responses_b)), "scores_b", source)
        common_length(source, prompts=prompts, scores_a=a, scores_b=b)
        return win_rate(a, b, seed=seed, source=source, **win_rate_kwargs)
    win_rate_kwargs.pop("tie_tolerance", None)  # a pairwise judge states ties itself (preference ½)
    a_first = np.random.default_rng((seed, 1)).random(n) < 0.5  # a stream apart from the bootstrap's
    first_pref = np.array([judge(p, ra, rb) if f else judge(p, rb, ra)
                           for p, ra, rb, f in zip(prompts, responses_a, responses_b, a_first)], dtype=float)
    first_pref = score_array(first_pref, "preference", source)
    result = summarise_preferences(np.where(a_first, first_pref, 1.0 - first_pref), seed=seed, source=source,
                                   **win_rate_kwargs)
    return {**result, "n_a_first": int(a_first.sum()), "first_position_rate": float(first_pref.mean())}


def implicit_reward_win_rate(rewards_a, rewards_b, **win_rate_kwargs) -> dict[str, float]:
    """Win rate with a DPO model's implicit reward r(x, y) = β·log π_θ(y|x)/π_ref(y|x) as the judge.

    Takes the rewards already computed (e.g. by ``dpolab.rewards.implicit_reward``) for A's and B's
    responses to the same prompts, so it needs no model. Shape: rewards_a (n,), rewards_b (n,).
    """
    win_rate_kwargs.setdefault("source", "implicit rewards")
    return win_rate(rewards_a, rewards_b, **win_rate_kwargs)


def length_controlled_win_rate(scores_a, scores_b, lengths_a, lengths_b, *, tie_tolerance: float = 0.0,
                               l2: float = 1e-3, warn_threshold: float = 0.10, n_bootstrap: int = 1000,
                               confidence: float = 0.95, seed: int = 0, source: str = "scores") -> dict[str, float]:
    """Win rate of A over B predicted for equally long responses (the AlpacaEval 2 length control).

    A logistic model of the judge's per-prompt preference on the standardised length difference,

        P(A preferred on prompt i) = σ(θ₀ + θ₁·z_i),   z_i = (len_a,i − len_b,i) / sd(len_a − len_b),

    fitted by maximum likelihood (ties as target ½), gives LC = σ(θ₀), the prediction at z = 0 (Dubois et al.,
    2024, arXiv 2404.04475; their per-instruction terms drop out with only two models, and they also squash
    z with tanh). The interval refits on paired bootstrap resamples of the prompts.

    ``warn_threshold`` (default 0.10, ten win-rate points): a gap between LC and the raw win rate larger
    than this means length, not content, moves the verdict by as much as separates neighbouring models on
    public leaderboards, and it is several standard errors for evaluation sets of a few hundred prompts
    (SE ≤ 0.5/√n = 0.025 at n = 400) — too large to be sampling noise, so a warning says to report both.

    Args:
        scores_a, scores_b: per-prompt judge scores. Shape: (n,).
        lengths_a, lengths_b: response lengths (tokens or characters, the same unit for both). Shape: (n,).
        tie_tolerance: scores closer than this are a tie.
        l2: ridge ½·l2·(θ₀² + θ₁²); keeps the fit finite when length separates wins from losses perfectly.
        warn_threshold: warn when |LC − raw| exceeds it (see above).
        n_bootstrap, confidence, seed, source: as for :func:`win_rate`.

    Returns:
        The :func:`win_rate` dictionary plus ``lc_win_rate``, ``lc_ci_low``, ``lc_ci_high``,
        ``length_coefficient`` (θ₁, logits per sd of length difference), ``length_difference_sd``.
    """
    scores_a, scores_b, lengths_a, lengths_b = align_by_label(source, scores_a=scores_a, scores_b=scores_b,
                                                        lengths_a=lengths_a, lengths_b=lengths_b)
    a, b = score_array(scores_a, "scores_a", source), score_array(scores_b, "scores_b", source)
    len_a, len_b = score_array(lengths_a, "lengths_a", source), score_array(lengths_b, "lengths_b", source)
    n = common_length(source, scores_a=a, scores_b=b, lengths_a=len_a, lengths_b=len_b)
    raw = win_rate(a, b, tie_tolerance=tie_tolerance, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                   source=source)
    delta = len_a - len_b
    sd = float(delta.std())
    if sd == 0.0:  # one length difference on every prompt
        if np.any(delta != 0):  # a constant difference is confounded with the intercept
            warnings.warn(f"{source}: the length difference is {delta[0]} on every prompt, so its effect cannot be "
                          "separated from the win rate; lc_win_rate is NaN", stacklevel=2)
            lc = dict.fromkeys(["lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coefficient"], np.nan)
        else:  # equal lengths everywhere: nothing to control for
            lc = {"lc_win_rate": raw["win_rate"], "lc_ci_low": raw["ci_low"], "lc_ci_high": raw["ci_high"],
                  "length_coefficient": 0.0}
        return {**raw, **lc, "length_difference_sd": 0.0}
    design = np.stack([np.ones(n), delta / sd], 1)
    y = outcomes(a, b, tie_tolerance)
    rng = np.random.default_rng(seed)
    thetas = [fit_logistic(design, y, np.ones((1, n)), l2 * np.eye(2))]
    chunk = max(1, 2_000_000 // n)  # bound the (resamples × prompts) weight matrix
    for start in range(0, n_bootstrap, chunk):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_bootstrap - start))
        thetas.append(fit_logistic(design, y, weights, l2 * np.eye(2)))
    theta = np.concatenate(thetas)
    lc = float(expit(theta[0, 0]))
    low, high = _interval(expit(theta[1:, 0]), confidence) if n_bootstrap > 0 else (np.nan, np.nan)
    if abs(lc - raw["win_rate"]) > warn_threshold:
        warnings.warn(f"{source}: length-controlled win rate {lc:.3f} differs from the raw win rate "
                      f"{raw['win_rate']:.3f} by more than {warn_threshold}; the judge's verdict depends strongly on "
                      f"length ({theta[0, 1]:+.2f} logits per sd of length difference) — report both", stacklevel=2)
    return {**raw, "lc_win_rate": lc, "lc_ci_low": low, "lc_ci_high": high,
            "length_coefficient": float(theta[0, 1]), "length_difference_sd": sd}


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson, 1927); good near 0 and 1 and for small n."""
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return float(centre - half), float(centre + half)


def preference_accuracy(chosen_rewards, rejected_rewards, *, confidence: float = 0.95,
                        source: str = "rewards") -> dict[str, float]:
    """Share of held-out pairs whose chosen response gets the higher reward (RewardBench-style), ties ½.

    Ties count ½ (not 0 as trl's ``rewards/accuracies`` does): a policy equal to its reference gives every
    response implicit reward 0 and scores chance, 0.5. Shape: chosen_rewards (n,), rejected_rewards (n,).

    Returns:
        ``accuracy``, ``standard_error`` (√(p(1−p)/n)), ``ci_low``, ``ci_high`` (Wilson score interval on
        n_correct + ½·n_ties successes), ``n_correct`` (strictly preferred), ``n_ties``, ``n``.
    """
    chosen_rewards, rejected_rewards = align_by_label(source, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen = score_array(chosen_rewards, "chosen_rewards", source)
    rejected = score_array(rejected_rewards, "rejected_rewards", source)
    n = common_length(source, chosen_rewards=chosen, rejected_rewards=rejected)
    n_correct, n_ties = int((chosen > rejected).sum()), int((chosen == rejected).sum())
    accuracy = (n_correct + 0.5 * n_ties) / n
    low, high = wilson_interval(n_correct + 0.5 * n_ties, n, confidence)
    return {"accuracy": accuracy, "standard_error": float(np.sqrt(accuracy * (1 - accuracy) / n)), "ci_low": low,
            "ci_high": high, "n_correct": n_correct, "n_ties": n_ties, "n": n}


def implicit_preference_accuracy(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                                 ref_rejected_logps=None, *, confidence: float = 0.95,
                                 source: str = "logps") -> dict[str, dict[str, float]]:
    """Held-out preference accuracy of a DPO model's implicit reward, with and without the reference model.

    With the reference, pair i is right when r(x, y_c) > r(x, y_r), r = β·(log π_θ − log π_ref) (paper Eq. 5);
    without it (reference-free), when log π_θ(y_c|x) > log π_θ(y_r|x). β > 0 scales both sides of the
    comparison, so it does not enter. All inputs: summed (or averaged) response log-probs. Shape: (n,).

    Returns:
        ``{"without_reference": ..., "with_reference": ...}``, each a :func:`preference_accuracy`
        dictionary; ``with_reference`` only when both reference log-probs are given.
    """
    policy_chosen = score_array(policy_chosen_logps, "policy_chosen_logps", source)
    policy_rejected = score_array(policy_rejected_logps, "policy_rejected_logps", source)
    result = {"without_reference": preference_accuracy(policy_chosen, policy_rejected, confidence=confidence,
                                                       source=source)}
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(f"{source}: give both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is not None:
        ref_chosen = score_array(ref_chosen_logps, "ref_chosen_logps", source)
        ref_rejected = score_array(ref_rejected_logps, "ref_rejected_logps", source)
        common_length(source, policy_chosen_logps=policy_chosen, ref_chosen_logps=ref_chosen,
                     ref_rejected_logps=ref_rejected)
        result["with_reference"] = preference_accuracy(policy_chosen - ref_chosen, policy_rejected - ref_rejected,
                                                       confidence=confidence, source=source)
    return result
