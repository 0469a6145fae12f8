"""The sampling distribution and the random streams that draw from it, shared by both sampling engines."""

from __future__ import annotations

import numpy as np
import torch


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0) -> torch.Tensor:
    """Next-token logits of the sampling distribution: temperature, then top-k, then top-p (nucleus).

    Removed tokens get ``-inf``. Top-p keeps the smallest set of most likely tokens whose probability
    reaches ``top_p`` (a token is removed when the tokens ranked above it already hold ``top_p``).
    Same order and rule as the transformers warpers. Shape: (..., V) -> (..., V), float32.
    """
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        remove = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def row_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """The random stream of one (prompt, sample) row: independent of batching and prompt order."""
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
