"""One row per pair: the shared prompt once, then the chosen and the rejected response as two branches.

:func:`dpolab.logprobs.concatenated_forward` scores a :class:`dpolab.data.batch.PairBatch` of 2B rows (B prompt +
chosen, B prompt + rejected). Every prompt token then runs through the network twice, and each row is padded
to the longest of the 2B. :func:`pair_tree` lays the same batch out as B rows::

    [ prompt (s tokens) | chosen continuation | rejected continuation | padding ]
      positions 0..s-1    positions s..Lc-1     positions s..Lr-1

with an attention mask that makes it a tree: a prompt token sees the earlier prompt tokens; a chosen token
sees the prompt and the earlier chosen tokens, never a rejected one, and vice versa. Position ids restart at
s on the rejected branch, so every token has the position, the keys and the values it has in its own row of
the 2B layout: the log-probs are the same function (equal up to float rounding, not bit for bit, since the
matrix products have other shapes). The network runs on Σ (Lc + Lr - s) positions instead of 2B · max L.

The shared prefix ``s`` of a pair is the longest common prefix of its two rows, cut before the first scored
label of either, so no scored token lies in it. The last prefix position predicts the first token of both
branches; its hidden state is used twice. :func:`tree_forward` runs the model on the layout and scores every
token; ``tests/test_pairtree.py`` holds it equal to the 2B-row full-logits path (values and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.data.labels import IGNORE_INDEX
from dpolab.fast.embedding import token_inputs
from dpolab.fast.output_layer import scored_logprobs
from dpolab.fast.paths import ModelPaths


@dataclass
class PairTree:
    """A pair batch as B tree-masked rows, and where each scored token of the 2B-row batch is predicted.

    Attributes:
        input_ids: Shape: (B, W).
        position_ids: the position each token has in its own prompt + response row. Shape: (B, W).
        allowed: ``allowed[k, q, j]``: query q of row k may attend to key j. Padding queries see only
            themselves (a row of the softmax is never empty). Shape: (B, W, W).
        predictor: for every scored token of the 2B-row batch (row-major order), the flat index
            ``k * W + column`` of the tree position whose output predicts it. Shape: (M,).
        targets: the scored token ids, same order. Shape: (M,).
        source_row: the row (0..2B-1) of the 2B-row batch each scored token belongs to. Shape: (M,).
        shared: the shared prefix length of each pair. Shape: (B,).
        lengths: real (non-padding) positions of each tree row, Lc + Lr - s. Shape: (B,).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    predictor: Tensor
    targets: Tensor
    source_row: Tensor
    shared: Tensor
    lengths: Tensor


def pair_tree(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> PairTree | None:
    """The tree layout of a 2B-row pair batch (fields as in :class:`dpolab.data.batch.PairBatch`), or None when the
    batch is not right-padded (the layout assumes each row's real tokens come first).

    Shape: (2B, T) each -> PairTree with rows of width W = max_k (Lc_k + Lr_k - s_k).
    """
    n, width = input_ids.shape
    b = n // 2
    device = input_ids.device
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    cols = torch.arange(width, device=device)
    if not torch.equal(mask, cols[None, :] < lengths[:, None]):
        return None
    scored = labels != IGNORE_INDEX
    scored[:, 0] = False  # a label in column 0 has no predecessor and is never scored
    first_label = torch.where(scored.any(-1), scored.float().argmax(-1), lengths)  # first scored column
    common = ((input_ids[:b] == input_ids[b:]) & mask[:b] & mask[b:]).long().cumprod(-1).sum(-1)
    shared = torch.minimum(common, torch.minimum(first_label[:b], first_label[b:]))  # (B,)
    len_c, len_r = lengths[:b], lengths[b:]
    tree_len = len_c + len_r - shared
    tree_width = int(tree_len.max())

    # each tree column's source: the chosen row for columns < Lc, the rejected row (shifted) after that
    t = torch.arange(tree_width, device=device)[None, :]  # (1, W)
    in_chosen = t < len_c[:, None]
    real = t < tree_len[:, None]
    src_col = torch.where(in_chosen, t, t - len_c[:, None] + shared[:, None])  # = the position id
    src_row = torch.where(in_chosen, torch.arange(b, device=device)[:, None], torch.arange(b, n, device=device)[:, None])
    src_col = torch.where(real, src_col, 0)
    tree_ids = input_ids[src_row, src_col]
    # branch of each column: 0 prompt, 1 chosen, 2 rejected, -1 padding
    branch = torch.where(t < shared[:, None], 0, torch.where(in_chosen, 1, 2))
    branch = torch.where(real, branch, -1)
    positions = src_col
    same_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    earlier = positions[:, None, :] <= positions[:, :, None]
    allowed = same_branch & earlier & real[:, None, :] & real[:, :, None]
    allowed |= torch.eye(tree_width, dtype=torch.bool, device=device)[None] & ~real[:, :, None]

    # scored token (row r, column j) is predicted by column j - 1 of row r, i.e. tree column j - 1 of pair r % B
    # on the chosen side and in the prefix; shifted by Lc - s on the rejected branch
    rows, label_cols = scored.nonzero(as_tuple=True)
    pair = rows % b
    before = label_cols - 1
    on_rejected = (rows >= b) & (before >= shared[pair])
    tree_col = torch.where(on_rejected, before + len_c[pair] - shared[pair], before)
    return PairTree(tree_ids, positions, allowed, pair * tree_width + tree_col, labels[rows, label_cols], rows,
                    shared, tree_len)


def tree_forward(model, tree: PairTree, paths: ModelPaths, with_stats: bool = False) -> tuple[Tensor, Tensor | None]:
    """log π of every scored token of the 2B-row batch, from one forward of ``model`` on its tree layout, in the
    order of ``tree.targets`` (sum them per ``tree.source_row``). ``paths`` says how the output layer runs;
    ``with_stats`` adds each token's mean logit and entropy (as :func:`dpolab.fast.output_layer.scored_logprobs`).

    Shape: PairTree of B rows -> ((M,), (M, 2) or None).
    """
    if paths.attention == "sdpa":
        mask = tree.allowed[:, None]
    else:  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(tree.allowed.shape, dtype=dtype, device=tree.allowed.device)
        mask = mask.masked_fill_(~tree.allowed, torch.finfo(dtype).min)[:, None]
    inputs = {**token_inputs(tree.input_ids, paths.sparse_embedding), "attention_mask": mask,
              "position_ids": tree.position_ids, "use_cache": False}
    keep = torch.zeros(tree.input_ids.numel(), dtype=torch.bool, device=tree.input_ids.device)
    keep[tree.predictor] = True
    rows = (keep.cumsum(0) - 1)[tree.predictor]  # predictor position -> its row among the kept positions
    return scored_logprobs(model, inputs, keep.view(tree.input_ids.shape), rows, tree.targets,
                           weight=paths.output_weight, scored_logits=paths.scored_logits,
                           grad_into_weight=paths.grad_into_weight, with_stats=with_stats)
