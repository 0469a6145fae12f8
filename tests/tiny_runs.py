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
