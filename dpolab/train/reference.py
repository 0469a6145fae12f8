"""The reference policy π_ref, three ways (paper Eq. 7 needs only its log-probs of the training responses).

- :class:`FrozenReference`: a separate model (a deep copy of the initial policy, or the SFT model given),
  in eval mode with gradients off. Costs a second copy of the weights.
- :class:`AdapterReference`: the policy itself with its peft LoRA adapter switched off; the frozen base
  weights *are* π_ref, so nothing is held twice (for models too large to hold twice).
  :class:`StartingAdapterReference`: when the policy already carried an adapter (LoRA SFT, then LoRA DPO),
  π_ref is the policy with the adapter's *starting* weights (a copy of the adapter only), not the bare base.
- :class:`PrecomputedReference`: log π_ref of every training response, computed once and stored as a
  cache artifact keyed by a hash of (model weights, tokenizer, tokenized data, tokenization settings, the
  precision and batch size of the forward passes, torch and transformers versions). A β sweep or a second
  run with the same inputs reuses the file; any changed input gives a new key, so a stale table is never
  read. The table's SHA-256 is stored beside it and checked on every read; a damaged or altered table is
  rebuilt. It has no model, so it cannot score new samples (no KL estimate).

Every strategy returns :class:`dpolab.logprobs.PairLogps` without autograd history. The model-based ones take the
speed paths of their forwards as a :class:`dpolab.fast.paths.FastPaths` (default: all that the model allows).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.cache import build_artifact, cache_dir, sha256_file
from dpolab.data.batch import IGNORE_INDEX, PairBatch, SequenceBatch, collate_pairs, pair_length, to_device
from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, pair_layout
from dpolab.logprobs import PairLogps, concatenated_forward, sequence_forward, shift_labels
from dpolab.train.token_scores import token_scores

TABLE = "reference_logps.safetensors"
TABLE_DIGEST = "reference_logps.sha256"
KEY_VERSION = 2  # bump when the way reference log-probs are computed changes (2: passes in order of padded width,
#                 which changes batch composition and so the float rounding, by about 1e-7)


class FrozenReference:
    """π_ref as its own model: eval mode (dropout off), no gradients."""

    def __init__(self, model: torch.nn.Module, *, fast: FastPaths = DEFAULT_FAST_PATHS):
        self.model, self.fast = model.eval().requires_grad_(False), fast

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        """Summed log π_ref of the chosen and rejected responses of a batch. Shape: -> (B,) each."""
        with torch.no_grad():
            return concatenated_forward(self.model, batch, fast=self.fast).detach()

    def sequence_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Summed log π_ref of each row's response (e.g. policy samples). Shape: (N, T) -> (N,)."""
        with torch.no_grad():
            return sequence_forward(self.model, batch, fast=self.fast)[0]

    def token_logps(self, batch) -> torch.Tensor:
        """log π_ref of every scored token (LD-DPO), 0 elsewhere (:mod:`dpolab.train.token_scores`). Shape: (N, T)."""
        with torch.no_grad():
            return token_scores(self.model, batch).logps

    def mix_in(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO's soft update (Gorbatovski et al. 2024, arXiv 2404.09656): θ_ref ← α θ + (1 − α) θ_ref."""
        with torch.no_grad():
            for ref_param, param in zip(self.model.parameters(), policy.parameters(), strict=True):
                ref_param.mul_(1 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)


class AdapterReference(FrozenReference):
    """π_ref as the peft policy with its LoRA adapter disabled (the base weights are never trained)."""

    def __init__(self, policy: torch.nn.Module, *, fast: FastPaths = DEFAULT_FAST_PATHS):
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("reference='adapter' needs a peft model with a LoRA adapter (set lora_r > 0)")
        self.model, self.fast = policy, fast

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        with self._base():
            return super().pair_logps(batch)

    def sequence_logps(self, batch: SequenceBatch) -> torch.Tensor:
        with self._base():
            return super().sequence_logps(batch)

    def token_logps(self, batch) -> torch.Tensor:
        with self._base():
            return super().token_logps(batch)

    mix_in = None  # the reference is the policy's own base weights: nothing to synchronise

    @contextlib.contextmanager
    def _base(self):
        with _eval_mode(self.model), self.model.disable_adapter():
            yield


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Within the block ``module`` is in eval mode (dropout off); its mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _WithParams(torch.nn.Module):
    """``module`` called with some parameters replaced by ``params`` (torch.func.functional_call; nothing is
    modified in place, so autograd's saved tensors of the policy's own forward stay valid)."""

    def __init__(self, module: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = module, params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


class StartingAdapterReference(FrozenReference):
    """π_ref as the peft policy with its adapter at the weights it had when this reference was made.

    For a policy that already carries a trained adapter (LoRA SFT, then LoRA DPO): switching the adapter off
    would give the bare base model, not the SFT model the paper's reference is. Only the trainable (adapter)
    tensors are copied.
    """

    def __init__(self, policy: torch.nn.Module, *, fast: FastPaths = DEFAULT_FAST_PATHS):
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("StartingAdapterReference needs a peft model with a LoRA adapter")
        start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        self.model, self.fast = _WithParams(policy, start), fast

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        with _eval_mode(self.model.inner):
            return super().pair_logps(batch)

    def sequence_logps(self, batch: SequenceBatch) -> torch.Tensor:
        with _eval_mode(self.model.inner):
            return super().sequence_logps(batch)

    def mix_in(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO's soft update on the adapter's starting weights: θ_ref ← α θ + (1 − α) θ_ref (adapter tensors only)."""
        current = dict(policy.named_parameters())
        with torch.no_grad():
            for name, start in self.model.params.items():
                start.mul_(1 - alpha).add_(current[name].detach().to(start.dtype), alpha=alpha)


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
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    settings = dataclasses.asdict(tokenize_config) if dataclasses.is_dataclass(tokenize_config) else tokenize_config
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for pair in pairs:
        h.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.chosen_mask,
                             pair.rejected_mask]).encode())
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


def make_reference(kind: str, policy: torch.nn.Module, reference_model: torch.nn.Module | None = None, *,
                   adapter_start: bool = False, fast: FastPaths = DEFAULT_FAST_PATHS):
    """A model-based reference: ``"copy"`` (of ``reference_model`` if given, else of the policy now) or
    ``"adapter"`` (the adapter switched off, or with ``adapter_start`` at its current weights: for a policy that
    arrived with a trained adapter), its forwards on the speed paths ``fast``; None for ``"none"``.
    ``"precomputed"`` is built with :func:`precompute_reference`."""
    if kind == "copy":
        return FrozenReference(reference_model if reference_model is not None else copy.deepcopy(policy), fast=fast)
    if kind == "adapter":
        return (StartingAdapterReference if adapter_start else AdapterReference)(policy, fast=fast)
    if kind == "none":
        return None
    raise ValueError(f"make_reference: unknown kind {kind!r} (expected 'copy', 'adapter' or 'none')")


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = {"special": tokenizer.special_tokens_map, "template": getattr(tokenizer, "chat_template", None),
              "class": type(tokenizer).__name__}
    return hashlib.sha256((vocab + json.dumps(extras, sort_keys=True, default=str)).encode()).hexdigest()
