"""Synthetic preference pairs: N scored samples per prompt become (prompt, chosen, rejected) rows.

Strategies, per prompt with samples y_1..y_N and reward scores s_1..s_N:

- ``best_vs_worst``: one pair, the highest-scored sample (the first of equals) over the lowest.
- ``all_pairs``: every unordered pair {y_i, y_j}, the higher-scored one chosen: N(N−1)/2 candidates. The
  DPO paper's choice for controlled sentiment generation (§6.1).
- ``bradley_terry``: every pair, with the label *sampled* from the Bradley–Terry model,
  P(y_i ≻ y_j) = σ((s_i − s_j) / T); the row's ``confidence`` is σ((s_chosen − s_rejected) / T), the
  model's probability of the label that was drawn (below ½ when the less-rewarded sample was drawn).

A pair whose scores differ by no more than ``tie_margin`` is a tie: it carries no preference, so it is
dropped and counted. Deterministic rows have confidence 1.

A saved pair set is a folder with the ``datasets`` table in ``data/`` and ``metadata.json`` beside it
(the settings that produced it, the counts, and a SHA-256 of the rows), built in a temporary folder and
renamed into place (:func:`dpolab.data.cache.build_artifact`), so a later run can tell whether it is reusing
the same pairs and a crash never leaves a half-written set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dpolab.data.cache import build_artifact, is_complete

STRATEGIES = ("best_vs_worst", "all_pairs", "bradley_terry")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PairStats:
    """What :func:`build_pairs` kept and dropped."""

    strategy: str
    num_prompts: int
    candidate_pairs: int  # pairs considered, ties included
    num_pairs: int  # rows in the dataset
    ties: int  # candidate pairs dropped because |s_a − s_b| <= tie_margin
    prompts_without_pairs: int  # prompts whose candidates were all ties

    def to_dict(self) -> dict:
        return asdict(self)


def check_pair_request(n: int, strategy: str, *, bt_temperature: float = 1.0, tie_margin: float = 0.0) -> None:
    """Validate pair-building settings before any sampling (``n``: samples per prompt)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"building preference pairs needs n >= 2 samples per prompt, got n={n!r}")
    if not bt_temperature > 0:
        raise ValueError(f"bt_temperature must be > 0, got {bt_temperature!r}")
    if not tie_margin >= 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin!r}")


def _candidates(scores: np.ndarray, strategy: str) -> list[tuple[int, int]]:
    """Candidate (a, b) index pairs of one prompt, ``a`` the higher-or-equal scored for deterministic strategies."""
    if strategy == "best_vs_worst":
        return [(int(np.argmax(scores)), int(np.argmin(scores)))]
    pairs = itertools.combinations(range(len(scores)), 2)
    if strategy == "all_pairs":
        return [(i, j) if scores[i] >= scores[j] else (j, i) for i, j in pairs]
    return list(pairs)


def bt_probability(score_a: float, score_b: float, temperature: float = 1.0) -> float:
    """Bradley–Terry P(a ≻ b) = σ((s_a − s_b) / T)."""
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / temperature))


def build_pairs(
    prompts: Sequence,
    completions: Sequence[Sequence[str]],
    scores,
    strategy: str = "best_vs_worst",
    seed: int = 0,
    *,
    bt_temperature: float = 1.0,
    tie_margin: float = 0.0,
):
    """Preference pairs from scored samples.

    Args:
        prompts: ``P`` prompts: texts, or message lists (then chosen/rejected become ``[{"role": "assistant",
            "content": text}]``, the conversational format of :class:`dpolab.data.records.PreferenceExample`).
        completions: ``completions[p]``, the samples of prompt ``p`` (at least 2 each).
        scores: ``scores[p][i]``, the reward of ``completions[p][i]`` (array (P, N) or nested lists).
        strategy: ``"best_vs_worst"``, ``"all_pairs"`` or ``"bradley_terry"``.
        seed: Bradley–Terry labels are drawn from a generator seeded by (seed, prompt index).
        bt_temperature: T in σ((s_a − s_b) / T) for ``bradley_terry``.
        tie_margin: pairs with |s_a − s_b| <= tie_margin are ties, dropped and counted.

    Returns:
        ``(dataset, stats)``: a ``datasets.Dataset`` with columns prompt, chosen, rejected, chosen_score,
        rejected_score, confidence (rows ordered by prompt, then pair), and a :class:`PairStats`.
    """
    from datasets import Dataset, Features, List, Value

    check_pair_request(2, strategy, bt_temperature=bt_temperature, tie_margin=tie_margin)
    prompts, completions = list(prompts), [list(row) for row in completions]
    if not prompts:
        raise ValueError("no prompts: nothing to build pairs from")
    if len(completions) != len(prompts) or len(scores) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} rows of completions, {len(scores)} rows of "
                         "scores: one row of each per prompt")
    chat = not isinstance(prompts[0], str)
    rows = {k: [] for k in ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "confidence")}
    candidate_count = ties = empty = 0
    for p, (prompt, texts) in enumerate(zip(prompts, completions)):
        row_scores = np.asarray(scores[p], dtype=np.float64)
        _check_prompt_row(p, prompt, texts, row_scores, chat)
        rng = np.random.default_rng([seed, p])
        kept = 0
        for a, b in _candidates(row_scores, strategy):
            candidate_count += 1
            if abs(row_scores[a] - row_scores[b]) <= tie_margin:
                ties += 1
                continue
            confidence = 1.0
            if strategy == "bradley_terry":
                if rng.random() >= bt_probability(row_scores[a], row_scores[b], bt_temperature):
                    a, b = b, a
                confidence = bt_probability(row_scores[a], row_scores[b], bt_temperature)
            kept += 1
            rows["prompt"].append([dict(m) for m in prompt] if chat else prompt)
            for column, i in (("chosen", a), ("rejected", b)):
                rows[column].append([{"role": "assistant", "content": texts[i]}] if chat else texts[i])
                rows[f"{column}_score"].append(float(row_scores[i]))
            rows["confidence"].append(confidence)
        empty += kept == 0
    message = List({"role": Value("string"), "content": Value("string")})
    text = message if chat else Value("string")
    features = Features({"prompt": text, "chosen": text, "rejected": text, "chosen_score": Value("float64"),
                         "rejected_score": Value("float64"), "confidence": Value("float64")})
    stats = PairStats(strategy, len(prompts), candidate_count, len(rows["prompt"]), ties, empty)
    return Dataset.from_dict(rows, features=features), stats


def _check_prompt_row(p: int, prompt, texts: list, row_scores: np.ndarray, chat: bool) -> None:
    if chat == isinstance(prompt, str):
        raise ValueError(f"prompt {p}: mixes text and message-list prompts (prompt 0 is "
                         f"{'a message list' if chat else 'a text'})")
    if len(texts) < 2:
        raise ValueError(f"prompt {p}: {len(texts)} completion(s); a preference pair needs at least 2")
    if row_scores.shape != (len(texts),):
        raise ValueError(f"prompt {p}: {row_scores.size} scores for {len(texts)} completions")
    for i, (t, s) in enumerate(zip(texts, row_scores)):
        if not isinstance(t, str):
            raise ValueError(f"prompt {p}, completion {i}: expected a text, got {type(t).__name__}")
        if not np.isfinite(s):
            raise ValueError(f"prompt {p}, completion {i}, field 'score': {s} for text {t[:120]!r}")


def rows_hash(dataset) -> str:
    """SHA-256 of a dataset's rows (column names and values, in order), stable across save and load."""
    h = hashlib.sha256(json.dumps(dataset.column_names).encode())
    for row in dataset:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def json_hash(obj) -> str:
    """SHA-256 of an object's canonical JSON (e.g. the prompt list, to record which prompts were used)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def pair_settings(*, generator: str, judge: str, sampling: dict, strategy: str, seed: int, prompts: Sequence,
                  **extra) -> dict:
    """The settings that define a pair set, in the shape :func:`save_pairs` records and :func:`pairs_match` checks.

    ``prompts`` are recorded by count and :func:`json_hash`; ``sampling`` is e.g. ``Samples.settings``.
    """
    return _normalise({"generator": generator, "judge": judge, "sampling": dict(sampling), "strategy": strategy,
                       "seed": seed, "num_prompts": len(prompts), "prompts_sha256": json_hash(list(prompts)),
                       **extra})


def _normalise(settings: dict) -> dict:
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except TypeError as err:
        raise TypeError(f"pair settings must be JSON-serialisable (str, number, bool, None, list, dict): {err}") from err


def save_dataset(dataset, path: str | Path) -> None:
    """``dataset.save_to_disk(path)`` without datasets' "Saving the dataset (1/1 shards)" bar, which says nothing for
    the kit's small datasets (saved in well under a second) and filled ``dpolab reproduce`` and executed notebooks;
    the bar's setting is restored afterwards."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if enabled:
            enable_progress_bar()


def save_pairs(dataset, folder, settings: dict, stats: PairStats | None = None, *, overwrite: bool = False) -> Path:
    """Save pairs with ``metadata.json`` (settings, counts, row hash) atomically; return the folder.

    ``settings`` is what defines the pairs: generator model, reward function name, sampling settings,
    strategy, seed, which prompts... (JSON values). Saving the same rows with the same settings again
    is a no-op; a folder holding other pairs is replaced only with ``overwrite=True``.
    """
    folder, settings = Path(folder), _normalise(settings)
    content_hash = rows_hash(dataset)
    metadata = {"format_version": FORMAT_VERSION, "settings": settings, "num_rows": dataset.num_rows,
                "columns": dataset.column_names, "content_hash": content_hash,
                "stats": stats.to_dict() if stats is not None else None}

    def build(tmp: Path) -> None:
        save_dataset(dataset, tmp / "data")
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    if is_complete(folder):
        saved = read_metadata(folder)
        if saved.get("content_hash") == content_hash and saved.get("settings") == settings:
            return folder
        if not overwrite:
            reasons = pairs_mismatches(folder, settings) or ["the rows differ (content hash)"]
            raise FileExistsError(f"{folder} already holds other pairs ({'; '.join(reasons)}); pass overwrite=True "
                                  "to replace them or choose another folder")
        fresh = build_artifact(folder.with_name(f"{folder.name}.new-{os.getpid()}"), build, info=metadata)
        trash = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        os.replace(folder, trash)  # between these two renames there is no folder, never a mixed one
        os.replace(fresh, folder)
        shutil.rmtree(trash, ignore_errors=True)
        Path(str(fresh) + ".lock").unlink(missing_ok=True)
        return folder
    return build_artifact(folder, build, info=metadata)


def read_metadata(folder) -> dict:
    """The ``metadata.json`` of a saved pair set."""
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: no complete saved pairs (missing, or an interrupted save)")
    path = folder / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable pair metadata ({err}); delete the folder to rebuild it") from err


def load_pairs(folder):
    """Load saved pairs, verifying the rows against the saved hash; return ``(dataset, metadata)``."""
    from datasets import load_from_disk

    folder = Path(folder)
    metadata = read_metadata(folder)
    dataset = load_from_disk(str(folder / "data"))
    actual = rows_hash(dataset)
    if actual != metadata.get("content_hash"):
        raise ValueError(f"{folder}: the rows' content hash {actual[:16]}… does not match field 'content_hash' "
                         f"{str(metadata.get('content_hash'))[:16]}… of {folder / 'metadata.json'}; the pairs were "
                         "changed after saving. Delete the folder to rebuild them")
    return dataset, metadata


def pairs_mismatches(folder, settings: dict) -> list[str]:
    """Why the pairs saved in ``folder`` were not built with ``settings`` (an empty list: they were)."""
    folder = Path(folder)
    if not is_complete(folder):
        return [f"{folder}: no complete saved pairs"]
    saved, wanted = read_metadata(folder).get("settings", {}), _normalise(settings)

    def show(side: dict, key: str) -> str:
        return repr(side[key]) if key in side else "(absent)"

    return [f"{key}: saved {show(saved, key)}, requested {show(wanted, key)}"
            for key in sorted(set(saved) | set(wanted)) if show(saved, key) != show(wanted, key)]


def pairs_match(folder, settings: dict) -> bool:
    """True when ``folder`` holds complete saved pairs built with exactly ``settings``."""
    return not pairs_mismatches(folder, settings)
