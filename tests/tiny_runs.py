"""Synthetic preference pairs and the config of the short tiny-GPT-2 runs that many test files share.

A plain module (not conftest.py) because the torchrun and killed-run workers of the tests import it too.
"""

from dpolab.data.records import PreferenceExample

POSITIVE = ["good", "great", "wonderful", "fine", "superb", "warm", "funny", "wise"]
NEGATIVE = ["bad", "terrible", "awful", "dull", "mess", "loud", "long", "plodding"]
PROMPTS = ["The movie was", "The acting is", "It is a", "The script was", "The ending", "Hello! How are"]
FAST = {"model": "tiny-gpt2", "progress": False, "kl_samples": 0, "lr": 1e-3, "warmup_steps": 1}
"""A tiny GPT-2 run without sampling or progress bar, warmed up in one step."""


def make_examples(n: int = 24, offset: int = 0, prompts: list[str] = PROMPTS) -> list[PreferenceExample]:
    """Pairs ``offset`` … ``offset + n − 1`` of unequal lengths (1-3 positive words vs 2-5 negative words), cycling
    through ``prompts``."""
    out = []
    for i in range(offset, offset + n):
        chosen = " " + " ".join(POSITIVE[(i + k) % 8] for k in range(1 + i % 3))
        rejected = " " + " ".join(NEGATIVE[(i + k) % 8] for k in range(2 + i % 4))
        out.append(PreferenceExample(prompts[i % len(prompts)], chosen, rejected, source=f"synthetic:row {i}"))
    return out


def letter_e_reward(texts):
    """A dense reward for random tiny models: the number of letters 'e' in each text."""
    import numpy as np

    return np.array([t.count("e") for t in texts], dtype=float)


def rl_reward_gain(train_fn, steps: int = 20):
    """Train a tiny GPT-2 with ``train_fn`` (``rloo_train`` / ``ppo_train`` signature; KL coefficient 0) on
    :func:`letter_e_reward` and return ``(history, gain, se)``: the mean reward of 96 samples after minus before,
    and the standard error of that difference (the same seeds before and after)."""
    import math

    from dpolab.models.tiny import tiny_causal_lm
    from dpolab.sample.generate import sample

    policy, tok = tiny_causal_lm("gpt2", seed=2)
    reference, _ = tiny_causal_lm("gpt2", seed=2)
    prompts = ["The movie was", "It is", "A film that"]
    before = sample(policy, tok, prompts, 32, max_new_tokens=4, top_k=len(tok), seed=5, progress=False)
    from dpolab.baselines.rollout import RolloutSettings

    settings = RolloutSettings(steps=steps, prompts_per_step=3, k=8, lr=3e-3, max_new_tokens=4, seed=0, progress=False)
    history = train_fn(policy, reference, tok, prompts, letter_e_reward, settings, kl_coef=0.0)
    after = sample(policy, tok, prompts, 32, max_new_tokens=4, top_k=len(tok), seed=5, progress=False)
    r0, r1 = (letter_e_reward([t for row in s.texts for t in row]) for s in (before, after))
    return history, r1.mean() - r0.mean(), math.sqrt(r0.var(ddof=1) / r0.size + r1.var(ddof=1) / r1.size)
