"""Evaluation during training: the objective and implicit-reward accuracy on held-out pairs, and KL(π‖π_ref).

The held-out metrics are the training metrics (same names with trl's ``eval_`` prefix) computed without
gradients on pairs the policy never trained on; ``eval_rewards/accuracies`` is the share of pairs whose chosen
response gets the higher implicit reward β log π_θ/π_ref (ties ½).

The KL estimate samples one completion per held-out prompt from the policy at temperature 1 over the
full vocabulary (so y ~ π_θ, as the estimator requires; :func:`dpolab.sample.generate.sample`) and averages
log π_θ(y|x) − log π_ref(y|x) (:func:`dpolab.rewards.sequence_kl`). It needs a reference *model*: a precomputed
reference has one only with a LoRA policy (the adapter switched off is π_ref), else the KL is skipped, as under
FSDP (sharded generation would need every process in step); ``eval_kl_note`` then says why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpolab.data.batch import collate_pairs, collate_sequences, length_bucketed_batches, pair_length, to_device
from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.fast.paths import DEFAULT_FAST_PATHS, FastPaths, pair_layout
from dpolab.rewards import sequence_kl
from dpolab.train.distributed import DistributedContext, all_gather_objects, all_reduce_sum, unwrap
from dpolab.train.metrics import EVAL_PREFIX
from dpolab.train.objective import STATS, Objective, batch_objective, mean_metrics


def heldout_metrics(model, reference, pairs: list[TokenizedPair], *, config, objective: Objective, pad_id: int,
                    ctx: DistributedContext, autocast, fast: FastPaths = DEFAULT_FAST_PATHS) -> dict[str, float]:
    """``eval_loss``, ``eval_rewards/*``, ``eval_logps/*``, ``eval_lengths/*`` of ``objective`` over all ``pairs``
    (batched as ``config`` says), the policy's forwards on the speed paths ``fast`` (the trainer's;
    :class:`dpolab.fast.paths.FastPaths`)."""
    layout = pair_layout(model, config.stage, fast)
    batches = length_bucketed_batches([pair_length(p, layout) for p in pairs], config.eval_batch_size, seed=0,
                                      shuffle=False)
    totals = None
    model.eval()
    with torch.no_grad():
        # FSDP gathers weights inside every forward, so all processes must run the same forwards: each
        # evaluates every batch and nothing is reduced; DDP processes split the batches.
        for rows in batches if config.fsdp else batches[ctx.rank :: ctx.world_size]:
            batch = to_device(collate_pairs([pairs[i] for i in rows], pad_id, index=rows), ctx.device)
            with autocast():
                _, sums = batch_objective(model, reference, batch, objective, fast=fast)
            totals = sums if totals is None else totals + sums
    if totals is None:  # more processes than evaluation batches
        totals = torch.zeros(len(STATS), dtype=torch.float64)
    return mean_metrics(totals if config.fsdp else all_reduce_sum(totals, ctx), config.stage, prefix=EVAL_PREFIX)


def sample_kl(model, reference, tokenizer, prompts: Sequence, *, config, ctx: DistributedContext,
              chat: bool) -> dict[str, float]:
    """``eval_kl`` (± ``eval_kl_se``) and ``eval_sample_length`` from one policy sample per prompt.

    When the estimate is unavailable, returns only ``eval_kl_note`` saying why (no prompts, no reference
    model, FSDP, or no :mod:`dpolab.sample.generate`).
    """
    why = ("no held-out prompts" if not prompts else
           "no reference model to score samples (reference 'none', or 'precomputed' without LoRA; use reference "
           "'copy' or lora_r > 0 for the KL estimate)"
           if reference is None or getattr(reference, "sequence_logps", None) is None else
           "not estimated under FSDP" if config.fsdp else None)
    try:
        from dpolab.sample.generate import sample
    except ImportError:
        why = why or "dpolab.sample.generate is not available"
    if why:
        return {"eval_kl_note": f"KL skipped: {why}"}
    policy = unwrap(model)
    share = list(prompts)[ctx.rank :: ctx.world_size]
    policy_logps, ref_logps, lengths = [], [], []
    if share:
        samples = sample(policy, tokenizer, share, 1, max_new_tokens=config.kl_max_new_tokens, temperature=1.0,
                         top_k=len(tokenizer), seed=config.seed + 7919 * ctx.rank, batch_size=config.eval_batch_size,
                         chat=chat, progress=False)
        completions = [row[0] for row in samples.token_ids]
        pad = pad_token_id(tokenizer)
        for start in range(0, len(completions), config.eval_batch_size):
            stop = start + config.eval_batch_size
            batch = collate_sequences(samples.prompt_ids[start:stop], completions[start:stop], None, pad)
            ref_logps += reference.sequence_logps(to_device(batch, ctx.device)).float().cpu().tolist()
        policy_logps = samples.model_logps[:, 0].tolist()
        lengths = [len(c) for c in completions]
    gathered = all_gather_objects((policy_logps, ref_logps, lengths), ctx)
    policy_all = torch.tensor([x for g in gathered for x in g[0]], dtype=torch.float64)
    ref_all = torch.tensor([x for g in gathered for x in g[1]], dtype=torch.float64)
    all_lengths = [x for g in gathered for x in g[2]]
    kl, kl_se = sequence_kl(policy_all, ref_all)
    return {"eval_kl": kl, "eval_kl_se": kl_se, "eval_sample_length": sum(all_lengths) / len(all_lengths)}

