"""The implicit reward r̂(x, y) = β (log π_θ(y|x) − log π_ref(y|x)) as an API, and sample-based KL.

The paper's §5 shows that a DPO policy *is* a reward model: r̂ differs from the reward it was trained to
maximise only by a per-prompt constant β log Z(x), which cancels in every comparison of two responses to
the same prompt (accuracy, margins, the distribution over several responses).

The reference can be a model, ``None`` for a PEFT policy whose adapter is switched off, or a tensor of
precomputed reference log-probs (N,) for exactly the responses being scored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dpolab.data.batch import collate_sequences, to_device
from dpolab.data.tokenize import pad_token_id, tokenize_response
from dpolab.logprobs import sequence_forward
from dpolab.losses.implicit import implicit_rewards  # the formula lives with the losses (torch only)


@contextlib.contextmanager
def _scoring(model):
    """No grad, dropout off, and the model's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def batch_logps(model, batch) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and scored-token counts of a batch, without grad. Shape: -> (N,), (N,)."""
    with _scoring(model):
        logps, lengths = sequence_forward(model, to_device(batch, _model_device(model)))
    return logps.cpu(), lengths.cpu()


def batch_implicit_rewards(policy, reference, batch, beta: float) -> Tensor:
    """r̂ for every row of a :class:`dpolab.data.batch.SequenceBatch`. Shape: batch (N, T) -> (N,).

    Args:
        policy: the trained causal LM π_θ.
        reference: π_ref as a model, ``None`` (the PEFT ``policy`` with its adapter disabled), or a
            tensor (N,) of precomputed reference log-probs.
        batch: anything with ``input_ids``, ``attention_mask`` and ``labels``.
        beta: β of the training run.
    """
    policy_logps, _ = batch_logps(policy, batch)
    return implicit_rewards(policy_logps, _reference_logps(policy, reference, batch), beta)


def _precomputed(reference: Tensor, n: int) -> Tensor:
    if reference.shape != (n,):
        raise ValueError(f"precomputed reference log-probs have shape {tuple(reference.shape)}, expected ({n},)")
    return reference.detach().cpu().to(torch.float32)


def _adapter_disabled(policy):
    if not hasattr(policy, "disable_adapter"):
        raise ValueError(
            "reference=None means the PEFT policy with its adapter disabled, but the policy has "
            "no adapter; pass the reference model or precomputed reference log-probs"
        )
    return policy.disable_adapter()


def _reference_logps(policy, reference, batch) -> Tensor:
    if isinstance(reference, Tensor):
        return _precomputed(reference, batch.input_ids.size(0))
    if reference is None:
        with _adapter_disabled(policy):
            return batch_logps(policy, batch)[0]
    return batch_logps(reference, batch)[0]


def response_logps(
    model, tokenizer, prompts: Sequence, responses: Sequence, *, batch_size: int = 8, config=None
) -> tuple[Tensor, Tensor]:
    """log π(y|x) summed over each response's scored tokens, and their counts, for paired lists.

    Responses are tokenized with :func:`dpolab.data.tokenize.tokenize_response` (chat prompts use the chat
    template), batched by length and returned in the input order. Shape: N prompts, N responses -> (N,), (N,).
    """
    batches = _batches(tokenizer, prompts, responses, batch_size, config)
    logps = torch.empty(len(prompts))
    lengths = torch.empty(len(prompts), dtype=torch.long)
    for rows, batch in batches:
        logps[rows], lengths[rows] = batch_logps(model, batch)
    return logps, lengths


def _batches(tokenizer, prompts, responses, batch_size, config):
    """Tokenize (prompt, response) pairs; yield (row indices, SequenceBatch) with rows of similar length."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = [
        tokenize_response(p, r, tokenizer, config, source=f"responses[{i}]")
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i][0]) + len(tokens[i][1]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate_sequences(
            [tokens[i][0] for i in rows], [tokens[i][1] for i in rows], [tokens[i][2] for i in rows], pad
        )
        out.append((torch.tensor(rows), batch))
    return out


def implicit_reward(
    policy,
    reference,
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    beta: float,
    *,
    batch_size: int = 8,
    config=None,
) -> Tensor:
    """r̂(x, y) = β (log π_θ(y|x) − log π_ref(y|x)) for each (prompt, response) pair.

    Args:
        policy: the trained causal LM π_θ.
        reference: π_ref as a model, ``None`` (the PEFT ``policy`` with its adapter disabled), or a
            tensor (N,) of precomputed reference log-probs of these responses.
        tokenizer: the tokenizer both models share.
        prompts: N prompts (text, or message tuples for chat).
        responses: N responses (text, or assistant messages).
        beta: β of the training run.
        batch_size: sequences per forward pass.
        config: a :class:`dpolab.data.tokenize.TokenizeConfig` (lengths, masking policy); the default if None.

    Returns:
        (N,) float32 rewards, in the order given.
    """
    policy_logps, _ = response_logps(policy, tokenizer, prompts, responses, batch_size=batch_size, config=config)
    if isinstance(reference, Tensor):
        ref_logps = _precomputed(reference, len(prompts))
    elif reference is None:
        with _adapter_disabled(policy):
            ref_logps, _ = response_logps(policy, tokenizer, prompts, responses, batch_size=batch_size, config=config)
    else:
        ref_logps, _ = response_logps(reference, tokenizer, prompts, responses, batch_size=batch_size, config=config)
    return implicit_rewards(policy_logps, ref_logps, beta)


def reward_margins(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """r̂(x, y_w) − r̂(x, y_l) per pair. Shape: (B,), (B,) -> (B,)."""
    return chosen_rewards - rejected_rewards


def pair_accuracies(chosen_rewards: Tensor, rejected_rewards: Tensor, *, ties: float = 0.5) -> Tensor:
    """1 where the chosen response has the higher implicit reward, ``ties`` where the two are equal, else 0.

    Ties count ½ by default, so a policy equal to its reference (every reward 0) scores chance, 0.5.
    (trl's ``rewards/accuracies`` counts ties as 0.) Shape: (B,), (B,) -> (B,) float64.
    """
    margins = reward_margins(chosen_rewards, rejected_rewards)
    return (margins > 0).double() + ties * (margins == 0).double()


def reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor, *, ties: float = 0.5) -> float:
    """Share of pairs whose chosen response has the higher implicit reward, ties counted ``ties`` (½):
    the mean of :func:`pair_accuracies`."""
    accuracies = pair_accuracies(chosen_rewards, rejected_rewards, ties=ties)
    if accuracies.numel() == 0:
        raise ValueError("reward_accuracy of zero pairs")
    return float(accuracies.mean())


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The logged reward metrics of a batch of pairs: ``rewards/chosen``, ``/rejected``, ``/margins``, ``/accuracies``."""
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float(reward_margins(chosen_rewards, rejected_rewards).mean()),
        "rewards/accuracies": reward_accuracy(chosen_rewards, rejected_rewards),
    }


@dataclass
class RewardDistribution:
    """Implicit rewards of K responses to one prompt, and what they say about preferences among them.

    Attributes:
        rewards: (K,) r̂(x, y_k).
        choice_probs: (K,) softmax(r̂): the Plackett–Luce probability that y_k is preferred to all the
            others (the per-prompt constant cancels).
        pairwise: (K, K) Bradley–Terry P(y_i ≻ y_j) = σ(r̂_i − r̂_j) (paper eq. 1).
        order: indices of the responses, best first.
    """

    rewards: Tensor
    choice_probs: Tensor
    pairwise: Tensor
    order: list[int]


def reward_distribution_from_rewards(rewards: Tensor) -> RewardDistribution:
    """The :class:`RewardDistribution` of a (K,) reward vector."""
    rewards = rewards.detach().to(torch.float64)
    return RewardDistribution(
        rewards=rewards,
        choice_probs=torch.softmax(rewards, dim=0),
        pairwise=torch.sigmoid(rewards[:, None] - rewards[None, :]),
        order=torch.argsort(rewards, descending=True, stable=True).tolist(),
    )


def reward_distribution(
    policy, reference, tokenizer, prompt, responses: Sequence, beta: float, *, batch_size: int = 8, config=None
) -> RewardDistribution:
    """Implicit rewards of several responses to one prompt, with choice and pairwise probabilities."""
    rewards = implicit_reward(
        policy, reference, tokenizer, [prompt] * len(responses), responses, beta, batch_size=batch_size, config=config
    )
    return reward_distribution_from_rewards(rewards)


def sequence_kl(policy_logps: Tensor, ref_logps: Tensor) -> tuple[float, float]:
    """Monte Carlo KL(π_θ‖π_ref) from samples y ~ π_θ(·|x): mean of log π_θ(y|x) − log π_ref(y|x).

    Unbiased only when the responses were sampled from π_θ itself (at temperature 1, no top-k/top-p
    truncation); the standard error is the sample standard deviation over √n.

    Shape: (N,), (N,) -> (mean, standard_error).
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} must both be (N,)"
        )
    diff = (policy_logps.detach() - ref_logps.detach()).double()
    n = diff.numel()
    if n == 0:
        raise ValueError("sequence_kl of zero samples")
    se = float(diff.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(diff.mean()), se
