"""Reward–KL curves of the controlled-sentiment experiment: every trained method evaluated along its run.

A *checkpoint row* is one policy evaluated on the held-out prefixes: ``method``, ``knob`` (β for DPO, the KL
coefficient for RLOO, N for Best-of-N, 0 for Preferred-FT and Unlikelihood), ``step``, the ground-truth reward and
KL(π‖π_ref) with their standard errors over prefixes, the second judge, the paired gain over π_ref, and the
per-prefix means (``prompt_rewards``, ``prompt_kls``) that the matched-KL bootstrap (:mod:`dpolab.evaluate.frontier`)
resamples. Every curve starts at step 0, which is π_ref itself (reward of π_ref's held-out samples, KL 0).

Evaluating a checkpoint samples ``eval_samples_per_prompt`` continuations of every held-out prefix with the
batched sampler (:func:`dpolab.sample.generate.sample`, which returns log π of each sample), scores the same token ids
under π_ref in one teacher-forced pass (nothing is re-tokenized), and asks the judges. Every checkpoint uses the
same sampling seed, so the curves of one run share their random numbers and differences between checkpoints are
less noisy than independent draws would make them.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from dpolab.data.tokenize import pad_token_id
from dpolab.experiments.sentiment.evaluation import full_texts, heldout_pair_accuracy
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.generate import Samples, sample

RESULTS_FORMAT = "dpolab.sentiment/3"
"""Format 3 names the RL arms by what they read (RLOO-GT / PPO-GT: the ground truth; RLOO / PPO: a learned reward
model) and records each row's ``reward_source``; files of format 2, whose RL arms all read the ground truth, are
read and upgraded (:func:`dpolab.experiments.sentiment.report.upgrade`)."""
OLD_FORMATS = ("dpolab.sentiment/2",)
POLICY_FIELDS = ("method", "knob", "step", "reward", "reward_se", "kl", "kl_se", "gain", "gain_se")
COMPARISON_FIELDS = ("method_a", "method_b", "kl_low", "kl_high", "reward_diff", "ci_low", "ci_high",
                     "dominance_share")


def prefix_mean_se(per_prefix) -> tuple[float, float]:
    """Mean over held-out prefixes and its standard error (samples of one prefix are clustered, so the
    prefix is the unit). Shape: (P,) -> two floats."""
    x = np.asarray(per_prefix, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def curve_row(method: str, knob: float, step: int, prompt_rewards, prompt_kls, prompt_judges, reference: dict | None,
              **extra) -> dict:
    """One checkpoint row from per-prefix means (shape (P,) each); the gain is paired against ``reference``."""
    reward, reward_se = prefix_mean_se(prompt_rewards)
    kl, kl_se = prefix_mean_se(prompt_kls)
    judge, judge_se = prefix_mean_se(prompt_judges)
    if reference is None:
        gain, gain_se = 0.0, 0.0
    else:
        gain, gain_se = prefix_mean_se(np.asarray(prompt_rewards) - np.asarray(reference["prompt_rewards"]))
    slug = method.lower().replace(" ", "_").replace("-", "_")
    return {"policy": f"{slug}_{knob:g}_step{step}", "method": method, "knob": float(knob), "step": int(step),
            "reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se, "gain": gain, "gain_se": gain_se,
            "judge": judge, "judge_se": judge_se, "prompt_rewards": [float(v) for v in prompt_rewards],
            "prompt_kls": [float(v) for v in prompt_kls], "prompt_judges": [float(v) for v in prompt_judges],
            **extra}


def reference_curve_row(setup) -> dict:
    """π_ref on all its held-out samples (the step-0 point of every curve): KL 0 by definition."""
    held = setup.heldout_samples()
    texts = full_texts(held["samples"])
    judges = np.asarray(setup.judge_fn(texts), dtype=np.float64).reshape(held["rewards"].shape)
    p = held["rewards"].shape[0]
    return curve_row("Reference", 0.0, 0, held["rewards"].mean(1), np.zeros(p), judges.mean(1), None,
                     n_samples=int(held["rewards"].size), prompts=list(held["samples"].prompts))


def start_row(reference: dict, method: str, knob: float) -> dict:
    """The step-0 point of a trained method's curve: π_ref's row under the method's name."""
    row = {**reference, "method": method, "knob": float(knob)}
    slug = method.lower().replace(" ", "_").replace("-", "_")
    row["policy"] = f"{slug}_{knob:g}_step0"
    return row


def evaluate_checkpoint(setup, policy, method: str, knob: float, step: int, *, pair_accuracy: bool = False) -> dict:
    """Sample ``policy`` on the held-out prefixes and return its checkpoint row (see the module docstring).

    ``pair_accuracy`` adds the implicit-reward accuracy on the held-out pairs of π_ref's samples
    (:func:`dpolab.experiments.sentiment.evaluation.heldout_pair_accuracy`; one extra teacher-forced pass).
    """
    c, t = setup.config, time.perf_counter()
    pad = pad_token_id(setup.tokenizer)
    samples = sample(policy, setup.tokenizer, setup.eval_prefixes, c.eval_samples_per_prompt,
                     max_new_tokens=c.max_new_tokens, top_k=len(setup.tokenizer), seed=c.seed + 2, progress=False)
    seconds = {"sampling": time.perf_counter() - t}
    t = time.perf_counter()
    kls = (samples.model_logps - completion_logprobs(setup.reference, samples, pad)).numpy()
    seconds["π_ref log-probs"] = time.perf_counter() - t
    t = time.perf_counter()
    texts = full_texts(samples)
    shape = kls.shape
    rewards = np.asarray(setup.reward_fn(texts), dtype=np.float64).reshape(shape)
    judges = np.asarray(setup.judge_fn(texts), dtype=np.float64).reshape(shape)
    seconds["judges"] = time.perf_counter() - t
    extra = {}
    if pair_accuracy:
        t = time.perf_counter()
        held = setup.heldout_samples()
        k = min(c.heldout_pair_samples, held["rewards"].shape[1])
        ratios = completion_logprobs(policy, first_samples(held["samples"], k), pad) - held["ref_logps"][:, :k]
        extra = heldout_pair_accuracy(ratios.numpy(), held["rewards"][:, :k])
        seconds["held-out pair accuracy"] = time.perf_counter() - t
    lengths = [float(np.mean([len(ids) for ids in row])) for row in samples.token_ids]
    return curve_row(method, knob, step, rewards.mean(1), kls.mean(1), judges.mean(1), setup.reference_row,
                     n_samples=int(rewards.size), prompt_lengths=lengths, prompts=list(samples.prompts),
                     examples=texts[:: max(1, len(texts) // 3)][:3], eval_seconds=seconds, **extra)


def first_samples(samples: Samples, k: int) -> Samples:
    """The first ``k`` samples of every prompt (a view for scoring fewer completions)."""
    return dataclasses.replace(samples, texts=[row[:k] for row in samples.texts],
                               token_ids=[row[:k] for row in samples.token_ids], model_logps=samples.model_logps[:, :k],
                               sampling_logps=samples.sampling_logps[:, :k], finished=samples.finished[:, :k])


def checkpoint_steps(steps: int, every: int) -> set[int]:
    """The steps at which a run of ``steps`` is evaluated: every ``every`` steps and the last (0 = last only)."""
    return ({s for s in range(every, steps + 1, every)} if every > 0 else set()) | {steps}


def best_of_n_curve_rows(setup, ns) -> list[dict]:
    """Best-of-N for each N from π_ref's held-out samples: the unbiased expected best of N draws per prefix
    (:func:`dpolab.evaluate.frontier.expected_best_of_n`), at the analytic KL log N − (N − 1)/N."""
    from dpolab.evaluate.frontier import best_of_n_kl, best_of_n_weights, expected_best_of_n

    held = setup.heldout_samples()
    rewards = held["rewards"]
    texts = full_texts(held["samples"])
    judges = np.asarray(setup.judge_fn(texts), dtype=np.float64).reshape(rewards.shape)
    rows = []
    for n in ns:
        if n > rewards.shape[1]:
            raise ValueError(f"best-of-{n} needs {n} reference samples per prefix, only {rewards.shape[1]} drawn")
        # the second judge of the sample that the ground truth picks: the same order-statistic weights
        # C(i−1, N−1)/C(M, N) on the judges sorted by reward (ties in reward keep the sample order)
        order = np.argsort(rewards, axis=1, kind="stable")
        judge_best = np.take_along_axis(judges, order, axis=1) @ best_of_n_weights(rewards.shape[1], n)
        p = rewards.shape[0]
        rows.append(curve_row("Best of N", n, 0, expected_best_of_n(rewards, n), np.full(p, best_of_n_kl(n)),
                              judge_best, setup.reference_row, n=int(n), n_samples=int(rewards.size)))
    return rows
