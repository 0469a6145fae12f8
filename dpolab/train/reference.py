"""The reference policy π_ref, three ways (paper Eq. 7 needs only its log-probs of the training responses).

- :class:`FrozenReference`: a separate model (a deep copy of the initial policy, or the SFT model given),
  in eval mode with gradients off. Costs a second copy of the weights.
- :class:`AdapterReference`: the policy itself with its peft LoRA adapter switched off; the frozen base
  weights *are* π_ref, so nothing is held twice (for models too large to hold twice).
  :class:`StartingAdapterReference`: when the policy already carried an adapter (LoRA SFT, then LoRA DPO),
  π_ref is the policy with the adapter's *starting* weights (a copy of the adapter only), not the bare base.
- precomputed: log π_ref of every training response, computed once and stored as a content-addressed cache
  artifact (:mod:`dpolab.train.reference_table`). It has no model, so it cannot score new samples.

:func:`policy_and_references` picks among them as a training config asks. Every strategy is a
:class:`Reference`: it returns :class:`dpolab.logprobs.PairLogps` without autograd history. The model-based ones
take the speed paths of their forwards as a :class:`dpolab.fast.paths.FastPaths` (default: all that the model allows).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from dpolab.data.batch import PairBatch, SequenceBatch
from dpolab.data.prepare import tokenize_config
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths
from dpolab.logprobs import PairLogps, concatenated_forward, sequence_forward
from dpolab.models.lora import add_lora
from dpolab.train.reference_table import precompute_reference
from dpolab.train.token_scores import token_scores


@runtime_checkable
class Reference(Protocol):
    """π_ref as the objective reads it: what the four strategies (:class:`FrozenReference`,
    :class:`AdapterReference`, :class:`StartingAdapterReference`,
    :class:`~dpolab.train.reference_table.PrecomputedReference`) have in common.

    Beyond it, by strategy: ``token_logps`` (per-token log-probs, for LD-DPO) on the model-based ones, and
    ``mix_in`` (TR-DPO's update) on a reference with weights of its own.
    """

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        """Summed log π_ref of the chosen and rejected responses of a batch, no autograd history. Shape: (B,) each."""
        ...

    sequence_logps: Callable[[SequenceBatch], torch.Tensor] | None
    """Summed log π_ref of new responses (samples, for the KL), or None where there is no model to score them."""


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
    """Within the block ``module`` is in eval mode (dropout off); each submodule's mode is restored afterwards (the
    policy's LoRA dropout is on during a training step: :func:`dpolab.models.lora.adapter_dropout`)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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


def make_reference(kind: str, policy: torch.nn.Module, reference_model: torch.nn.Module | None = None, *,
                   adapter_start: bool = False, fast: FastPaths = DEFAULT_FAST_PATHS) -> Reference | None:
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


def policy_and_references(config, ctx, model, tokenizer, reference_model, train_data, eval_data,
                          fast: FastPaths = DEFAULT_FAST_PATHS
                          ) -> tuple[torch.nn.Module, Reference | None, Reference | None]:
    """The policy on its device (in eval mode: dropout off; a LoRA adapter added if asked), and π_ref for
    training and for evaluation as ``config.reference`` asks, taken from the initial weights (before a resumed run
    loads its own). ``train_data``/``eval_data`` are :class:`dpolab.data.prepare.PairData` (a precomputed table
    covers their pairs); ``ctx`` is the :class:`dpolab.train.distributed.DistributedContext`.

    Returns:
        ``(policy, train_reference, eval_reference)``; a reference is None where none is needed (SFT trains
        without one, reference "none", or no evaluation pairs for a precomputed table).
    """
    model = model.to(ctx.device).eval()
    if reference_model is not None:
        reference_model = reference_model.to(ctx.device).eval()
    train_ref = eval_ref = None
    if config.reference == "copy":
        train_ref = eval_ref = make_reference("copy", model, reference_model, fast=fast)
    elif config.reference == "precomputed":
        source = model if reference_model is None else reference_model
        settings = tokenize_config(config)
        # same precision as the policy's forward passes, so that at θ = θ_ref every margin is 0
        train_ref, eval_ref = (precompute_reference(source, tokenizer, data.pairs, tokenize_config=settings,
                                                    batch_size=config.eval_batch_size, precision=config.precision,
                                                    fast=fast)
                               if data.pairs else None for data in (train_data, eval_data))
    had_adapter = hasattr(model, "disable_adapter")  # e.g. LoRA SFT, then LoRA DPO: π_ref is the SFT adapter
    if config.lora_r:
        model = add_lora(model, config.lora_r, config.lora_alpha, target_modules=config.lora_target_modules,
                         dropout=config.lora_dropout, bias=config.lora_bias, use_rslora=config.use_rslora,
                         use_dora=config.use_dora, modules_to_save=config.lora_modules_to_save,
                         revision=config.model_revision).to(ctx.device).eval()
    if config.reference == "adapter":
        train_ref = eval_ref = make_reference("adapter", model, adapter_start=had_adapter, fast=fast)
    if (config.reference == "precomputed" and config.lora_r and config.lora_bias == "none" and not had_adapter
            and reference_model is None and eval_ref is not None):
        # the table came from the base weights, which the adapter switched off gives back: KL samples cost nothing
        eval_ref.sequence_logps = make_reference("adapter", model, fast=fast).sequence_logps
    if config.stage == "sft":
        train_ref = None  # the NLL needs no reference; evaluation still reports rewards and KL against it
    return model, train_ref, eval_ref
