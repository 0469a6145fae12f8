"""Evaluation of policies on the controlled-sentiment task: reward, KL to the reference, a second judge.

Each policy is sampled at temperature 1 over the full vocabulary (so the samples come from π itself, as
the KL estimate requires) on held-out prompts. The ground-truth reward and the second judge score the
review text, prompt + continuation. KL(π‖π_ref) is the sample mean of log π(y|x) − log π_ref(y|x)
(:func:`dpolab.rewards.sequence_kl`), with its standard error.

A row of results is a dict of the fields of :class:`dpolab.evaluate.results.ModelRow` (plus ``examples``), ready for
:func:`dpolab.evaluate.results.save_model_row`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpolab.data.tokenize import pad_token_id
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.generate import Samples, sample


def mean_and_se(values) -> tuple[float, float]:
    """Sample mean and its standard error (ddof=1)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def full_texts(samples: Samples) -> list[str]:
    """Prompt + continuation for every completion, prompt by prompt."""
    return [prompt + text for prompt, row in zip(samples.prompts, samples.texts) for text in row]


def evaluate_samples(
    name: str,
    method: str,
    samples: Samples,
    reward_fn: Callable,
    judge_fn: Callable,
    kl_values: torch.Tensor | None,
    **extra,
) -> dict:
    """One row of the results table from a policy's samples (KL values per completion, or None for 0)."""
    texts = full_texts(samples)
    rewards, judges = np.asarray(reward_fn(texts)), np.asarray(judge_fn(texts))
    reward, reward_se = mean_and_se(rewards)
    judge, judge_se = mean_and_se(judges)
    kl, kl_se = (0.0, 0.0) if kl_values is None else mean_and_se(kl_values.numpy())
    per_prompt = len(samples.texts[0])
    lengths = [float(np.mean([len(ids) for ids in row])) for row in samples.token_ids]
    return {"policy": name, "method": method, "reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se,
            "judge": judge, "judge_se": judge_se, "n_samples": len(texts), **extra,
            "examples": [t for t in texts[:: max(1, len(texts) // 3)][:3]],
            "prompts": list(samples.prompts), "prompt_rewards": rewards.reshape(-1, per_prompt).mean(1).tolist(),
            "prompt_lengths": lengths}


def evaluate_policy(name: str, method: str, policy, reference, tokenizer, prompts: Sequence[str], *, n: int,
                    max_new_tokens: int, seed: int, reward_fn: Callable, judge_fn: Callable, **extra) -> dict:
    """Sample ``n`` continuations per prompt from ``policy`` and evaluate them against ``reference``."""
    samples = sample(policy, tokenizer, list(prompts), n, max_new_tokens=max_new_tokens, top_k=len(tokenizer),
                     seed=seed, progress=False)
    pad = pad_token_id(tokenizer)
    ref_logps = completion_logprobs(reference, samples, pad)
    return evaluate_samples(name, method, samples, reward_fn, judge_fn, samples.model_logps - ref_logps, **extra)


def best_of_n_rows(reference_samples: Samples, reward_fn: Callable, judge_fn: Callable, ns: Sequence[int]) -> list[dict]:
    """Best-of-N from the reference's samples: per prompt, the first N samples, keep the highest reward.

    The KL of the best-of-N policy to the reference is the analytic log N − (N − 1)/N (an upper bound that
    is tight for continuous rewards; Stiennon et al. 2020, Beirami et al. 2024), so it has no sampling error.
    """
    texts = full_texts(reference_samples)
    per_prompt = len(reference_samples.texts[0])
    rewards = np.asarray(reward_fn(texts)).reshape(-1, per_prompt)
    judges = np.asarray(judge_fn(texts)).reshape(-1, per_prompt)
    rows = []
    for n in ns:
        if n > per_prompt:
            raise ValueError(f"best-of-{n} needs {n} reference samples per prompt, only {per_prompt} were drawn")
        best = rewards[:, :n].argmax(axis=1)
        reward, reward_se = mean_and_se(rewards[np.arange(len(best)), best])
        judge, judge_se = mean_and_se(judges[np.arange(len(best)), best])
        picked = [texts[p * per_prompt + int(i)] for p, i in enumerate(best)]
        lengths = [float(len(reference_samples.token_ids[p][int(i)])) for p, i in enumerate(best)]
        rows.append({"policy": f"best-of-{n}", "method": "Best of N", "reward": reward, "reward_se": reward_se,
                     "kl": math.log(n) - (n - 1) / n, "kl_se": 0.0, "judge": judge, "judge_se": judge_se,
                     "n_samples": len(best), "n": n, "examples": picked[:3],
                     "prompts": list(reference_samples.prompts),
                     "prompt_rewards": rewards[np.arange(len(best)), best].tolist(), "prompt_lengths": lengths})
    return rows


def pair_implicit_rewards(policy, reference, pairs, beta: float, pad_token_id: int, batch_size: int = 16):
    """Implicit rewards r̂ = β log π/π_ref of the chosen and rejected side of tokenized pairs. Shape: (P,), (P,)."""
    from dpolab.data.batch import collate_pairs
    from dpolab.rewards import batch_implicit_rewards

    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_token_id)
        rewards = batch_implicit_rewards(policy, reference, batch, beta)
        b = batch.num_pairs
        chosen.append(rewards[:b])
        rejected.append(rewards[b:])
    return torch.cat(chosen), torch.cat(rejected)


def heldout_pair_accuracy(log_ratios, rewards) -> dict:
    """Held-out implicit-reward accuracy from per-sample log-ratios, over all pairs of samples of one prompt.

    ``log_ratios[p][i]`` is log π(y_i|x_p) − log π_ref(y_i|x_p) for reference samples y_i of held-out prompt x_p
    and ``rewards[p][i]`` their ground-truth reward (both shape (P, N)). Every pair of samples of the same prompt
    with different rewards counts (exact reward ties are dropped, as in training pairs); it is correct when the
    implicit reward β·log-ratio orders it as the ground truth does (β > 0 does not change the order, so the
    accuracy holds for any β, and for policies not trained with DPO); an exact log-ratio tie counts ½.

    The standard error is the cluster-robust one for a ratio over prompts (pairs of one prompt share samples and
    are not independent): √(P/(P−1)·Σ_p (c_p − a·n_p)²) / Σ_p n_p, with c_p correct and n_p counted pairs.

    Returns ``{"heldout_acc", "heldout_acc_se", "heldout_pairs", "heldout_prompts"}``.
    """
    from dpolab.evaluate import preference_accuracy

    ratios = np.asarray(log_ratios, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    if ratios.shape != rewards.shape or ratios.ndim != 2:
        raise ValueError(f"log_ratios {ratios.shape} and rewards {rewards.shape} must both be (prompts, samples)")
    i, j = np.triu_indices(ratios.shape[1], k=1)
    first_wins = rewards[:, i] > rewards[:, j]
    counted = rewards[:, i] != rewards[:, j]
    chosen = np.where(first_wins, ratios[:, i], ratios[:, j])[counted]
    rejected = np.where(first_wins, ratios[:, j], ratios[:, i])[counted]
    if chosen.size == 0:
        return {"heldout_acc": float("nan"), "heldout_acc_se": float("nan"), "heldout_pairs": 0, "heldout_prompts": 0}
    acc = preference_accuracy(chosen, rejected, source="held-out pairs")["accuracy"]
    prompt = np.nonzero(counted)[0]  # the prompt of each counted pair
    c_p = np.bincount(prompt, weights=(chosen > rejected) + 0.5 * (chosen == rejected), minlength=len(ratios))
    n_p = np.bincount(prompt, minlength=len(ratios))
    used = n_p > 0
    p = int(used.sum())
    se = math.sqrt(p / (p - 1) * ((c_p[used] - acc * n_p[used]) ** 2).sum()) / chosen.size if p > 1 else float("nan")
    return {"heldout_acc": float(acc), "heldout_acc_se": float(se), "heldout_pairs": int(chosen.size),
            "heldout_prompts": p}


def slow_heldout_pair_accuracy(log_ratios, rewards) -> float:
    """Reference implementation of the accuracy of :func:`heldout_pair_accuracy`: explicit loops over pairs."""
    correct = counted = 0.0
    for ratio_row, reward_row in zip(log_ratios, rewards):
        for a in range(len(ratio_row)):
            for b in range(a + 1, len(ratio_row)):
                if reward_row[a] == reward_row[b]:
                    continue
                counted += 1
                if ratio_row[a] == ratio_row[b]:
                    correct += 0.5
                elif (ratio_row[a] > ratio_row[b]) == (reward_row[a] > reward_row[b]):
                    correct += 1
    return correct / counted if counted else float("nan")


def add_paired_gains(rows: list[dict], baseline: str = "reference") -> list[dict]:
    """Add each row's reward gain over the ``baseline`` row, paired over the held-out prompts (in place).

    Policies are evaluated on the same prompts, so the per-prompt difference d_p = r̄_policy(p) − r̄_baseline(p)
    removes the prompt-to-prompt variation that the per-sample standard error of ``reward`` contains (and that
    error treats the samples of one prompt as independent, which they are not). ``reward_gain`` is the mean of
    d_p and ``reward_gain_se`` its standard error over prompts. Rows whose prompts differ from the baseline's are
    left without a gain. Returns ``rows``.
    """
    base = next((r for r in rows if r["policy"] == baseline), None)
    if base is None:
        return rows
    for row in rows:
        if row is base or list(row.get("prompts", [])) != list(base["prompts"]):
            continue
        diff = np.asarray(row["prompt_rewards"], dtype=np.float64) - np.asarray(base["prompt_rewards"], dtype=np.float64)
        row["reward_gain"], row["reward_gain_se"] = mean_and_se(diff)
    return rows


def win_rate_vs_reference(rewards, reference_rewards) -> dict:
    """Win rate of a policy's samples against π_ref's on the same prefixes, judged by their rewards, ties ½.

    Every sample of prefix p is compared with every π_ref sample of p; a prefix's score is the mean outcome over
    those pairs and the win rate is the mean over prefixes, with its standard error over prefixes (samples of one
    prefix are clustered) and a normal 95% interval. Shape: rewards (P, N), reference_rewards (P, M).

    Returns ``{"win_rate", "win_rate_se", "ci_low", "ci_high", "prompts", "pairs"}``.
    """
    a = np.asarray(rewards, dtype=np.float64)
    b = np.asarray(reference_rewards, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"rewards {a.shape} and reference_rewards {b.shape} must be (prefixes, samples), same prefixes")
    outcome = (a[:, :, None] > b[:, None, :]) + 0.5 * (a[:, :, None] == b[:, None, :])
    per_prefix = outcome.mean(axis=(1, 2))
    rate, se = mean_and_se(per_prefix)
    return {"win_rate": rate, "win_rate_se": se, "ci_low": rate - 1.96 * se, "ci_high": rate + 1.96 * se,
            "prompts": int(a.shape[0]), "pairs": int(outcome.size)}


def temperature_win_rates(policy, tokenizer, prompts: Sequence[str], reference_rewards, reward_fn: Callable,
                          temperatures: Sequence[float], *, n: int, max_new_tokens: int, seed: int) -> list[dict]:
    """The paper's Fig. 3 (left) on one policy: its win rate against π_ref's samples (``reference_rewards``, shape
    (P, M), drawn at temperature 1) when it is sampled at each temperature (full vocabulary otherwise), judged by
    ``reward_fn`` on prompt + continuation. One dict per temperature (:func:`win_rate_vs_reference`'s fields plus
    ``temperature`` and ``reward``)."""
    rows = []
    for temperature in temperatures:
        samples = sample(policy, tokenizer, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=len(tokenizer), seed=seed, progress=False)
        rewards = np.asarray(reward_fn(full_texts(samples)), dtype=np.float64).reshape(len(prompts), n)
        rows.append({"temperature": float(temperature), "reward": float(rewards.mean()),
                     **win_rate_vs_reference(rewards, reference_rewards)})
    return rows
