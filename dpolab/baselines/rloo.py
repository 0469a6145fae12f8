"""The RL baseline of the sentiment experiment: REINFORCE with a leave-one-out baseline (RLOO).

It maximises the KL-regularised objective of the paper's Eq. 3 directly,

    max_π  E_{x, y~π} [ r(x, y) ] − β · KL(π(·|x) ‖ π_ref(·|x)),

with the sequence-level penalised reward R(x, y) = r(x, y) − β (log π(y|x) − log π_ref(y|x)) and, for k
samples of one prompt, the baseline of each sample the mean reward of the other k − 1 (Kool et al., 2019;
Ahmadian et al., 2024). RLOO rather than PPO: with whole-sequence rewards and short completions it needs no
value network and no clipping hyper-parameters, its baseline is unbiased, and on two CPU cores every extra
network is a real cost — the paper's PPO would need a critic as large as the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpolab.baselines.rollout import DEFAULT_ROLLOUT, RolloutSettings, prompt_order, rollout
from dpolab.data.batch import to_device
from dpolab.data.device import module_device
from dpolab.data.tokenize import pad_token_id
from dpolab.logprobs import sequence_forward
from dpolab.sample.completions import completion_batch, completion_logprobs


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = R_i − mean_{j≠i} R_j over the last dimension (k ≥ 2 samples of one prompt). Shape: like ``rewards``."""
    k = rewards.size(-1)
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt for its leave-one-out baseline")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def rloo_train(policy, reference, tokenizer, prompts: Sequence[str], reward_fn: Callable[[list[str]], np.ndarray],
               settings: RolloutSettings = DEFAULT_ROLLOUT, *, kl_coef: float = 0.1,
               on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``policy`` in place with RLOO; return one metrics dict per step.

    Each step samples ``k`` completions for ``prompts_per_step`` prompts (cycling through ``prompts``; the steps,
    rollouts and learning rate are ``settings``),
    scores them with ``reward_fn`` (texts -> scores) and takes one AdamW step on
    −mean(A_i · log π(y_i|x)). ``on_step(step, record)`` runs after each step (e.g. to evaluate the policy
    along training); the record's ``reward`` and ``kl`` are the step's own samples' means (a learning curve).
    """
    from tqdm.auto import tqdm

    pad, k = pad_token_id(tokenizer), settings.k
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0)
    order = prompt_order(len(prompts), settings.seed)
    device = module_device(policy)  # rewards and π_ref's log-probs come back on the CPU
    history = []
    for step in tqdm(range(settings.steps), desc="rloo", disable=not settings.progress):
        samples, reward = rollout(policy, tokenizer, prompts, order, step, reward_fn, settings)
        reward = reward.view(-1, k).to(device)
        ref_logps = completion_logprobs(reference, samples, pad).to(device)
        policy.train()
        batch = to_device(completion_batch(samples, pad), device)
        logps, _ = sequence_forward(policy, batch)
        logps = logps.view(-1, k)
        kl = (logps.detach() - ref_logps)
        advantages = leave_one_out_advantages(reward - kl_coef * kl)
        loss = -(advantages * logps).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        history.append({"step": step + 1, "loss": loss.item(), "reward": reward.mean().item(),
                        "kl": kl.mean().item(), "grad_norm": float(grad_norm)})
        if on_step is not None:
            policy.eval()
            on_step(step + 1, history[-1])
    policy.eval()
    return history
