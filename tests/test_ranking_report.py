"""Ranking saved model rows: alignment on shared prompts, comparisons, win-rate tables, by-construction order."""

import math

import numpy as np
import pytest
import torch

from dpolab.evaluate import length_controlled_win_rate, win_rate
from dpolab.evaluate.rank import bradley_terry
from dpolab.evaluate.results import ModelRow
from dpolab.experiments.ranking_report import (
    align_rows,
    construction_keys,
    dominance_pairs,
    model_name,
    pairwise_comparisons,
    rank_against_reference,
    results_file_models,
    win_rate_table,
    worst_of_n_rows,
)
from dpolab.sample.generate import Samples


def row(policy, prompts, rewards, lengths=None, source="nb", **extra):
    r = {"policy": policy, "source": source, "prompts": list(prompts), "prompt_rewards": list(rewards), **extra}
    if lengths is not None:
        r["prompt_lengths"] = list(lengths)
    return r


def test_align_rows_keeps_shared_prompts_in_the_first_models_order():
    rows = [row("a", ["p1", "p2", "p3"], [0.1, 0.2, 0.3], [5, 6, 7]),
            row("b", ["p3", "p4", "p1"], [1.0, 2.0, 3.0], [1, 2, 3])]
    aligned = align_rows(rows)
    assert aligned.models == ["nb/a", "nb/b"]
    assert aligned.prompts == ["p1", "p3"]
    assert aligned.rewards.tolist() == [[0.1, 0.3], [3.0, 1.0]]
    assert aligned.lengths.tolist() == [[5, 7], [3, 1]]
    assert aligned.dropped == []


def test_align_rows_without_lengths_and_with_a_repeated_name():
    rows = [row("a", ["p1", "p2"], [0.0, 1.0]), row("a", ["p1", "p2"], [1.0, 0.0], [3, 4])]
    aligned = align_rows(rows)
    assert aligned.lengths is None  # one row has no lengths: nothing to length-control with
    assert aligned.models == ["nb/a", "nb/a#2"]
    assert model_name(ModelRow("x", prompts=["p"], prompt_rewards=[0.0])) == "x"


def test_align_rows_drops_the_model_on_other_prompts():
    same = ["p1", "p2", "p3"]
    rows = [row("a", same, [0, 1, 2]), row("b", same, [1, 1, 1]), row("c", ["q1", "q2", "q3"], [0, 0, 0]),
            row("d", same + ["p4"], [2, 2, 2, 2])]
    aligned = align_rows(rows, min_prompts=2)
    assert aligned.dropped == ["nb/c"]
    assert aligned.models == ["nb/a", "nb/b", "nb/d"] and aligned.prompts == same


def test_align_rows_errors_name_the_row_and_field():
    with pytest.raises(ValueError, match=r"saved, row 1 \(b\), field 'prompt_rewards': 1 values for 2 prompts"):
        align_rows([row("a", ["p", "q"], [0, 1]), row("b", ["p", "q"], [0])], source="saved")
    with pytest.raises(ValueError, match=r"row 0 \(a\), field 'prompt_rewards': entry 1 is nan"):
        align_rows([row("a", ["p", "q"], [0, math.nan]), row("b", ["p", "q"], [0, 1])])
    with pytest.raises(ValueError, match=r"row 1 \(b\), field 'prompts': missing"):
        align_rows([row("a", ["p"], [0]), {"policy": "b", "prompt_rewards": [0]}])
    with pytest.raises(ValueError, match="share 0 held-out prompts"):
        align_rows([row("a", ["p"], [0]), row("b", ["q"], [0])], min_prompts=1)


def test_pairwise_comparisons_hand_outcomes():
    """Rewards a = (1, 0, 2), b = (0, 0, 3): a wins prompt 0, ties prompt 1, loses prompt 2."""
    aligned = align_rows([row("a", "xyz", [1, 0, 2]), row("b", "xyz", [0, 0, 3]), row("c", "xyz", [0, 0, 0])])
    table = pairwise_comparisons(aligned)
    assert len(table) == 3 * 3  # M(M-1)/2 pairs × P prompts
    ab = table[(table.model_a == "nb/a") & (table.model_b == "nb/b")]
    assert ab["outcome"].tolist() == [1.0, 0.5, 0.0]
    loose = pairwise_comparisons(aligned, tie_tolerance=1.5)  # differences of 1 become ties
    assert loose[(loose.model_a == "nb/a") & (loose.model_b == "nb/b")]["outcome"].tolist() == [0.5, 0.5, 0.5]


def test_win_rate_table_matches_the_library_calls():
    rng = np.random.default_rng(0)
    rewards, lengths = rng.normal(size=(3, 20)), rng.integers(5, 15, size=(3, 20)).astype(float)
    aligned = align_rows([row(n, [f"p{i}" for i in range(20)], r, le) for n, r, le in zip("abc", rewards, lengths)])
    table = win_rate_table(aligned, n_bootstrap=200, seed=3)
    assert table[["model_a", "model_b"]].values.tolist() == [["nb/a", "nb/b"], ["nb/a", "nb/c"], ["nb/b", "nb/c"]]
    expected = length_controlled_win_rate(rewards[0], rewards[2], lengths[0], lengths[2], n_bootstrap=200, seed=3)
    got = table.iloc[1]
    for key in ("win_rate", "ci_low", "ci_high", "n_wins", "lc_win_rate", "lc_ci_low"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    no_lengths = win_rate_table(align_rows([row("a", "pq", [0, 1]), row("b", "pq", [1, 1])]), n_bootstrap=50)
    assert "lc_win_rate" not in no_lengths and no_lengths["win_rate"].item() == win_rate([0, 1], [1, 1])["win_rate"]


@pytest.mark.parametrize("seed", range(5))
def test_bradley_terry_orders_a_balanced_round_robin_by_total_wins(seed):
    """With every pair compared on the same prompts, the score equation w_i = Σ_k n σ(θ_i − θ_k) + (penalty
    terms, increasing in θ_i) makes θ_i increasing in the total wins w_i: ratings follow wins exactly."""
    rng = np.random.default_rng(seed)
    rewards = np.round(rng.normal(size=(5, 12)) + np.arange(5)[:, None] * 0.3, 1)  # rounding makes ties
    aligned = align_rows([row(f"m{i}", [f"p{j}" for j in range(12)], r) for i, r in enumerate(rewards)])
    ratings = bradley_terry(pairwise_comparisons(aligned), n_bootstrap=0)
    wins = ratings.set_index("model")["wins"]
    rating = ratings.set_index("model")["rating"]
    for a in aligned.models:
        for b in aligned.models:
            if wins[a] > wins[b] + 1e-9:
                assert rating[a] > rating[b]
    for a, b in dominance_pairs(aligned):  # dominance means more wins, hence a higher rating
        assert wins[a] > wins[b] and rating[a] > rating[b]


def test_dominance_pairs_hand_example():
    aligned = align_rows([row("a", "xyz", [1, 1, 2]), row("b", "xyz", [1, 0, 2]), row("c", "xyz", [1, 1, 2]),
                          row("d", "xyz", [0, 5, 0])])
    assert sorted(dominance_pairs(aligned)) == [("nb/a", "nb/b"), ("nb/c", "nb/b")]  # a and c are equal: no pair


def _samples(rewards_by_prompt):
    """Fake reference samples whose text is the reward, so the reward function can read it back."""
    texts = [[f"{r:+.2f}" for r in row] for row in rewards_by_prompt]
    ids = [[[1] * (k + 1) for k in range(len(row))] for row in rewards_by_prompt]
    p, n = len(texts), len(texts[0])
    return Samples(prompts=[f"prompt {i} " for i in range(p)], prompt_ids=[[0]] * p, texts=texts, token_ids=ids,
                   model_logps=torch.zeros(p, n), sampling_logps=torch.zeros(p, n), finished=torch.ones(p, n, dtype=bool))


def test_worst_of_n_and_construction_keys():
    """Samples (0.5, −0.2, 0.9, 0.1) and (0.0, 0.3, −0.4, −0.1): worst of the first 2 is −0.2 and 0.0,
    worst of 4 is −0.2 and −0.4; best of 4 is 0.9 and 0.3."""
    from dpolab.experiments.sentiment.evaluation import best_of_n_rows

    def reward_fn(texts):
        return np.array([float(t.split()[-1]) for t in texts])  # prompt + continuation

    samples = _samples([[0.5, -0.2, 0.9, 0.1], [0.0, 0.3, -0.4, -0.1]])
    worst = worst_of_n_rows(samples, reward_fn, reward_fn, [2, 4])
    assert [r["policy"] for r in worst] == ["worst-of-2", "worst-of-4"]
    assert worst[0]["prompt_rewards"] == pytest.approx([-0.2, 0.0]) and worst[1]["prompt_rewards"] == pytest.approx(
        [-0.2, -0.4])
    assert worst[1]["reward"] == pytest.approx(-0.3) and worst[1]["judge"] == pytest.approx(-0.3)
    assert worst[1]["prompt_lengths"] == [2.0, 3.0]  # the picked samples' token counts
    assert worst[1]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    rows = best_of_n_rows(samples, reward_fn, reward_fn, [1, 4]) + worst
    for r in rows:
        r["source"] = "05"
    aligned = align_rows(rows)
    keys = construction_keys(aligned)["05"]
    assert keys == {"05/best-of-1": 0.0, "05/best-of-4": 2.0, "05/worst-of-2": -1.0, "05/worst-of-4": -2.0}
    # the order by key is a dominance order on every prompt (weak), by construction
    order = sorted(keys, key=keys.get)
    r = dict(zip(aligned.models, aligned.rewards))
    assert all((r[lo] <= r[hi]).all() for lo, hi in zip(order, order[1:]))


def test_saved_rows_rank_as_their_dicts(tmp_path):
    """Rows saved and loaded back (dpolab.evaluate.results) align exactly as the dicts they were saved from."""
    from dpolab.evaluate.results import load_model_rows, save_model_row

    rows = [row("a", ["p1", "p2", "p3"], [0.1, 0.2, 0.3], [5, 6, 7], method="DPO"),
            row("b", ["p3", "p1"], [1.0, 3.0], [1, 3], method="Best of N", n=2)]
    for r in rows:
        save_model_row(r, tmp_path, source=r["source"])
    saved, direct = align_rows(load_model_rows(tmp_path)), align_rows(rows)
    assert saved.models == direct.models and saved.prompts == direct.prompts
    assert saved.rewards.tolist() == direct.rewards.tolist() and saved.lengths.tolist() == direct.lengths.tolist()
    assert [r.method for r in saved.rows] == ["DPO", "Best of N"] and saved.rows[1].n == 2


def test_rank_against_reference_joins_win_rates_and_ratings():
    """A results file's π_ref, final checkpoints and Best-of-N (N > 1) rows: each model but π_ref gets its win rate
    against π_ref (the library's win_rate on the shared prompts) joined with its Bradley–Terry rating; the first
    checkpoint of a curve and Best-of-1 are not ranked."""
    prompts = ["p1", "p2", "p3", "p4"]
    results = {"policies": [
        {"method": "Reference", "knob": 0.0, "policy": "reference", "prompts": prompts, "kl": 0.0,
         "prompt_rewards": [0.1, 0.2, 0.3, 0.4]},
        {"method": "DPO", "knob": 0.1, "policy": "dpo_0.1_step0", "kl": 0.0, "prompt_rewards": [0.1, 0.2, 0.3, 0.4]},
        {"method": "DPO", "knob": 0.1, "policy": "dpo_0.1_step8", "kl": 1.5, "final": True,
         "prompt_rewards": [0.5, 0.1, 0.6, 0.9]},
        {"method": "Best of N", "knob": 1.0, "policy": "best_of_1", "kl": 0.0, "prompt_rewards": [0.1, 0.2, 0.3, 0.4]},
        {"method": "Best of N", "knob": 4.0, "policy": "best_of_4", "kl": 0.64, "prompt_rewards": [0.3, 0.4, 0.5, 0.2]},
    ]}
    rows = results_file_models(results)
    assert [r["policy"] for r in rows] == ["reference", "dpo_0.1_step8", "best_of_4"]
    assert all(r["prompts"] == prompts and r["source"] == "frontier" for r in rows)
    ranking = rank_against_reference(rows, n_bootstrap=200, seed=3)
    assert ranking.reference == "frontier/reference"
    assert list(ranking.table.index) == ["frontier/dpo_0.1_step8", "frontier/best_of_4"]
    ratings = bradley_terry(pairwise_comparisons(ranking.aligned), n_bootstrap=200, seed=3).set_index("model")
    assert ranking.reference_rating == ratings.loc["frontier/reference", "rating"]
    reference = np.array([0.1, 0.2, 0.3, 0.4])
    for name, rewards, kl in (("frontier/dpo_0.1_step8", [0.5, 0.1, 0.6, 0.9], 1.5),
                              ("frontier/best_of_4", [0.3, 0.4, 0.5, 0.2], 0.64)):
        got, want = ranking.table.loc[name], win_rate(np.array(rewards), reference, n_bootstrap=200, seed=3)
        assert got["KL"] == kl and got["mean reward"] == pytest.approx(np.mean(rewards))
        assert (got["win_rate"], got["ci_low"], got["ci_high"]) == (want["win_rate"], want["ci_low"], want["ci_high"])
        assert (got["rating"], got["rating ci_low"], got["rating ci_high"]) == tuple(
            ratings.loc[name, ["rating", "ci_low", "ci_high"]])
