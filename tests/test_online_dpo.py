"""Online DPO: pairs from the current policy's samples, labelled by the judge given, one query per sample."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from dpolab.baselines.online_dpo import online_dpo_train, online_pairs
from dpolab.baselines.rollout import RolloutSettings
from dpolab.models.tiny import tiny_causal_lm
from dpolab.sample.judges import RewardFunctionError, get_judge
from tests.tiny_runs import rl_reward_gain


def test_pairs_by_hand():
    """Rewards of 3 prefixes × 3 samples. all_pairs: prefix 0 gives (1 ≻ 0), (2 ≻ 0) and the tie (1, 2); prefix 1
    is three ties; prefix 2 gives (0 ≻ 1) = flat (6 ≻ 7), (2 ≻ 0) = (8 ≻ 6), (2 ≻ 1) = (8 ≻ 7): 5 pairs, 4 ties.
    best_vs_worst: per prefix the first best against the first worst: (1 ≻ 0), a tie (prefix 1), (8 ≻ 7)."""
    rewards = np.array([[0.1, 0.5, 0.5], [1.0, 1.0, 1.0], [0.2, 0.0, 0.9]])
    chosen, rejected, ties = online_pairs(rewards, "all_pairs")
    assert chosen.tolist() == [1, 2, 6, 8, 8] and rejected.tolist() == [0, 0, 7, 6, 7] and ties == 4
    chosen, rejected, ties = online_pairs(rewards, "best_vs_worst")
    assert chosen.tolist() == [1, 8] and rejected.tolist() == [0, 7] and ties == 1
    with pytest.raises(ValueError, match="unknown pair strategy"):
        online_pairs(rewards, "bradley_terry")


def test_pairs_come_from_the_current_policy_and_the_judge_given_once_per_sample():
    """Every step's rollout samples the policy being trained (not π_ref), the judge scores each sample once (P·k
    texts a step), and the step's pair count plus ties is the number of candidate pairs P·C(k, 2)."""
    from dpolab.baselines import online_dpo as module

    policy, tokenizer = tiny_causal_lm("llama", seed=0)
    reference = copy.deepcopy(policy)
    seen, calls = [], []
    real = module.rollout

    def spy(model, *args, **kw):
        seen.append(model)
        return real(model, *args, **kw)

    def judge(texts):
        calls.append(len(texts))
        return np.array([t.count("e") for t in texts], dtype=float)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "rollout", spy)
        settings = RolloutSettings(steps=3, prompts_per_step=2, k=3, lr=1e-3, max_new_tokens=4, seed=1, progress=False)
        history = online_dpo_train(policy, reference, tokenizer, ["a b", "c", "d e f"], judge, settings, beta=0.1)
    assert all(model is policy for model in seen) and len(seen) == 3
    assert calls == [2 * 3] * 3
    assert all(r["pairs"] + r["ties"] == 2 * 3 for r in history)


def test_online_dpo_raises_a_dense_reward():
    """With the letters-'e' reward on a tiny GPT-2 (the RL baselines' helper, same seeds and threshold), the mean
    reward of 96 samples rises by more than 3 standard errors."""

    def train(policy, reference, tok, prompts, reward_fn, settings, *, kl_coef):
        assert kl_coef == 0.0  # the helper's RL setting; online DPO's regulariser is β and the fixed π_ref
        return online_dpo_train(policy, reference, tok, prompts, reward_fn, settings, beta=0.1)

    history, gain, se = rl_reward_gain(train)
    assert gain > 3 * se, (gain, se)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first step samples π_θ = π_ref


def test_bad_judge_and_k_are_refused():
    policy, tokenizer = tiny_causal_lm("llama", seed=0)
    with pytest.raises(ValueError, match="k >= 2"):
        online_dpo_train(policy, policy, tokenizer, ["a"], lambda t: np.zeros(len(t)),
                         RolloutSettings(k=1, progress=False))
    nan_at_3 = get_judge(lambda texts: np.where(np.arange(len(texts)) == 3, np.nan, 0.0), name="broken")
    with pytest.raises(RewardFunctionError, match="'broken' returned nan for text 3"):
        online_dpo_train(policy, copy.deepcopy(policy), tokenizer, ["a", "b"], nan_at_3,
                         RolloutSettings(steps=1, prompts_per_step=2, k=2, max_new_tokens=2, progress=False))
    from dpolab.experiments.sentiment.config import SentimentConfig

    with pytest.raises(ValueError, match="rloo_k must be >= 2"):
        SentimentConfig(methods=("online_dpo",), rloo_k=1)


def test_rollout_scores_the_prompt_and_the_completion_once_per_sample():
    """A text judge reads prompt + completion, the text the experiment's pairs and evaluation score, prompt by
    prompt, k per prompt, in the order of the step's prompts."""
    from dpolab.baselines.rollout import prompt_order, rollout

    policy, tokenizer = tiny_causal_lm("llama", seed=0)
    prompts = ["one two", "three", "four five six"]
    seen = []

    def judge(texts):
        seen.extend(texts)
        return np.zeros(len(texts))

    order = prompt_order(len(prompts), seed=3)
    samples, _ = rollout(policy, tokenizer, prompts, order, 1, judge,
                         RolloutSettings(prompts_per_step=2, k=2, max_new_tokens=3, seed=0))
    expected = [prompts[order[(2 + j) % 3]] for j in range(2)]
    assert samples.prompts == expected
    assert seen == [p + t for p, row in zip(expected, samples.texts) for t in row] and len(seen) == 4
