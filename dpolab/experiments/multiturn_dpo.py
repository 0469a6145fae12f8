"""DPO on conversational pairs under a masking policy, and the check of which losses the policy leaves unchanged.

With a multi-turn response side [assistant, user, …, assistant], ``mask_policy="final_turn"`` scores the last
assistant turn and ``"all_assistant"`` every assistant turn (:mod:`dpolab.data.tokenize`). Sigmoid DPO (paper Eq. 7)
sees the responses only through h = β[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)]: turns that are the
same tokens in the same context on both sides add the same log-ratio to both terms and cancel, in value and
gradient. A length-normalised loss (SimPO) divides each side's sum by its own number of scored tokens, which the
extra turns change. :func:`masking_invariance` measures both on real weights.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass

import torch

from dpolab.data.batch import collate_pairs
from dpolab.data.records import PreferenceExample


@dataclass
class PolicyRun:
    """A DPO run on conversational pairs under one masking policy."""

    mask_policy: str
    policy: torch.nn.Module
    history: list[dict]
    pairs: list  # the TokenizedPairs it trained on (masks of its policy)
    train_accuracy: float  # implicit-reward accuracy on the training pairs after training, ties ½


def train_with_mask_policy(reference, tokenizer, examples: list[PreferenceExample], mask_policy: str,
                           **train_fields) -> PolicyRun:
    """Tokenize with ``mask_policy`` and train a copy of π_ref with DPO (:func:`dpolab.train.trainer.train`).

    ``train_fields`` are :class:`dpolab.train.config.TrainConfig` fields (beta, lr, max_steps, ...). The reference
    log-probs are precomputed once; checkpoints go to a temporary folder that is removed afterwards.
    """
    from dpolab.data.prepare import tokenize_config
    from dpolab.data.tokenize import tokenize_examples
    from dpolab.rewards import batch_logps, reward_accuracy
    from dpolab.train.config import TrainConfig
    from dpolab.train.reference_table import precompute_reference
    from dpolab.train.trainer import train

    folder = tempfile.mkdtemp(prefix=f"dpolab-{mask_policy}-")
    config = TrainConfig.load(None, {"max_length": 192, "max_prompt_length": 64, "reference": "precomputed",
                                     "kl_samples": 0, "progress": False, **train_fields, "mask_policy": mask_policy,
                                     "output_dir": folder, "overwrite": True})
    settings = tokenize_config(config)
    pairs, _ = tokenize_examples(examples, tokenizer, settings)
    try:
        policy = copy.deepcopy(reference).requires_grad_(True)  # a frozen reference copies frozen
        result = train(config, model=policy, tokenizer=tokenizer, reference_model=reference, train_pairs=pairs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = precompute_reference(reference, tokenizer, pairs, tokenize_config=settings)  # reuses the cached table
    pad = tokenizer.pad_token_id
    chosen, rejected = [], []
    for start in range(0, len(pairs), 8):
        logps, _ = batch_logps(result.model, collate_pairs(pairs[start:start + 8], pad))
        chosen.append(logps[:len(logps) // 2])
        rejected.append(logps[len(logps) // 2:])
    beta = config.beta
    accuracy = reward_accuracy(beta * (torch.cat(chosen) - table.chosen), beta * (torch.cat(rejected) - table.rejected))
    return PolicyRun(mask_policy, result.model, result.history, pairs, accuracy)


def masking_invariance(policy, reference, tokenizer, examples: list[PreferenceExample], *,
                       losses: tuple[str, ...] = ("sigmoid", "simpo"), beta: float = 0.1) -> list[dict]:
    """Loss and gradient of each loss under both masking policies, on the same pairs and weights.

    Returns one row per loss: the mean loss under ``final_turn`` and ``all_assistant``, their absolute
    difference, and ‖g_all − g_final‖ / ‖g_final‖ over every parameter gradient. The reference is wrapped in
    :class:`dpolab.train.reference.FrozenReference`, which switches off its ``requires_grad``; the policy's gradients
    are cleared afterwards.
    """
    from dpolab.data.tokenize import TokenizeConfig, tokenize_examples
    from dpolab.losses import needs_reference
    from dpolab.train.objective import Objective, batch_objective
    from dpolab.train.reference import FrozenReference

    frozen, rows = FrozenReference(reference), []
    params = [p for p in policy.parameters() if p.requires_grad]
    was_training = policy.training
    policy.eval()
    for name in losses:
        needs_ref = needs_reference(name)
        values, grads = {}, {}
        for mask_policy in ("final_turn", "all_assistant"):
            pairs, _ = tokenize_examples(examples, tokenizer, TokenizeConfig(max_length=192, mask_policy=mask_policy))
            batch = collate_pairs(pairs, tokenizer.pad_token_id)
            policy.zero_grad(set_to_none=True)
            loss, _ = batch_objective(policy, frozen if needs_ref else None, batch, Objective(losses=(name,), beta=beta))
            loss.mean().backward()
            values[mask_policy] = loss.detach().mean().item()
            grads[mask_policy] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        diff = sum(float((a - b).pow(2).sum()) for a, b in zip(grads["all_assistant"], grads["final_turn"]))
        norm = sum(float(g.pow(2).sum()) for g in grads["final_turn"])
        rows.append({"loss": name, "final_turn": values["final_turn"], "all_assistant": values["all_assistant"],
                     "loss_difference": abs(values["all_assistant"] - values["final_turn"]),
                     "gradient_relative_difference": (diff / norm) ** 0.5})
    policy.zero_grad(set_to_none=True)
    policy.train(was_training)
    return rows
