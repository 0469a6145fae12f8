"""Sampling and judging: the batched sampler with its fast decoding loop, reward functions (judges), the embedded
sentiment material, and scored samples turned into preference pairs."""
