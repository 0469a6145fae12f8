"""Content fingerprints: SHA-256 of a model's weights and of tokenized pairs.

A checkpoint records them (the training data, and a model passed in as an object) so that a resume is refused on
other data or another starting model; the precomputed reference table's cache key hashes the same bytes
(:func:`dpolab.train.reference_table.reference_key`). Both hash contents, never object identities or paths.
"""

from __future__ import annotations

import hashlib
import json

import torch


def hash_weights(h, model: torch.nn.Module) -> None:
    """Feed ``model``'s state dict to the hash ``h``: each tensor's name, dtype, shape and bytes, by name."""
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def hash_pairs(h, pairs) -> None:
    """Feed tokenized pairs to the hash ``h``: ids and masks of each, in order."""
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_mask, p.rejected_mask]).encode())


def pairs_digest(pairs) -> str:
    """SHA-256 of tokenized pairs (ids and masks, in order): the training data's fingerprint in a checkpoint."""
    h = hashlib.sha256(b"dpolab-pairs-v1")
    hash_pairs(h, pairs)
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): its identity when passed in as an object."""
    h = hashlib.sha256(b"dpolab-weights-v1")
    hash_weights(h, model)
    return h.hexdigest()
