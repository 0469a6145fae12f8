"""Per-prompt scores as evaluation reads them: a checked float64 array (a bad value is an error naming its row and
field), pandas Series matched by index label (never by position), and one common number of prompts."""

from __future__ import annotations

import numpy as np


def score_array(values, field: str, source: str) -> np.ndarray:
    """A 1-D float64 copy of a list, array or tensor; NaN or infinity is an error naming its row."""
    if hasattr(values, "detach"):  # a torch tensor (possibly bf16, on a GPU, with grad)
        values = values.detach().float().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):  # a non-numeric entry: name the first one
        items = list(values.tolist() if hasattr(values, "tolist") else values)
        for row, item in enumerate(items):
            try:
                float(item)
            except (TypeError, ValueError):
                raise ValueError(f"{source}, row {row}, field '{field}': {item!r} is not a number") from None
        raise
    bad = ~np.isfinite(array)
    if bad.any():
        row = np.flatnonzero(bad)[0]
        raise ValueError(f"{source}, row {row}, field '{field}': {array[row]} is not a finite number ({bad.sum()} of "
                         f"{len(array)} rows); a judge that returned NaN must be fixed or the prompt dropped for both")
    return array


def align_by_label(source: str, **values) -> list:
    """The values in one order: pandas Series are matched by index label (the first Series' order), never by
    position; Series whose labels differ are refused, naming labels that one of them lacks."""
    series = {name: v for name, v in values.items() if hasattr(v, "index") and hasattr(v, "reindex")}
    if len(series) < 2:
        return list(values.values())
    first_name, first = next(iter(series.items()))
    for name, other in series.items():
        if not other.index.is_unique:
            raise ValueError(f"{source}, field '{name}': its index has duplicate labels; cannot align by label")
        if set(other.index) != set(first.index):
            missing = sorted(set(first.index) ^ set(other.index), key=str)[:5]
            raise ValueError(f"{source}: the indexes of '{first_name}' and '{name}' differ (e.g. labels {missing}); "
                             "the comparison is prompt by prompt, so both need the same prompts")
    return [v.reindex(first.index) if name in series else v for name, v in values.items()]


def common_length(source: str, **arrays: np.ndarray) -> int:
    """n, the one length of all ``arrays`` (one value per prompt); mismatched lengths or n = 0 are errors."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: mismatched lengths {lengths}; the comparison is prompt by prompt, so each needs "
                         "one value per prompt, in the same prompt order")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"{source}: no prompts")
    return n
