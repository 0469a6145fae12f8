"""PPO, the paper's RL baseline (Ziegler et al., 2019; Stiennon et al., 2020): a KL-penalised per-token reward,
a clipped probability ratio and a learned value estimate with generalised advantage estimation (GAE).

For a completion y = (y_1 … y_T) of prompt x the per-token reward is the KL penalty at every token plus the
ground-truth score at the last one,

    r_t = −β · (log π_old(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)) + [t = T] · r(x, y),

so that Σ_t r_t is RLOO's penalised sequence reward R(x, y) = r(x, y) − β · log π(y|x)/π_ref(y|x). A value head
V(s_t) (one linear layer on the policy's last hidden state, initialised at zero; it shares the policy's trunk,
as in the PPO of the paper's code base, so no second network is run) gives the advantages by GAE,

    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   returns G_t = A_t + V(s_t),

(V after the last token is 0), whitened over the batch's response tokens. Each rollout is reused for
``epochs`` AdamW steps on

    L = E_t[ max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)) ] + c_v · E_t[ ½ max((V − G)², (V_clip − G)²) ],

with ρ_t = π(y_t|…)/π_old(y_t|…) and V_clip = V_old + clip(V − V_old, −ε_v, ε_v); E_t is the mean over all
response tokens of the batch. Names and defaults follow trl's PPOConfig where it has them (``kl_coef``,
``cliprange``, ``cliprange_value``, ``vf_coef``, ``gamma``, ``lam``, ``num_ppo_epochs``).

Rollouts are drawn exactly as :func:`dpolab.baselines.rloo.rloo_train` draws them (the same prompts per step, ``k``
samples each, the same sampling seeds), so the two RL baselines see the same number of reward queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dpolab.baselines.rollout import DEFAULT_ROLLOUT, RolloutSettings, prompt_order, rollout
from dpolab.data.batch import IGNORE_INDEX, to_device
from dpolab.data.device import module_device
from dpolab.data.tokenize import pad_token_id
from dpolab.logprobs import shift_labels, token_logprobs
from dpolab.sample.completions import completion_batch, completion_token_logprobs


class ValueHead(torch.nn.Module):
    """V(s_t) = w · h_t + b on the policy's last hidden state h_t, initialised at zero (V ≡ 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def policy_and_values(model, head: ValueHead, batch) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of ``model`` on ``batch``: per-token log π and V, aligned with the tokens they score.

    Position t holds log π(label_{t+1} | tokens ≤ t) and V of the state after tokens ≤ t (the state in which that
    label is chosen); ``mask`` is True where a response token is scored. Shape: (N, T) each (logps and values are
    0 where ``mask`` is False).
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                use_cache=False)
    targets = shift_labels(batch.labels)
    mask = targets != IGNORE_INDEX
    logps = token_logprobs(out.logits, targets)
    values = head(out.hidden_states[-1]) * mask
    return logps, values, mask


def token_rewards(scores: Tensor, logps_old: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = −β (log π_old − log π_ref) on every response token, plus the score on the last one.

    Shape: scores (N,), the others (N, T) -> (N, T) (0 off the mask).
    """
    rewards = -kl_coef * (logps_old - ref_logps) * mask
    positions = torch.arange(mask.size(1)).expand_as(mask)
    last = torch.where(mask, positions, -1).max(-1).values
    if (last < 0).any():
        raise ValueError(f"row {int((last < 0).nonzero()[0])}: a completion with no scored token")
    return rewards.index_put((torch.arange(mask.size(0)), last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns over each row's masked (response) positions.

    A_t = δ_t + γλ A_{t+1} with δ_t = r_t + γ V_{t+1} − V_t, where "t+1" is the row's next masked position and
    V = 0 after its last. Returns ``(advantages, returns = advantages + values)``, 0 off the mask.
    Shape: (N, T) each.
    """
    n, t_max = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = rewards.new_zeros(n)
    next_value = rewards.new_zeros(n)
    for t in reversed(range(t_max)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        advantages[:, t] = torch.where(m, step, 0.0)
        running = torch.where(m, step, running)
        next_value = torch.where(m, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the True positions of ``mask``."""
    return (x * mask).sum() / mask.sum()


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked positions (population variance), 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_loss(logps: Tensor, logps_old: Tensor, values: Tensor, values_old: Tensor, advantages: Tensor,
             returns: Tensor, mask: Tensor, *, cliprange: float = 0.2, cliprange_value: float = 0.2,
             vf_coef: float = 0.1) -> tuple[Tensor, dict]:
    """The clipped surrogate plus ``vf_coef`` × the clipped value loss (module docstring), averaged over tokens.

    Returns ``(loss, stats)`` with ``pg_loss``, ``vf_loss``, ``clipfrac`` (share of tokens whose ratio was clipped
    against the advantage) and ``approx_kl`` (mean ½ (log ρ)²). Shape: (N, T) inputs -> scalar loss.
    """
    log_ratio = (logps - logps_old) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    values_clipped = values_old + torch.clamp(values - values_old, -cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
             "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return pg_loss + vf_coef * vf_loss, stats


def ppo_train(policy, reference, tokenizer, prompts: Sequence[str], reward_fn: Callable[[list[str]], np.ndarray],
              settings: RolloutSettings = DEFAULT_ROLLOUT, *, kl_coef: float = 0.05, num_ppo_epochs: int = 2,
              cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0,
              lam: float = 0.95, max_grad_norm: float = 10.0,
              on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``policy`` in place with PPO; return one metrics dict per step (rollout).

    Each step samples ``k`` completions of ``prompts_per_step`` prompts (as RLOO does, with the same ``settings``:
    steps, rollouts, learning rate), scores them with
    ``reward_fn``, computes per-token rewards and GAE advantages from π_old (the policy before the step) and
    takes ``num_ppo_epochs`` AdamW steps on the whole rollout. ``on_step(step, record)`` runs after each step;
    the record's ``reward`` and ``kl`` are the rollout's own means (a learning curve).
    """
    from tqdm.auto import tqdm

    if num_ppo_epochs < 1:
        raise ValueError(f"num_ppo_epochs must be >= 1, got {num_ppo_epochs}")
    pad = pad_token_id(tokenizer)
    device = module_device(policy)  # rewards and π_ref's log-probs come back on the CPU
    head = ValueHead(policy.config.hidden_size).to(device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    order = prompt_order(len(prompts), settings.seed)
    history = []
    for step in tqdm(range(settings.steps), desc="ppo", disable=not settings.progress):
        samples, scores = rollout(policy, tokenizer, prompts, order, step, reward_fn, settings)
        scores = scores.to(device)
        ref_logps = completion_token_logprobs(reference, samples, pad).to(device)
        batch = to_device(completion_batch(samples, pad), device)
        policy.train()
        record = {"step": step + 1, "reward": scores.mean().item()}
        for epoch in range(num_ppo_epochs):
            logps, values, mask = policy_and_values(policy, head, batch)
            if epoch == 0:  # π_old and V_old are the policy before this step: the first epoch's own forward
                logps_old, values_old = logps.detach(), values.detach()
                rewards = token_rewards(scores, logps_old, ref_logps, mask, kl_coef)
                advantages, returns = gae(rewards, values_old, mask, gamma, lam)
                advantages = whiten(advantages, mask)
                record["kl"] = ((logps_old - ref_logps) * mask).sum(-1).mean().item()
            loss, stats = ppo_loss(logps, logps_old, values, values_old, advantages, returns, mask,
                                   cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
        record.update(loss=loss.item(), grad_norm=float(grad_norm), value_mean=masked_mean(values_old, mask).item(),
                      **stats)
        history.append(record)
        if on_step is not None:
            policy.eval()
            on_step(step + 1, record)
    policy.eval()
    return history
