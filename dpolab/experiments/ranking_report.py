"""Ranking saved models on shared held-out prompts: alignment, per-prompt comparisons, win-rate tables.

The rows that notebooks save (:class:`dpolab.evaluate.results.ModelRow`,
:func:`dpolab.evaluate.results.save_model_row`) hold each model's mean ground-truth reward per held-out prompt (``prompts``, ``prompt_rewards``, ``prompt_lengths``). Ranking
them needs the prompts they have in common (:func:`align_rows`); then every pair of models is compared prompt
by prompt — 1 when A's reward is higher, 0 when lower, ½ for a tie — which feeds the win rates
(:func:`win_rate_table`, :func:`dpolab.evaluate.win_rate`) and the Bradley–Terry ratings
(:func:`pairwise_comparisons`, :func:`dpolab.evaluate.rank.bradley_terry`); :func:`rank_against_reference` joins
each model's win rate against π_ref with its rating.

Every pair is compared on the same prompts, a *balanced* round robin, in which the Bradley–Terry ratings
are ordered exactly as the models' total wins (ties ½): if model i has more wins than j, its rating is
higher. And if A's reward is at least B's on every prompt and higher on one (A *dominates* B,
:func:`dominance_pairs`), A has more wins than B — so A is rated above B, whatever the other models.
Best-of-N policies built from the same reference samples (the first N of them) dominate one another by
construction, which gives the ranking a known truth (:func:`construction_keys`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from dpolab.evaluate import bradley_terry, length_controlled_win_rate, outcomes, win_rate
from dpolab.evaluate.results import ModelRow
from dpolab.experiments.sentiment.evaluation import best_of_n_rows

CONSTRUCTED_METHODS = {"Best of N": 1.0, "Worst of N": -1.0}  # method -> sign of its by-construction key


@dataclass
class AlignedRewards:
    """Per-prompt rewards of several models on the prompts they all share.

    Attributes:
        models: one name per model (``source/policy``).
        prompts: the shared held-out prompts, in the first model's order.
        rewards: mean ground-truth reward of each model's responses to each prompt. Shape: (M, P).
        lengths: mean response length (tokens) per model and prompt; None when a row lacks lengths. Shape: (M, P).
        rows: the saved rows, in the order of ``models``.
        dropped: names of the models left out for sharing too few prompts with the others.
    """

    models: list[str]
    prompts: list[str]
    rewards: np.ndarray
    lengths: np.ndarray | None
    rows: list[ModelRow]
    dropped: list[str] = field(default_factory=list)

    def long(self) -> pd.DataFrame:
        """One row per (model, prompt): ``run``, ``example`` (prompt index), ``reward``, for ``select_best``."""
        m, p = self.rewards.shape
        return pd.DataFrame({"run": np.repeat(self.models, p), "example": np.tile(np.arange(p), m),
                             "reward": self.rewards.reshape(-1)})


def model_name(row: ModelRow) -> str:
    """``source/policy`` (just ``policy`` when the row has no source)."""
    return f"{row.source}/{row.policy}" if row.source else str(row.policy)


def _per_prompt(row: ModelRow, index: int, source: str) -> dict[str, tuple[float, float]]:
    """prompt -> (reward, length) of one row, validated; the first occurrence of a repeated prompt wins."""
    name = row.policy
    for key in ("prompts", "prompt_rewards"):
        if getattr(row, key) is None:
            raise ValueError(f"{source}, row {index} ({name}), field '{key}': missing; save rows with "
                             "dpolab.evaluate.results.save_model_row")
    prompts, rewards = list(row.prompts), np.asarray(row.prompt_rewards, dtype=float)
    lengths = np.asarray(row.prompt_lengths or [math.nan] * len(prompts), dtype=float)
    for key, values in (("prompt_rewards", rewards), ("prompt_lengths", lengths)):
        if len(values) != len(prompts):
            raise ValueError(f"{source}, row {index} ({name}), field '{key}': {len(values)} values for "
                             f"{len(prompts)} prompts")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise ValueError(f"{source}, row {index} ({name}), field 'prompt_rewards': entry {bad[0]} is "
                         f"{rewards[bad[0]]}, not a finite number")
    table = {}
    for prompt, reward, length in zip(prompts, rewards, lengths):
        table.setdefault(prompt, (float(reward), float(length)))
    return table


def align_rows(rows: Sequence[ModelRow | Mapping], *, min_prompts: int = 2, source: str = "rows") -> AlignedRewards:
    """Restrict saved model rows to the held-out prompts they all share.

    When the shared set is smaller than ``min_prompts`` (models evaluated on different prompt sets), models
    are dropped one at a time — each time the one whose removal leaves the most shared prompts — down to two.

    Args:
        rows: saved rows (:func:`dpolab.evaluate.results.load_model_rows`), or dicts with at least ``policy``, ``prompts``
            and ``prompt_rewards`` (read by :meth:`dpolab.evaluate.results.ModelRow.from_dict`).
        min_prompts: the fewest shared prompts to rank on.
        source: a name for error messages (e.g. the folder the rows came from).

    Raises:
        ValueError: a malformed row (naming its index, policy and field), or fewer than two models that share
            ``min_prompts`` prompts.
    """
    rows = [row if isinstance(row, ModelRow) else ModelRow.from_dict(row, where=f"{source}, row {i}")
            for i, row in enumerate(rows)]
    if len(rows) < 2:
        raise ValueError(f"{source}: ranking needs at least 2 models, got {len(rows)}")
    tables = [_per_prompt(row, i, source) for i, row in enumerate(rows)]
    names, seen = [], {}
    for row in rows:  # the same source/policy saved twice (two folders) keeps both, numbered
        name = model_name(row)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    keep = list(range(len(rows)))

    def shared(indices):
        return set.intersection(*(set(tables[i]) for i in indices))

    while len(shared(keep)) < min_prompts and len(keep) > 2:
        # drop the model whose removal leaves the most shared prompts (ties: the one with fewest prompts)
        keep.remove(max(keep, key=lambda i: (len(shared([j for j in keep if j != i])), -len(tables[i]), i)))
    common = shared(keep)
    if len(common) < min_prompts:
        raise ValueError(f"{source}: models {[names[i] for i in keep]} share {len(common)} held-out prompts, fewer "
                         f"than min_prompts={min_prompts}; evaluate them on the same prompts (same seed and "
                         "prefix settings)")
    prompts = [p for p in tables[keep[0]] if p in common]
    rewards = np.array([[tables[i][p][0] for p in prompts] for i in keep])
    lengths = np.array([[tables[i][p][1] for p in prompts] for i in keep])
    return AlignedRewards(models=[names[i] for i in keep], prompts=prompts, rewards=rewards,
                          lengths=None if np.isnan(lengths).any() else lengths, rows=[rows[i] for i in keep],
                          dropped=[names[i] for i in range(len(rows)) if i not in keep])


def pairwise_comparisons(aligned: AlignedRewards, *, tie_tolerance: float = 0.0) -> pd.DataFrame:
    """Every pair of models compared on every shared prompt: the input of ``bradley_terry`` and ``online_elo``.

    Returns:
        Columns ``model_a``, ``model_b``, ``prompt`` (index into ``aligned.prompts``), ``outcome`` (1 = A's reward
        higher, 0 = lower, ½ = within ``tie_tolerance``); M(M−1)/2 × P rows, prompt by prompt within each pair.
    """
    frames = []
    for i, j in combinations(range(len(aligned.models)), 2):
        frames.append(pd.DataFrame({"model_a": aligned.models[i], "model_b": aligned.models[j],
                                    "prompt": np.arange(len(aligned.prompts)),
                                    "outcome": outcomes(aligned.rewards[i], aligned.rewards[j], tie_tolerance)}))
    return pd.concat(frames, ignore_index=True)


def win_rate_table(aligned: AlignedRewards, *, tie_tolerance: float = 0.0, n_bootstrap: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Win rate (ties ½, paired bootstrap interval) of every pair, and the length-controlled one when lengths exist.

    Returns:
        One row per pair (A listed before B in ``aligned.models``): ``model_a``, ``model_b`` and the
        :func:`dpolab.evaluate.win_rate` fields; with lengths also ``lc_win_rate``, ``lc_ci_low``, ``lc_ci_high``,
        ``length_coefficient`` and ``length_warning`` (the length control moved the win rate by more than 0.1,
        or could not separate length from the verdict).
    """
    out = []
    for i, j in combinations(range(len(aligned.models)), 2):
        a, b = aligned.rewards[i], aligned.rewards[j]
        pair = {"model_a": aligned.models[i], "model_b": aligned.models[j]}
        kwargs = dict(tie_tolerance=tie_tolerance, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                      source=f"{pair['model_a']} vs {pair['model_b']}")
        if aligned.lengths is None:
            out.append({**pair, **win_rate(a, b, **kwargs)})
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = length_controlled_win_rate(a, b, aligned.lengths[i], aligned.lengths[j], **kwargs)
        out.append({**pair, **result, "length_warning": bool(caught)})
    return pd.DataFrame(out)


@dataclass
class ReferenceRanking:
    """Models ranked against π_ref (:func:`rank_against_reference`).

    Attributes:
        aligned: the models' per-prompt rewards on their shared prompts.
        ratings: the Bradley–Terry table of :func:`dpolab.evaluate.bradley_terry` (π_ref's row too).
        reference: π_ref's model name.
        table: one row per model but π_ref (index ``model``): ``KL``, ``mean reward``, the win rate against π_ref
            (``win_rate``, ``ci_low``, ``ci_high``) and the rating (``rating``, ``rating ci_low``,
            ``rating ci_high``).
    """

    aligned: AlignedRewards
    ratings: pd.DataFrame
    reference: str
    table: pd.DataFrame

    @property
    def reference_rating(self) -> float:
        """π_ref's Bradley–Terry rating."""
        return float(self.ratings.set_index("model").loc[self.reference, "rating"])


def results_file_models(results: Mapping) -> list[dict]:
    """The models of a sentiment results file (:func:`dpolab.experiments.sentiment.report.from_results`) worth
    ranking: π_ref, the last checkpoint of every curve and the Best-of-N policies with N > 1, each on π_ref's held-out
    prompts unless it names its own, with source ``frontier``."""
    policies = results["policies"]
    reference_row = next(r for r in policies if r["method"] == "Reference")
    return [{**r, "prompts": r.get("prompts", reference_row["prompts"]), "source": "frontier"} for r in policies
            if r["method"] == "Reference" or r.get("final") or (r["method"] == "Best of N" and r["knob"] > 1)]


def rank_against_reference(rows: Sequence[ModelRow | Mapping], *, min_prompts: int = 2, n_bootstrap: int = 1000,
                           seed: int = 0, source: str = "rows") -> ReferenceRanking:
    """Each model's win rate against π_ref (the model whose name says ``reference``) on their shared prompts,
    joined with the Bradley–Terry ratings of all of them (:func:`align_rows`, :func:`pairwise_comparisons`,
    :func:`dpolab.evaluate.bradley_terry`, :func:`dpolab.evaluate.win_rate`; the same ``n_bootstrap`` and ``seed``
    for every interval)."""
    aligned = align_rows(rows, min_prompts=min_prompts, source=source)
    ratings = bradley_terry(pairwise_comparisons(aligned), n_bootstrap=n_bootstrap, seed=seed)
    ref = aligned.models.index(next(m for m in aligned.models if "reference" in m))
    versus_ref = pd.DataFrame([
        {"model": name, "KL": row.kl, "mean reward": aligned.rewards[i].mean(),
         **{k: win_rate(aligned.rewards[i], aligned.rewards[ref], n_bootstrap=n_bootstrap, seed=seed)[k]
            for k in ("win_rate", "ci_low", "ci_high")}}
        for i, (name, row) in enumerate(zip(aligned.models, aligned.rows)) if i != ref
    ]).set_index("model")
    columns = ratings.set_index("model")[["rating", "ci_low", "ci_high"]].rename(
        columns={"ci_low": "rating ci_low", "ci_high": "rating ci_high"})
    return ReferenceRanking(aligned, ratings, aligned.models[ref], versus_ref.join(columns))


def dominance_pairs(aligned: AlignedRewards) -> list[tuple[str, str]]:
    """(A, B) for every pair where A's reward is ≥ B's on every shared prompt and > on at least one."""
    r = aligned.rewards
    return [(aligned.models[i], aligned.models[j]) for i in range(len(r)) for j in range(len(r))
            if i != j and bool((r[i] >= r[j]).all() and (r[i] > r[j]).any())]


def construction_keys(aligned: AlignedRewards) -> dict[str, dict[str, float]]:
    """The by-construction order of Best-of-N / worst-of-N families: source -> {model: key}, higher = better.

    Best-of-N keeps the highest-reward of the first N reference samples of a prompt, so best-of-2N ≥ best-of-N
    on every prompt; worst-of-N keeps the lowest, so worst-of-2N ≤ worst-of-N ≤ best-of-1 (the first sample).
    The key is +log₂ N for best-of-N and −log₂ N for worst-of-N. Only families of ≥ 2 models from one source.
    """
    families: dict[str, dict[str, float]] = {}
    for name, row in zip(aligned.models, aligned.rows):
        sign = CONSTRUCTED_METHODS.get(row.method)
        if sign is not None and row.n:
            families.setdefault(row.source, {})[name] = sign * math.log2(int(row.n))
    return {src: keys for src, keys in families.items() if len(keys) >= 2}


def worst_of_n_rows(reference_samples, reward_fn: Callable, judge_fn: Callable, ns: Sequence[int]) -> list[dict]:
    """Worst-of-N from the reference's samples: per prompt, the lowest-reward of the first N samples.

    A deliberately weak policy with a known place in the ranking (below best-of-1). It is Best-of-N under the
    negated reward, so it reuses :func:`dpolab.experiments.sentiment.evaluation.best_of_n_rows`; its KL to the
    reference has the same bound, log N − (N − 1)/N.
    """

    def negated(texts):
        return -np.asarray(reward_fn(texts), dtype=float)

    rows = best_of_n_rows(reference_samples, negated, judge_fn, ns)
    for row in rows:
        row.update(policy=f"worst-of-{row['n']}", method="Worst of N", reward=-row["reward"],
                   prompt_rewards=[-v for v in row["prompt_rewards"]])
    return rows
