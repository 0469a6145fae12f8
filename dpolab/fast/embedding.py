"""The token inputs of a forward, with a tied input embedding looked up with a sparse gradient.

When the input embedding is the output layer's matrix (tied, as in SmolLM2 and GPT-2) and trains, the output layer
already gives that matrix a dense gradient. The lookup's own gradient touches only the rows of the batch's tokens:
as a sparse tensor it is added into the dense one, instead of being materialised as a second vocabulary-sized
matrix (a zero-fill, a scatter and an add of 113 MB per micro-batch on SmolLM2). Same forward values; the same
gradient up to float summation order (``tests/test_logprobs.py`` compares it with the model's own lookup).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tied_trained_embedding(net: torch.nn.Module) -> torch.nn.Embedding | None:
    """``net``'s input embedding when it is a plain ``nn.Embedding`` that trains and is the output layer's matrix
    (the case the sparse lookup is for); else None. ``net`` is the transformers model under any wrapper."""
    embedding, output = net.get_input_embeddings(), net.get_output_embeddings()
    tied = (type(embedding) is torch.nn.Embedding and output is not None and output.weight is embedding.weight
            and embedding.weight.requires_grad and embedding.max_norm is None)
    return embedding if tied else None


def token_inputs(input_ids: Tensor, sparse_embedding: torch.nn.Embedding | None) -> dict[str, Tensor]:
    """``{"input_ids": ...}``, or ``{"inputs_embeds": ...}`` looked up in ``sparse_embedding`` with a sparse
    gradient (the same rows the model's own lookup returns). Shape: (N, T) -> (N, T) or (N, T, H)."""
    if sparse_embedding is None:
        return {"input_ids": input_ids}
    e = sparse_embedding
    return {"inputs_embeds": F.embedding(input_ids, e.weight, e.padding_idx, scale_grad_by_freq=e.scale_grad_by_freq,
                                         sparse=True)}
