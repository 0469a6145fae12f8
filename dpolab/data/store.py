"""Tokenized pairs as a few flat numpy columns instead of one Python object per pair.

A list of :class:`dpolab.data.tokenize.TokenizedPair` costs about 36 bytes per token (a list slot and an int
object for every id and mask value); :class:`PairStore` keeps 5 (an int32 id and an int8 mask value), so 100k
pairs fit in a small fraction of the memory (benchmarks/README.md). It reads as a list of pairs: indexing builds
the :class:`TokenizedPair` of one row on demand, so every consumer (batching, fingerprints, reference tables)
sees the same values as before.

Layout, for ``n`` pairs and ``T`` tokens in all::

    ids    int32 (T,)    prompt, chosen and rejected ids of pair 0, then of pair 1, …
    masks  int8  (T,)    the response masks at the same positions (0 under the prompt)
    ends   int64 (n, 3)  where the prompt, chosen and rejected parts of each pair end in ``ids``
    flags  bool  (n, 2)  truncated, repaired
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from dpolab.data.tokenize import TokenizedPair


class PairStore(Sequence):
    """Read-only sequence of :class:`TokenizedPair` held as flat columns (module docstring)."""

    def __init__(self, ids: np.ndarray, masks: np.ndarray, ends: np.ndarray, flags: np.ndarray):
        if ids.shape != masks.shape or ends.ndim != 2 or ends.shape[1] != 3 or flags.shape != (len(ends), 2):
            raise ValueError(f"PairStore: inconsistent columns {ids.shape}, {masks.shape}, {ends.shape}, "
                             f"{flags.shape}")
        self.ids, self.masks, self.ends, self.flags = ids, masks, ends, flags

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # negative indices, and IndexError past the end
        start = int(self.ends[i - 1, 2]) if i else 0
        p, c, r = (int(x) for x in self.ends[i])
        ids, masks = self.ids, self.masks
        return TokenizedPair(ids[start:p].tolist(), ids[p:c].tolist(), ids[c:r].tolist(), masks[p:c].tolist(),
                             masks[c:r].tolist(), truncated=bool(self.flags[i, 0]), repaired=bool(self.flags[i, 1]))

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"PairStore({len(self)} pairs, {len(self.ids)} tokens, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        """Bytes the columns hold."""
        return self.ids.nbytes + self.masks.nbytes + self.ends.nbytes + self.flags.nbytes

    def lengths(self) -> np.ndarray:
        """Tokens of the prompt, chosen and rejected parts of every pair. Shape: (n, 3)."""
        starts = np.concatenate([[0], self.ends[:-1, 2]]) if len(self) else np.zeros(0, dtype=np.int64)
        return np.diff(np.column_stack([starts, self.ends]), axis=1)

    @classmethod
    def from_pairs(cls, pairs: Iterable[TokenizedPair]) -> PairStore:
        """Pack pairs into columns (one pass; the pairs may come from a generator)."""
        builder = StoreBuilder()
        for pair in pairs:
            builder.append(pair)
        return builder.build()

    @classmethod
    def concat(cls, stores: Sequence[PairStore]) -> PairStore:
        """The stores one after another, in order."""
        if not stores:
            return StoreBuilder().build()
        offsets = np.cumsum([0] + [len(s.ids) for s in stores[:-1]])
        return cls(np.concatenate([s.ids for s in stores]), np.concatenate([s.masks for s in stores]),
                   np.concatenate([s.ends + o for s, o in zip(stores, offsets)]).reshape(-1, 3),
                   np.concatenate([s.flags for s in stores]).reshape(-1, 2))


class StoreBuilder:
    """Appends pairs into growable typed arrays (4 bytes an id, 1 a mask value), then makes a :class:`PairStore`."""

    def __init__(self):
        self.ids, self.masks, self.ends, self.flags = array("i"), array("b"), array("q"), array("b")

    def __len__(self) -> int:
        return len(self.ends) // 3

    def append(self, pair: TokenizedPair) -> None:
        self.ids.extend(pair.prompt_ids)
        self.masks.extend(bytes(len(pair.prompt_ids)))
        p = len(self.ids)
        self.ids.extend(pair.chosen_ids)
        self.ids.extend(pair.rejected_ids)
        self.masks.extend(pair.chosen_mask)
        self.masks.extend(pair.rejected_mask)
        self.ends.extend((p, p + len(pair.chosen_ids), len(self.ids)))
        self.flags.extend((pair.truncated, pair.repaired))

    def build(self) -> PairStore:
        return PairStore(np.frombuffer(self.ids, dtype=np.int32).copy(), np.frombuffer(self.masks, dtype=np.int8).copy(),
                         np.frombuffer(self.ends, dtype=np.int64).reshape(-1, 3).copy(),
                         np.frombuffer(self.flags, dtype=np.int8).reshape(-1, 2).astype(bool))
