"""Online DPO: the DPO loss on pairs sampled from the *current* policy and labelled by a judge at every step
(Guo et al., 2024, "Direct language model alignment from online AI feedback"; trl's ``OnlineDPOTrainer``).

Offline DPO learns from pairs of π_ref's samples, labelled once. Online DPO keeps the loss and the fixed reference
and changes only where the pairs come from: each step takes RLOO's rollout (the same prefixes per step, ``k``
samples of each from the policy being trained, the same sampling seeds, :mod:`dpolab.baselines.rollout`), asks the
judge once per sample, turns each prefix's samples into pairs, and takes one AdamW step on

    L = mean over the step's pairs of ℓ_DPO(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

(paper Eq. 7 for ``loss_type="sigmoid"``; any loss of :data:`dpolab.losses.LOSSES` that reads the four log-prob
tensors). So it uses exactly as many reward queries per step as RLOO, but sees only their order, not their size.
Every sample is scored once under the policy (with grad) and once under π_ref; a sample in several pairs reuses
its log-probs. Pairs whose two rewards are equal are dropped and counted (a step with none takes no step).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpolab.baselines.rollout import DEFAULT_ROLLOUT, RolloutSettings, prompt_order, rollout
from dpolab.data.batch import to_device
from dpolab.data.device import module_device
from dpolab.data.tokenize import pad_token_id
from dpolab.logprobs import sequence_forward
from dpolab.losses import get_loss
from dpolab.sample.completions import completion_batch, completion_logprobs

PAIR_STRATEGIES = ("all_pairs", "best_vs_worst")


def online_pairs(rewards: np.ndarray, strategy: str = "all_pairs") -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs of one step's samples: flat indices (into the P·k samples, prompt by prompt) of the chosen and the
    rejected sample of every pair, and the number of candidate pairs dropped as ties.

    ``all_pairs``: every two samples of a prefix, the higher reward chosen. ``best_vs_worst``: per prefix the first
    sample with the highest reward against the first with the lowest. Shape: rewards (P, k) -> (n,), (n,), int.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {list(PAIR_STRATEGIES)}")
    rewards = np.asarray(rewards, dtype=np.float64)
    chosen, rejected, ties = [], [], 0
    for p, row in enumerate(rewards):
        if strategy == "all_pairs":
            candidates = itertools.combinations(range(len(row)), 2)
        else:
            candidates = [(int(np.argmax(row)), int(np.argmin(row)))]
        for i, j in candidates:
            if row[i] == row[j]:
                ties += 1
                continue
            w, lose = (i, j) if row[i] > row[j] else (j, i)
            chosen.append(p * len(row) + w)
            rejected.append(p * len(row) + lose)
    return np.array(chosen, dtype=np.int64), np.array(rejected, dtype=np.int64), ties


def online_dpo_train(policy, reference, tokenizer, prompts: Sequence[str],
                     reward_fn: Callable[[list[str]], np.ndarray], settings: RolloutSettings = DEFAULT_ROLLOUT, *,
                     beta: float = 0.1, loss_type: str = "sigmoid", pair_strategy: str = "all_pairs",
                     on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``policy`` in place with online DPO against the fixed ``reference``; return one record per step.

    Names follow trl's ``OnlineDPOConfig`` (``beta``, ``loss_type``, ``max_new_tokens``); the rollout settings are
    RLOO's (the same :class:`~dpolab.baselines.rollout.RolloutSettings` as :func:`dpolab.baselines.rloo.rloo_train`),
    so both arms make ``prompts_per_step · k`` reward queries a step. The record has trl's ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, the judge's mean ``reward``, the samples' ``kl``, and ``pairs`` / ``ties``.
    """
    from tqdm.auto import tqdm

    k = settings.k
    if k < 2:
        raise ValueError(f"online DPO needs k >= 2 samples per prompt to form a pair, got k={k}")
    loss_fn = get_loss(loss_type)
    pad = pad_token_id(tokenizer)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    order = prompt_order(len(prompts), settings.seed)
    device = module_device(policy)  # π_ref's log-probs come back on the CPU
    history = []
    policy.eval()  # dropout off, as in the DPO trainer; gradients flow as usual
    for step in tqdm(range(settings.steps), desc="online dpo", disable=not settings.progress):
        samples, reward = rollout(policy, tokenizer, prompts, order, step, reward_fn, settings)
        chosen, rejected, ties = online_pairs(reward.view(-1, k).numpy(), pair_strategy)
        ref_logps = completion_logprobs(reference, samples, pad).view(-1).to(device)
        record = {"step": step + 1, "reward": reward.mean().item(), "pairs": len(chosen), "ties": ties}
        if len(chosen):
            logps, _ = sequence_forward(policy, to_device(completion_batch(samples, pad), device))
            c, r = torch.as_tensor(chosen, device=device), torch.as_tensor(rejected, device=device)
            losses, chosen_rewards, rejected_rewards = loss_fn(logps[c], logps[r], ref_logps[c], ref_logps[r],
                                                               beta=beta)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            margins = chosen_rewards - rejected_rewards
            record.update({"loss": loss.item(), "rewards/chosen": chosen_rewards.mean().item(),
                           "rewards/rejected": rejected_rewards.mean().item(), "rewards/margins": margins.mean().item(),
                           "rewards/accuracies": (margins > 0).float().mean().item(), "grad_norm": float(grad_norm),
                           "kl": (logps.detach() - ref_logps).mean().item()})
        else:
            record["kl"] = (samples.model_logps.view(-1) - ref_logps.cpu()).mean().item()
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
    return history
