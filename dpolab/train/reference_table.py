"""π_ref precomputed: log π_ref of every training response, computed once and kept as a cache artifact.

The artifact is keyed by a hash of everything the numbers depend on (:func:`reference_key`: model weights,
tokenizer, tokenized data, tokenization settings, the precision, batch size and speed paths of the forward passes,
torch and transformers versions). A β sweep or a second run with the same inputs reuses the file; any changed input
gives a new key, so a stale table is never read. The table's SHA-256 is stored beside it and checked on every read;
a damaged or altered table is rebuilt. :class:`PrecomputedReference` has no model, so it cannot score new samples
(no KL estimate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.data.batch import IGNORE_INDEX, PairBatch, collate_pairs, pair_length, to_device
from dpolab.data.cache import build_artifact, cache_dir, sha256_file
from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, pair_layout
from dpolab.logprobs import PairLogps, concatenated_forward, shift_labels
from dpolab.train.fingerprint import hash_pairs, hash_weights

TABLE = "reference_logps.safetensors"
TABLE_DIGEST = "reference_logps.sha256"
KEY_VERSION = 2  # bump when the way reference log-probs are computed changes (2: passes in order of padded width,
#                 which changes batch composition and so the float rounding, by about 1e-7)


class PrecomputedReference:
    """π_ref log-probs read from a table indexed by the pairs' dataset positions (``PairBatch.index``)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, folder: Path | None = None):
        self.chosen, self.rejected, self.folder = chosen, rejected, folder

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        index = batch.index.cpu()
        if int(index.max()) >= len(self.chosen):
            raise IndexError(f"pair index {int(index.max())} is outside the precomputed table of {len(self.chosen)} "
                             f"pairs ({self.folder}); the batch comes from another dataset")
        lengths = (shift_labels(batch.labels) != IGNORE_INDEX).sum(-1)
        b = batch.num_pairs
        device = batch.input_ids.device
        return PairLogps(self.chosen[index].to(device), self.rejected[index].to(device), lengths[:b], lengths[b:])

    sequence_logps = None  # no model: new responses cannot be scored


def reference_key(model: torch.nn.Module, tokenizer, pairs: list[TokenizedPair], tokenize_config=None, *,
                  precision: str = "fp32", batch_size: int | None = None, fast: FastPaths = DEFAULT_FAST_PATHS) -> str:
    """SHA-256 of everything reference log-probs depend on: weights, tokenizer, tokenized data, settings, and
    what changes their rounding: the precision and batch size of the passes, the speed paths (when not the
    default, so that default keys stay as they were), the torch and transformers versions."""
    import transformers

    h = hashlib.sha256(f"dpolab-reference-v{KEY_VERSION}".encode())
    numerics = {"precision": precision, "batch_size": batch_size, "torch": torch.__version__,
                "transformers": transformers.__version__}
    if fast != DEFAULT_FAST_PATHS:
        numerics["fast_paths"] = dataclasses.asdict(fast)
    h.update(json.dumps(numerics, sort_keys=True).encode())
    hash_weights(h, model)
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    settings = dataclasses.asdict(tokenize_config) if dataclasses.is_dataclass(tokenize_config) else tokenize_config
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    hash_pairs(h, pairs)
    return h.hexdigest()


def precompute_reference(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[TokenizedPair],
    *,
    tokenize_config=None,
    batch_size: int = 8,
    root: Path | None = None,
    precision: str = "fp32",
    fast: FastPaths = DEFAULT_FAST_PATHS,
) -> PrecomputedReference:
    """Compute log π_ref of every pair once (or reuse the artifact computed before) and return the table.

    The forward passes take the pairs in order of their padded width (so batches carry little padding); the
    table is in dataset order.

    Args:
        model: π_ref (the initial policy, or the SFT model); it is not modified.
        tokenizer: its tokenizer (part of the key; its pad id is used for collation).
        pairs: the tokenized dataset; position i of the table belongs to ``pairs[i]``.
        tokenize_config: the settings that produced ``pairs`` (part of the key).
        batch_size: pairs per forward pass.
        root: cache folder for the artifacts (default ``cache_dir() / "reference_logps"``).
        precision: ``"fp32"``, or ``"bf16"`` to run the passes under the same bf16 autocast as the policy's
            (so that at θ = θ_ref the margins are 0, as with a model reference).
        fast: the speed paths of the passes (:class:`dpolab.fast.paths.FastPaths`).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    key = reference_key(model, tokenizer, pairs, tokenize_config, precision=precision, batch_size=batch_size,
                        fast=fast)
    folder = Path(root or cache_dir() / "reference_logps") / key
    pad = pad_token_id(tokenizer)

    def build(out: Path) -> None:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
        layout = pair_layout(model, fast=fast)
        order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i], layout))
        try:
            for start in range(0, len(pairs), batch_size):
                rows = order[start:start + batch_size]
                batch = to_device(collate_pairs([pairs[i] for i in rows], pad, index=rows), device)
                with torch.no_grad(), autocast:
                    logps = concatenated_forward(model, batch, fast=fast)
                chosen[rows], rejected[rows] = logps.chosen.float().cpu(), logps.rejected.float().cpu()
        finally:
            model.train(was_training)
        save_file({"chosen": chosen, "rejected": rejected}, str(out / TABLE))
        (out / TABLE_DIGEST).write_text(sha256_file(out / TABLE) + "\n")

    info = {"pairs": len(pairs), "key_version": KEY_VERSION, "precision": precision}
    for attempt in (1, 2):
        build_artifact(folder, build, info=info)
        problem = _table_problem(folder, len(pairs))
        if problem is None:
            break
        if attempt == 2:
            raise ValueError(f"{folder / TABLE}: {problem}, even after a rebuild; delete {folder} and run again")
        warnings.warn(f"reference cache {folder / TABLE}: {problem}; rebuilding it", RuntimeWarning, stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
    table = {k: v.clone() for k, v in load_file(str(folder / TABLE)).items()}  # in memory, not tied to the file
    return PrecomputedReference(table["chosen"], table["rejected"], folder)


def _table_problem(folder: Path, n_pairs: int) -> str | None:
    """Why the cached table in ``folder`` cannot be used (None if it can): missing, altered, unreadable, wrong size."""
    path, digest = folder / TABLE, folder / TABLE_DIGEST
    if not path.is_file() or not digest.is_file():
        return "the table or its digest is missing (written by an older dpolab, or damaged)"
    if sha256_file(path) != digest.read_text().strip():
        return "its SHA-256 does not match the one stored when it was written (damaged or altered)"
    try:
        table = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        return f"cannot be read ({type(err).__name__}: {err})"
    if set(table) != {"chosen", "rejected"} or len(table["chosen"]) != n_pairs or len(table["rejected"]) != n_pairs:
        return f"holds {({k: tuple(v.shape) for k, v in table.items()})} for a dataset of {n_pairs} pairs"
    if not all(bool(torch.isfinite(t).all()) for t in table.values()):
        return "holds non-finite log-probs"
    return None


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = {"special": tokenizer.special_tokens_map, "template": getattr(tokenizer, "chat_template", None),
              "class": type(tokenizer).__name__}
    return hashlib.sha256((vocab + json.dumps(extras, sort_keys=True, default=str)).encode()).hexdigest()
