"""The RL baseline (RLOO) and the sentiment evaluation helpers, on tiny models."""

import math

import numpy as np
import pytest
import torch
from tiny_runs import rl_reward_gain

from dpolab.baselines.rloo import leave_one_out_advantages, rloo_train
from dpolab.experiments.sentiment.evaluation import (
    best_of_n_rows,
    heldout_pair_accuracy,
    mean_and_se,
    slow_heldout_pair_accuracy,
)
from dpolab.models.tiny import tiny_causal_lm
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.generate import sample


def test_leave_one_out_advantages_by_hand():
    """Rewards (1, 2, 6): baselines are mean of the others = (4, 3.5, 1.5); advantages (−3, −1.5, 4.5).

    They sum to zero up to the factor k/(k−1): Σ A_i = Σ R_i − Σ R_i = 0 for any k.
    """
    adv = leave_one_out_advantages(torch.tensor([[1.0, 2.0, 6.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-3.0, -1.5, 4.5]]))
    assert abs(adv.sum().item()) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([[1.0]]))


def test_completion_logprobs_matches_sampling_logps():
    """Teacher-forced scoring of the samples under the sampling model equals the log-probs recorded while sampling."""
    model, tok = tiny_causal_lm("gpt2", seed=1)
    samples = sample(model, tok, ["The movie", "A dull"], 3, max_new_tokens=6, top_k=len(tok), seed=0, progress=False)
    scored = completion_logprobs(model, samples, tok.pad_token_id)
    torch.testing.assert_close(scored, samples.model_logps, rtol=1e-5, atol=1e-4)


def test_best_of_n_by_hand():
    """Two prompts, rewards (0.1, 0.9, 0.5, 0.2) and (−0.3, −0.1, 0.4, 0.0): best-of-2 picks 0.9 and −0.1."""
    from types import SimpleNamespace

    texts = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    table = dict(zip("pabcdqefgh", [0, 0.1, 0.9, 0.5, 0.2, 0, -0.3, -0.1, 0.4, 0.0]))
    samples = SimpleNamespace(prompts=["p", "q"], texts=texts, token_ids=[[[1]] * 4, [[1, 2]] * 4])

    def reward(ts):
        return np.array([table[t[-1]] for t in ts])

    rows = best_of_n_rows(samples, reward, reward, [2, 4])
    assert rows[0]["reward"] == pytest.approx((0.9 - 0.1) / 2)
    assert rows[1]["reward"] == pytest.approx((0.9 + 0.4) / 2)
    assert rows[1]["kl"] == pytest.approx(math.log(4) - 3 / 4)


def test_heldout_pair_accuracy_by_hand():
    """Prompt 1: rewards (0, 1, 2), log-ratios (0.5, 0.1, 0.9). Pairs (0,1) wrong, (0,2) right, (1,2) right → 2/3.

    Prompt 2: rewards (1, 1, 3) — the pair (0,1) is a reward tie and is dropped; log-ratios (0, 0, 0): both remaining
    pairs are log-ratio ties and count ½ each. Total (2 + 1) / (3 + 2) = 0.6.
    Cluster SE with a = 0.6: c − a·n = (2 − 1.8, 1 − 1.2) = (0.2, −0.2); √(2/1 · 0.08) / 5 = 0.08.
    """
    ratios = [[0.5, 0.1, 0.9], [0.0, 0.0, 0.0]]
    rewards = [[0.0, 1.0, 2.0], [1.0, 1.0, 3.0]]
    out = heldout_pair_accuracy(ratios, rewards)
    assert out["heldout_acc"] == pytest.approx(0.6)
    assert out["heldout_acc_se"] == pytest.approx(0.08)
    assert (out["heldout_pairs"], out["heldout_prompts"]) == (5, 2)
    assert slow_heldout_pair_accuracy(ratios, rewards) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="prompts, samples"):
        heldout_pair_accuracy([[0.0, 1.0]], [[0.0, 1.0, 2.0]])


def test_heldout_pair_accuracy_matches_slow_loop_and_is_invariant_to_beta():
    """Random (P, N) values: the vectorised accuracy equals the pair loop; scaling log-ratios by β > 0 changes nothing;
    the log-ratio equal to the reward gives 1 and its negation 0."""
    rng = np.random.default_rng(3)
    ratios = rng.normal(size=(7, 5))
    rewards = rng.integers(0, 4, size=(7, 5)).astype(float)  # many reward ties
    fast = heldout_pair_accuracy(ratios, rewards)["heldout_acc"]
    assert fast == pytest.approx(slow_heldout_pair_accuracy(ratios, rewards), abs=1e-12)
    assert heldout_pair_accuracy(0.1 * ratios, rewards)["heldout_acc"] == pytest.approx(fast, abs=1e-12)
    assert heldout_pair_accuracy(rewards, rewards)["heldout_acc"] == 1.0
    assert heldout_pair_accuracy(-rewards, rewards)["heldout_acc"] == 0.0


def test_mean_and_se():
    """(1, 2, 3): mean 2, sample s.d. 1, s.e. 1/√3."""
    assert mean_and_se([1, 2, 3]) == pytest.approx((2.0, 1 / math.sqrt(3)))


def test_rloo_raises_the_reward():
    """Reward = number of letters 'e' in the completion (dense); RLOO must raise its mean.

    "Raised" means by more than three standard errors of the difference of the two sample means, so a
    policy that did not move fails with probability about 0.1%.
    """
    history, gain, se = rl_reward_gain(rloo_train)
    assert len(history) == 20 and all(np.isfinite(h["loss"]) for h in history)
    assert gain > 3 * se, (gain, se)
