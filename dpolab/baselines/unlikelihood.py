"""Unlikelihood training, the DPO paper's second IMDb baseline (§6.1; Welleck et al. 2019, arXiv 1908.04319).

The policy raises the likelihood of the preferred response and pushes every token of the dispreferred one
towards probability 0 with the unlikelihood term −log(1 − π(y_l,t | x, y_l,<t)). Unlike the DPO family it
needs per-token probabilities, not per-sequence sums, so it has its own loss function and a small loop here
(sampling-free, like SFT): the loss is per pair,

    L(x, y_w, y_l) = −(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t) − α (1/|y_l|) Σ_t log(1 − π(y_l,t | x, y_l,<t)),

and a step takes the mean over a batch of pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from dpolab.data.batch import IGNORE_INDEX, collate_sequences, to_device
from dpolab.data.device import module_device
from dpolab.logprobs import shift_labels, token_logprobs


def unlikelihood_loss(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                      rejected_mask: Tensor, alpha: float = 1.0) -> Tensor:
    """Per-pair unlikelihood loss from token log-probs (see the module docstring).

    Args:
        chosen_token_logps, rejected_token_logps: log π of each response token, any value where the mask is 0.
        chosen_mask, rejected_mask: 1 on the response tokens that count.
        alpha: weight of the unlikelihood term (1 in Welleck et al.).

    Shape: (B, T), (B, T), (B, T'), (B, T') -> (B,).
    """
    w_mask, l_mask = chosen_mask.to(chosen_token_logps.dtype), rejected_mask.to(rejected_token_logps.dtype)
    nll = -(chosen_token_logps * w_mask).sum(-1) / w_mask.sum(-1).clamp(min=1)
    # log(1 − p) = log(−expm1(log p)), exact for small p; log p is capped just below 0 so that p = 1 stays finite
    log_one_minus = torch.log(-torch.expm1(rejected_token_logps.clamp(max=-1e-6)))
    unlikely = -(log_one_minus * l_mask).sum(-1) / l_mask.sum(-1).clamp(min=1)
    return nll + alpha * unlikely


def response_token_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                         pad_token_id: int) -> tuple[Tensor, Tensor]:
    """log π of every response token (teacher-forced) and the mask of response positions. Shape: (N, T), (N, T)."""
    batch = to_device(collate_sequences(prompt_ids, response_ids, None, pad_token_id), module_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = shift_labels(batch.labels)
    return token_logprobs(logits, targets), targets != IGNORE_INDEX


def unlikelihood_train(policy, pairs, pad_token_id: int, *, steps: int, batch_size: int = 8, lr: float = 5e-5,
                       alpha: float = 1.0, seed: int = 0, progress: bool = True,
                       on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``policy`` in place on tokenized pairs (``dpolab.data.tokenize.TokenizedPair``); one record per step.

    Pairs are drawn in a seeded order (reshuffled each epoch), ``batch_size`` per AdamW step, gradient norm
    clipped at 10 as in :func:`dpolab.baselines.rloo.rloo_train`. ``on_step(step, record)`` runs after each step.
    """
    from tqdm.auto import tqdm

    if len(pairs) < batch_size:
        raise ValueError(f"{len(pairs)} pairs are fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = len(pairs) // batch_size
    order = rng.permutation(len(pairs))
    history = []
    policy.eval()  # dropout off, as in the DPO trainer; gradients flow as usual
    for step in tqdm(range(steps), desc="unlikelihood", disable=not progress):
        if step and step % per_epoch == 0:
            order = rng.permutation(len(pairs))
        take = [pairs[int(j)] for j in order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]]
        prompts = [list(p.prompt_ids) for p in take]
        chosen, chosen_mask = response_token_logps(policy, prompts, [list(p.chosen_ids) for p in take], pad_token_id)
        rejected, rejected_mask = response_token_logps(policy, prompts, [list(p.rejected_ids) for p in take],
                                                       pad_token_id)
        losses = unlikelihood_loss(chosen, chosen_mask, rejected, rejected_mask, alpha)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 10.0))
        optimizer.step()
        chosen, rejected = chosen.detach(), rejected.detach()
        n_w, n_l = chosen_mask.sum(-1).clamp(min=1), rejected_mask.sum(-1).clamp(min=1)
        record = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm,
                  "logps/chosen": float(((chosen * chosen_mask).sum(-1) / n_w).mean()),
                  "logps/rejected": float(((rejected * rejected_mask).sum(-1) / n_l).mean())}
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
    return history
