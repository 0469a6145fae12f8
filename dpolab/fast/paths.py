"""Which speed paths a log-prob forward takes: one :class:`FastPaths` setting, narrowed to what a model allows.

Every path computes the same function as the slow reference (the model's logits at every position, then
:func:`dpolab.logprobs.sequence_logprobs`), and a test holds each to it. A path applies only where that has been
verified: a model family whose forward the tests check (:data:`SHARED_PROMPT_MODELS`), and for the paths that
own a parameter's gradient (the fused output layer, the sparse lookup) a single process with no wrapper in
between, since DDP and FSDP own the parameters and their gradients otherwise.

Callers pass the setting in (``fast=``); :func:`model_paths` looks under the model's wrappers once per forward
and decides every path at once.

On a GPU (see :data:`CUDA_STATUS`): the pair tree, the scored logits and the fused output layer are plain tensor
code and run on CUDA; ``tests/test_cuda_paths.py`` holds each to the readable path there, and is skipped on a
machine without CUDA. The sparse embedding gradient is CPU-only (its gain is CPU memory traffic), as is the glibc
allocator setting of :mod:`dpolab.fast.allocator`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.data.device import is_cpu
from dpolab.fast.embedding import tied_trained_embedding
from dpolab.fast.output_layer import fusable_output_weight

# Model families whose forward is verified (tests/test_pairtree.py) to honour a custom 4-D attention mask
# together with explicit position ids, and which have no other positional masking (no sliding window).
SHARED_PROMPT_MODELS = ("gpt2", "llama")


CUDA_STATUS = {
    "pair_tree": "runs on CUDA (a 4-D boolean mask with sdpa or eager attention); tests/test_cuda_paths.py",
    "scored_logits": "runs on CUDA (transformers' logits_to_keep); tests/test_cuda_paths.py",
    "fused_output_layer": "runs on CUDA (plain matmuls and logsumexp; off under autocast, as on the CPU); "
                          "tests/test_cuda_paths.py",
    "sparse_embedding": "off on CUDA: it saves a zero-fill and an add of a vocabulary-sized matrix in CPU memory "
                        "per micro-batch, which a GPU does in microseconds, while a sparse gradient costs a sort "
                        "(coalesce) there; never measured on a device",
    "fast_sampler": "runs on CUDA (dpolab.sample.decode; its uniforms are drawn on the CPU and moved, so the "
                    "completions are those of a CPU run up to float rounding); tests/test_cuda_paths.py",
    "keep_freed_memory": "off on CUDA: glibc's heap holds no tensor of a GPU run (dpolab.fast.allocator)",
}
"""Each speed path on a CUDA device: runs there (with the test that holds it to the readable path), or is off and
why. No test of these has run on a GPU yet (README, "GPU runs"): a CUDA run of the tests is the first check."""


@dataclass(frozen=True)
class FastPaths:
    """The speed paths a log-prob forward may take (where the model allows them). The default is all of them.

    Attributes:
        pair_tree: a pair runs as one tree-masked row, the prompt once (:mod:`dpolab.fast.pairtree`).
        scored_logits: the model's output layer runs only at the scored positions (``logits_to_keep``).
        fused_output_layer: dpolab applies the output layer to the hidden states itself
            (:mod:`dpolab.fast.output_layer`); single process, no wrapper.
        sparse_embedding: a tied input embedding that trains is looked up with a sparse gradient
            (:mod:`dpolab.fast.embedding`); single process, and only on the CPU (:data:`CUDA_STATUS`).
        grad_into_weight: the fused output layer adds its weight gradient into ``weight.grad`` itself, which
            saves a vocabulary-sized matrix; only for callers that run ``loss.backward()`` (the trainer turns it
            on), since ``torch.autograd.grad`` never reads ``.grad``.
    """

    pair_tree: bool = True
    scored_logits: bool = True
    fused_output_layer: bool = True
    sparse_embedding: bool = True
    grad_into_weight: bool = False

    @classmethod
    def off(cls) -> FastPaths:
        """No speed path: the slow reference (logits at every position, the model's own lookup and layers)."""
        return cls(**{f.name: False for f in dataclasses.fields(cls)})


DEFAULT_FAST_PATHS = FastPaths()  # the default of every forward: each speed path the model allows


@dataclass(frozen=True)
class ModelPaths:
    """The paths one forward of one model takes: a :class:`FastPaths` narrowed to what the model allows.

    Attributes:
        pair_tree: pairs may run on the tree layout.
        scored_logits: the model takes ``logits_to_keep`` and the setting allows it.
        output_weight: the output layer's weight when the fused output layer runs, else None.
        sparse_embedding: the tied embedding to look up with a sparse gradient, else None.
        grad_into_weight: as in :class:`FastPaths`.
        attention: the model's attention implementation (``"sdpa"``, ``"eager"``, ...) or None.
        vocab_size: the model's vocabulary (None when it has no transformers config).
    """

    pair_tree: bool
    scored_logits: bool
    output_weight: Tensor | None
    sparse_embedding: torch.nn.Embedding | None
    grad_into_weight: bool
    attention: str | None
    vocab_size: int | None

    @property
    def full_logits(self) -> bool:
        """Whether the model computes logits at every position (the slow reference path)."""
        return self.output_weight is None and not self.scored_logits


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP (``.module``) and PEFT (``.get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def single_process() -> bool:
    """No torch.distributed group: DDP and FSDP own the parameters (and their gradients) otherwise."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _verified_family(net) -> bool:
    return getattr(getattr(net, "config", None), "model_type", None) in SHARED_PROMPT_MODELS


def _shared_prompt(net) -> bool:
    return _verified_family(net) and getattr(net.config, "_attn_implementation", None) in ("sdpa", "eager")


def _takes_logits_to_keep(net) -> bool:
    forward = getattr(net, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def supports_shared_prompt(model) -> bool:
    """Whether ``model`` can run the tree layout: a known family with sdpa or eager attention."""
    return _shared_prompt(unwrap(model))


def supports_scored_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do, masks included)."""
    return _takes_logits_to_keep(unwrap(model))


def model_paths(model, fast: FastPaths) -> ModelPaths:
    """Decide every path of one forward of ``model`` (with the grad mode and autocast in force now)."""
    net = unwrap(model)
    config = getattr(net, "config", None)
    owns_grads = _verified_family(net) and single_process()  # FSDP2 shards in place: ``net is model`` is not enough
    weight = None
    if fast.fused_output_layer and owns_grads and net is model:
        weight = fusable_output_weight(net)
    embedding = None
    if fast.sparse_embedding and owns_grads and torch.is_grad_enabled():
        embedding = tied_trained_embedding(net)
        if embedding is not None and not is_cpu(embedding.weight.device):  # CPU-only (CUDA_STATUS)
            embedding = None
    return ModelPaths(pair_tree=fast.pair_tree and _shared_prompt(net),
                      scored_logits=fast.scored_logits and _takes_logits_to_keep(net), output_weight=weight,
                      sparse_embedding=embedding, grad_into_weight=fast.grad_into_weight,
                      attention=getattr(config, "_attn_implementation", None),
                      vocab_size=getattr(config, "vocab_size", None))


def pair_layout(model, stage: str = "dpo", fast: FastPaths = DEFAULT_FAST_PATHS) -> str:
    """How ``model``'s pair batches run in ``stage``: ``"tree"`` (DPO through
    :func:`dpolab.logprobs.concatenated_forward` on a supported model) or ``"rows"`` (SFT scores prompt + chosen
    rows); for :func:`dpolab.data.batch.pair_length`, so that batches are bucketed by the width they will have."""
    return "tree" if stage == "dpo" and fast.pair_tree and supports_shared_prompt(model) else "rows"
