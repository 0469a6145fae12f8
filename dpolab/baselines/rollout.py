"""One rollout of the RL baselines (RLOO, PPO): the step's prompts, ``k`` samples of each from the policy, and the
reward of every sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpolab.sample.generate import Samples, sample


def prompt_order(num_prompts: int, seed: int) -> np.ndarray:
    """The order in which the steps walk through the prompts (one seeded permutation, cycled)."""
    return np.random.default_rng(seed).permutation(num_prompts)


def rollout(policy, tokenizer, prompts: Sequence[str], order: np.ndarray, step: int,
            reward_fn: Callable[[list[str]], np.ndarray], *, prompts_per_step: int, k: int, max_new_tokens: int,
            seed: int) -> tuple[Samples, torch.Tensor]:
    """Sample ``k`` completions of step ``step``'s ``prompts_per_step`` prompts (the next ones in ``order``) from
    the full distribution of ``policy``, and score them with ``reward_fn``, once per sample: its
    ``score_samples(samples)`` when it has one (a learned reward model reads the sampled token ids after the
    prompt's, :class:`dpolab.train.reward.RewardModelJudge`), otherwise the texts prompt + completion, the text the
    experiment's preference pairs and evaluation score. (Before results format 3 the text judges read the completion
    alone: the RL-GT arms of ``dpolab.sentiment/2`` files optimised VADER of the continuation, not of the review.)

    Returns:
        The samples and their rewards, prompt by prompt. Shape: (prompts_per_step · k,) float32.
    """
    take = [prompts[order[(step * prompts_per_step + j) % len(prompts)]] for j in range(prompts_per_step)]
    samples = sample(policy, tokenizer, take, k, max_new_tokens=max_new_tokens, top_k=len(tokenizer),
                     seed=seed * 100_003 + step, progress=False)
    if hasattr(reward_fn, "score_samples"):
        scores = reward_fn.score_samples(samples)
    else:
        scores = reward_fn([prompt + t for prompt, row in zip(take, samples.texts) for t in row])
    return samples, torch.tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32)
