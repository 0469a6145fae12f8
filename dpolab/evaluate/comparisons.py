"""Pairwise comparisons of models as the ratings read them: a checked table (errors name row and field), the
models to rate, and the comparison graph's connected components.

A comparison is a row ``model_a``, ``model_b``, ``outcome`` (1 = model_a wins, 0 = model_b wins, ½ = tie; any
preference in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def as_python(value):
    """A numpy scalar as the Python value it holds, so messages read ``nan``, not ``np.float64(nan)``."""
    return value.item() if isinstance(value, np.generic) else value


def comparison_table(comparisons, source: str) -> pd.DataFrame:
    """Validate ``comparisons`` (DataFrame or records with model_a, model_b, outcome) and return it as a DataFrame."""
    table = comparisons if isinstance(comparisons, pd.DataFrame) else pd.DataFrame.from_records(list(comparisons))
    missing = [c for c in ("model_a", "model_b", "outcome") if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected model_a, model_b, outcome "
                         f"(1 = model_a wins, 0 = model_b wins, 0.5 = tie), found {list(table.columns)}")
    if len(table) == 0:
        raise ValueError(f"{source}: no comparisons")
    for field in ("model_a", "model_b"):
        bad = table[field].isna() | (table[field].astype(str).str.strip() == "")
        if bad.any():
            raise ValueError(f"{source}, row {table.index[bad.to_numpy()][0]}, field '{field}': missing model name")
    outcome = pd.to_numeric(table["outcome"], errors="coerce").to_numpy(float)
    bad = ~((outcome >= 0) & (outcome <= 1))  # also catches NaN and non-numbers
    if bad.any():
        row = np.flatnonzero(bad)[0]
        raise ValueError(f"{source}, row {table.index[row]}, field 'outcome': {as_python(table['outcome'].iloc[row])!r} "
                         "is not a number in [0, 1] (1 = model_a wins, 0 = model_b wins, 0.5 = tie)")
    a, b = table["model_a"].astype(str).to_numpy(), table["model_b"].astype(str).to_numpy()
    if (a == b).any():
        row = np.flatnonzero(a == b)[0]
        raise ValueError(f"{source}, row {table.index[row]}, field 'model_b': model {a[row]!r} compared with itself")
    return pd.DataFrame({"model_a": a, "model_b": b, "outcome": outcome}, index=table.index)


def rated_models(table: pd.DataFrame, models: Sequence[str] | None, source: str) -> list[str]:
    """The sorted names to rate: ``models`` (each must appear in a comparison, and every compared model must be
    among them), or every model seen."""
    seen = set(table["model_a"]) | set(table["model_b"])
    if models is None:
        return sorted(seen)
    models = [str(m) for m in models]
    unknown = {field: ~table[field].isin(models).to_numpy() for field in ("model_a", "model_b")}
    if (unknown["model_a"] | unknown["model_b"]).any():
        row = np.flatnonzero(unknown["model_a"] | unknown["model_b"])[0]
        field = "model_a" if unknown["model_a"][row] else "model_b"
        raise ValueError(f"{source}, row {table.index[row]}, field '{field}': model {table[field].iloc[row]!r} "
                         f"is not among the expected models {models}")
    absent = [m for m in models if m not in seen]
    if absent:
        raise ValueError(f"{source}: model(s) {absent} have no comparisons; a rating needs at least one comparison "
                         "(drop them from `models` or add their comparisons)")
    return sorted(models)


def braced(names: list[str], members: list[int]) -> str:
    """The named members of a group of models, as ``{a, b}`` for messages."""
    return "{" + ", ".join(names[m] for m in members) + "}"


def comparison_components(i: np.ndarray, j: np.ndarray, k: int, directed: bool) -> list[list[int]]:
    """The (strongly, when ``directed``) connected components of the graph on ``k`` models with edges i -> j,
    each a sorted list of model indices, in sorted order."""
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(k, k))
    _, labels = connected_components(graph, directed=directed, connection="strong")
    return sorted([np.flatnonzero(labels == c).tolist() for c in np.unique(labels)])
