"""Collation into padded tensors (chosen and rejected side by side) and length bucketing."""

import random

import pytest
import torch

from dpolab.data.batch import (
    IGNORE_INDEX,
    PairBatch,
    collate_pairs,
    collate_sequences,
    length_bucketed_batches,
    padding_fraction,
    pair_length,
    to_device,
)
from dpolab.data.tokenize import TokenizedPair

PAD = 2  # deliberately also used as a real token (SmolLM2: pad == eos == <|im_end|>)


def test_collate_sequences_by_hand():
    """Prompt [5, 6] + response [7, 2] (2 = EOS = pad id, scored); prompt [8] + response [9, 10, 11] with the
    middle token unscored (mask 0). T = 4, padded to a multiple of 3 gives T = 6."""
    batch = collate_sequences([[5, 6], [8]], [[7, 2], [9, 10, 11]], [[1, 1], [1, 0, 1]], PAD, pad_to_multiple_of=3)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2, 2, 2], [8, 9, 10, 11, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, 7, 2, x, x], [x, 9, x, 11, x, x]]  # the EOS (= pad id) is scored
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
    assert batch.padding_fraction == pytest.approx(4 / 12) and batch.num_tokens == 8


def test_collate_sequences_default_mask_scores_every_response_token():
    batch = collate_sequences([[1]], [[3, 4]], None, PAD)
    assert batch.labels.tolist() == [[IGNORE_INDEX, 3, 4]]


def test_collate_sequences_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="row 0: mask length 1 != response length 2"):
        collate_sequences([[1]], [[3, 4]], [[1]], PAD)
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        collate_sequences([[1], [2]], [[3]], None, PAD)


def pair(prompt, chosen, rejected, chosen_mask=None):
    return TokenizedPair(prompt, chosen, rejected, chosen_mask or [1] * len(chosen), [1] * len(rejected))


def test_collate_pairs_chosen_rows_then_rejected_rows():
    pairs = [pair([5], [6, 2], [7, 8, 2], chosen_mask=[0, 1]), pair([9, 9], [10], [11, 2])]
    batch = collate_pairs(pairs, PAD, index=[40, 17])
    assert isinstance(batch, PairBatch) and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[5, 6, 2, 2], [9, 9, 10, 2], [5, 7, 8, 2], [9, 9, 11, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, 2, x], [x, x, 10, x], [x, 7, 8, 2], [x, x, 11, 2]]
    assert batch.index.tolist() == [40, 17]
    assert collate_pairs(pairs, PAD).index.tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 pairs but 1 index"):
        collate_pairs(pairs, PAD, index=[3])


def test_pair_length():
    assert pair_length(pair([1, 2, 3], [4], [5, 6])) == 5
    assert pair_length(pair([1, 2, 3], [4], [5, 6]), "tree") == 6  # one row: prompt, chosen, rejected
    with pytest.raises(ValueError, match="layout 'packed'"):
        pair_length(pair([1], [2], [3]), "packed")


def test_padding_fraction_by_hand():
    """Lengths 2, 4, 4, 8 in batches {0, 1} and {2, 3}: slots 2*4 + 2*8 = 24, tokens 18, padding 6/24."""
    assert padding_fraction([2, 4, 4, 8], [[0, 1], [2, 3]]) == pytest.approx(0.25)
    assert padding_fraction([2, 4, 4, 8], [[0, 3], [1, 2]]) == pytest.approx(6 / 24)  # 16 + 8 slots, 18 tokens
    assert padding_fraction([2, 4, 4, 8], [[1, 2], [0, 3]]) == pytest.approx(6 / 24)
    assert padding_fraction([5, 1], [[0, 1]]) == pytest.approx(0.4)


def test_unshuffled_buckets_are_sorted_by_length():
    assert length_bucketed_batches([5, 1, 3, 2, 4], 2, seed=0, shuffle=False) == [[1, 3], [2, 4], [0]]


def test_bucketing_covers_every_index_once_and_is_seeded():
    lengths = [random.Random(1).randint(1, 500) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    assert batches == length_bucketed_batches(lengths, 8, seed=3)
    assert batches != length_bucketed_batches(lengths, 8, seed=4)


def test_bucketing_wastes_less_padding_than_random_batches():
    """Lengths uniform on 1..500 in random batches of 8: the expected batch maximum is about 8/9 * 500, so
    about 1 - 250/444 = 44 % of slots are padding. Sorting within windows of 400 leaves neighbours within
    about 500/400 * 8 = 10 tokens of each other: a few percent."""
    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(2000)]
    order = list(range(2000))
    rng.shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, 2000, 8)]
    assert padding_fraction(lengths, random_batches) == pytest.approx(0.44, abs=0.03)
    assert padding_fraction(lengths, length_bucketed_batches(lengths, 8, seed=0)) < 0.05


def test_to_device_keeps_the_kind_of_batch_and_its_values():
    """A PairBatch stays a PairBatch with equal tensors (its index too) on the device asked for."""
    pair = TokenizedPair([1, 5], [3, 4], [6], [1, 1], [1])
    batch = collate_pairs([pair, pair], PAD, index=[7, 9])
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is PairBatch and moved.input_ids.device.type == "meta" and moved.index.device.type == "meta"
    back = to_device(batch, "cpu")
    assert all(torch.equal(getattr(back, k), getattr(batch, k)) for k in vars(batch))


def test_pair_store_reads_as_the_list_it_packs():
    """Three pairs, 5 + 4 + 4 = 13 tokens: 13 × (4-byte id + 1-byte mask) + 3 × (3 int64 ends + 2 flags) = 143
    bytes; an SFT row (no rejected side) and the truncated/repaired flags come back as they went in."""
    from dpolab.data.store import PairStore
    from dpolab.train.fingerprint import pairs_digest

    pairs = [pair([1, 5], [3, 4], [6], chosen_mask=[0, 1]),
             TokenizedPair([7], [8, 9, 10], [], [1, 1, 1], [], truncated=True),
             TokenizedPair([11, 12], [13], [14], [1], [1], repaired=True)]
    store = PairStore.from_pairs(pairs)
    assert len(store) == 3 and list(store) == pairs and store[-1] == pairs[2] and store[1:] == pairs[1:]
    assert store.lengths().tolist() == [[2, 2, 1], [1, 3, 0], [2, 1, 1]] and store.nbytes == 143
    with pytest.raises(IndexError):
        store[3]
    assert PairStore.concat([PairStore.from_pairs(pairs[:1]), PairStore.from_pairs(pairs[1:])])[:] == pairs
    assert pairs_digest(store) == pairs_digest(pairs)  # a resume sees the same data
    a, b = collate_pairs([store[i] for i in (2, 0)], PAD), collate_pairs([pairs[i] for i in (2, 0)], PAD)
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    assert list(PairStore.from_pairs([])) == [] and PairStore.concat([]).nbytes == 0
