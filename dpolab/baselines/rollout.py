"""One rollout of the on-policy trainers (RLOO, PPO, online DPO): the step's prompts, ``k`` samples of each from the
policy, and the reward of every sample; and the settings those trainers share (:class:`RolloutSettings`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dpolab.sample.generate import Samples, sample


@dataclass(frozen=True)
class RolloutSettings:
    """What RLOO, PPO and online DPO share: their steps, the rollout of each step, the optimiser's learning rate."""

    steps: int = 16
    """Optimiser steps, one rollout each."""
    prompts_per_step: int = 4
    """Prompts of each rollout, the next ones of a seeded order of the prompts, cycled."""
    k: int = 4
    """Samples per prompt (RLOO's leave-one-out baseline and online DPO's pairs need k >= 2)."""
    lr: float = 2e-5
    """AdamW's learning rate (no weight decay)."""
    max_new_tokens: int = 24
    """Length of each sampled completion."""
    seed: int = 0
    """Seed of the prompt order and of each step's samples."""
    progress: bool = True
    """Show a progress bar."""


DEFAULT_ROLLOUT = RolloutSettings()


def prompt_order(num_prompts: int, seed: int) -> np.ndarray:
    """The order in which the steps walk through the prompts (one seeded permutation, cycled)."""
    return np.random.default_rng(seed).permutation(num_prompts)


def rollout(policy, tokenizer, prompts: Sequence[str], order: np.ndarray, step: int,
            reward_fn: Callable[[list[str]], np.ndarray], settings: RolloutSettings) -> tuple[Samples, torch.Tensor]:
    """Sample ``k`` completions of step ``step``'s ``prompts_per_step`` prompts (the next ones in ``order``) from
    the full distribution of ``policy``, and score them with ``reward_fn``, once per sample: its
    ``score_samples(samples)`` when it has one (a learned reward model reads the sampled token ids after the
    prompt's, :class:`dpolab.train.reward.RewardModelJudge`), otherwise the texts prompt + completion, the text the
    experiment's preference pairs and evaluation score. (Before results format 3 the text judges read the completion
    alone: the RL-GT arms of ``dpolab.sentiment/2`` files optimised VADER of the continuation, not of the review.)

    Returns:
        The samples and their rewards, prompt by prompt. Shape: (prompts_per_step · k,) float32.
    """
    prompts_per_step, k, seed = settings.prompts_per_step, settings.k, settings.seed
    take = [prompts[order[(step * prompts_per_step + j) % len(prompts)]] for j in range(prompts_per_step)]
    samples = sample(policy, tokenizer, take, k, max_new_tokens=settings.max_new_tokens, top_k=len(tokenizer),
                     seed=seed * 100_003 + step, progress=False)
    if hasattr(reward_fn, "score_samples"):
        scores = reward_fn.score_samples(samples)
    else:
        scores = reward_fn([prompt + t for prompt, row in zip(take, samples.texts) for t in row])
    return samples, torch.tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32)
