"""Collation: token ids to right-padded tensors, chosen and rejected side by side, plus length bucketing.

Padding is identified by lengths and the attention mask, never by ``pad_token_id`` (SmolLM2's pad token is its
EOS, ``<|im_end|>``, which also ends every response). ``labels`` are ``input_ids`` on scored response tokens and
-100 on the prompt, on padding and on response tokens whose mask is 0 (e.g. user turns).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

import torch

from dpolab.data.labels import IGNORE_INDEX  # re-exported for the modules that collate batches
from dpolab.data.tokenize import TokenizedPair


@dataclass
class SequenceBatch:
    """Prompt+response sequences, right-padded.

    Attributes:
        input_ids: Shape: (N, T).
        attention_mask: 1 on real tokens, 0 on padding. Shape: (N, T).
        labels: ``input_ids`` on scored response tokens, -100 elsewhere. Shape: (N, T).
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    labels: torch.LongTensor

    @property
    def padding_fraction(self) -> float:
        """Share of the ``N * T`` slots that are padding."""
        return 1.0 - self.attention_mask.sum().item() / max(self.attention_mask.numel(), 1)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum().item())


def collate_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]],
                      response_masks: list[list[int]] | None, pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> SequenceBatch:
    """Concatenate each prompt with its response and right-pad to the longest (rounded up to a multiple).

    Args:
        prompt_ids: N prompts as token ids.
        response_ids: N responses as token ids (the tokens after the prompt).
        response_masks: 1 where a response token is scored; ``None`` scores every response token.
        pad_token_id: Id written into padding slots (never used to find them).
        pad_to_multiple_of: Round the padded length ``T`` up to a multiple of this.
    """
    if len(prompt_ids) != len(response_ids) or (response_masks is not None and len(response_masks) != len(prompt_ids)):
        raise ValueError(f"collate_sequences: {len(prompt_ids)} prompts, {len(response_ids)} responses, "
                         f"{None if response_masks is None else len(response_masks)} masks")
    if not prompt_ids:
        raise ValueError("collate_sequences: empty batch")
    masks = response_masks if response_masks is not None else [[1] * len(r) for r in response_ids]
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(prompt_ids)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, r, m) in enumerate(zip(prompt_ids, response_ids, masks)):
        if len(m) != len(r):
            raise ValueError(f"collate_sequences: row {row}: mask length {len(m)} != response length {len(r)}")
        ids = torch.tensor(list(p) + list(r), dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        scored = torch.tensor(m, dtype=torch.bool)
        labels[row, len(p):len(ids)] = torch.where(scored, ids[len(p):], IGNORE_INDEX)
    return SequenceBatch(input_ids, attention_mask, labels)


@dataclass
class PairBatch(SequenceBatch):
    """``2B`` sequences: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected, same pair order.

    Attributes:
        index: Positions of the pairs in their dataset (keys for cached reference log-probs). Shape: (B,).
    """

    index: torch.LongTensor = None  # type: ignore[assignment]

    @property
    def num_pairs(self) -> int:
        """B, the number of preference pairs."""
        return self.input_ids.shape[0] // 2


BatchT = TypeVar("BatchT", bound=SequenceBatch)


def to_device(batch: BatchT, device: torch.device | str) -> BatchT:
    """The same kind of batch with every tensor field on ``device`` (other fields as they are)."""
    return type(batch)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, index: list[int] | None = None,
                  pad_to_multiple_of: int | None = None) -> PairBatch:
    """Stack B tokenized pairs into one :class:`PairBatch` of ``2B`` rows (chosen first, then rejected)."""
    if index is not None and len(index) != len(pairs):
        raise ValueError(f"collate_pairs: {len(pairs)} pairs but {len(index)} index entries")
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    seq = collate_sequences(prompts, responses, masks, pad_token_id, pad_to_multiple_of)
    idx = torch.tensor(list(range(len(pairs))) if index is None else list(index), dtype=torch.long)
    return PairBatch(seq.input_ids, seq.attention_mask, seq.labels, index=idx)


def pair_length(pair: TokenizedPair, layout: str = "rows") -> int:
    """Padded width a pair needs: prompt plus its longer response on two rows (``"rows"``), or prompt plus both
    responses on one pair-tree row (``"tree"``, :mod:`dpolab.fast.pairtree`). The length to bucket batches by."""
    if layout not in ("rows", "tree"):
        raise ValueError(f"pair_length: layout {layout!r} is neither 'rows' nor 'tree'")
    if layout == "tree":
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def length_bucketed_batches(lengths: list[int], batch_size: int, *, seed: int,
                            shuffle: bool = True) -> list[list[int]]:
    """Group indices into batches of similar length so that little of each batch is padding.

    The indices are shuffled (seeded), cut into windows of ``50 * batch_size``, each window is sorted by length
    and cut into batches, and the batch order is shuffled again; this keeps randomness across epochs while
    neighbours in a batch have similar lengths. ``shuffle=False`` sorts the whole list (deterministic, for
    evaluation). Every index appears exactly once; the last batch may be smaller.

    Args:
        lengths: Length of each item (e.g. :func:`pair_length`).
        batch_size: Items per batch.
        seed: Seed of the shuffles.
        shuffle: Shuffle within and across windows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded slots when each batch is padded to its longest item (sequence-level, one row per item)."""
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / max(slots, 1)
