"""What every stage of the controlled-sentiment experiment shares (:class:`Setup`: π_ref, its tokenizer, the
prefixes, the judges), how it is made (:func:`prepare`), and the evaluations against π_ref that the stages and the
notebooks call (:func:`evaluate`, :func:`temperature_sweep`, :func:`reference_rows`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolab.data.cache import from_repo_root
from dpolab.data.device import resolve_device
from dpolab.data.tokenize import pad_token_id
from dpolab.experiments.sentiment.config import SentimentConfig
from dpolab.experiments.sentiment.evaluation import (
    best_of_n_rows,
    evaluate_policy,
    evaluate_samples,
    heldout_pair_accuracy,
    temperature_win_rates,
)
from dpolab.experiments.sentiment.policies import sft_reference
from dpolab.experiments.sentiment.samples import heldout_samples
from dpolab.models import DEFAULT_MODEL, TINY_MODELS, load_policy
from dpolab.models.hub_check import Source, check_sources
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.judges import BUILTIN_JUDGES, RewardFunction, get_judge, load_classifier_judge
from dpolab.sample.pairs import check_pair_request
from dpolab.sample.review_text import review_texts
from dpolab.sample.sentiment import review_snippets
from dpolab.train.fingerprint import weights_digest


def make_prefixes(tokenizer, n_train: int, n_eval: int, lo: int, hi: int, seed: int,
                  texts: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Review prefixes of lo..hi tokens; train and held-out prefixes come from disjoint snippets.

    The held-out prefixes are drawn first, so every run with the same ``seed`` and ``n_eval`` evaluates on
    the same prompts whatever its ``n_train`` (runs of different notebooks can be ranked against each other).
    ``texts``: the reviews to cut (default: the embedded snippets; :func:`dpolab.sample.review_text.review_texts`).
    """
    texts = review_snippets()["text"] if texts is None else texts
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    prefixes = []
    for i in order:
        ids = tokenizer(texts[int(i)], add_special_tokens=False).input_ids
        k = int(rng.integers(lo, hi + 1))
        if len(ids) <= k:  # a snippet no longer than its prefix leaves nothing to continue
            continue
        prefixes.append(tokenizer.decode(ids[:k]))
        if len(prefixes) == n_train + n_eval:
            break
    return prefixes[n_eval:], prefixes[:n_eval]


@dataclass
class Setup:
    """What every step of the experiment shares: π_ref, its tokenizer, the prefixes and the judges."""

    config: SentimentConfig
    reference: torch.nn.Module
    tokenizer: object
    train_prefixes: list[str]
    eval_prefixes: list[str]
    reward_fn: object
    judge_fn: object
    out: Path
    timings: dict = field(default_factory=dict)
    heldout: dict | None = None
    """π_ref's held-out samples, their rewards and π_ref's log-probs (:func:`dpolab.experiments.sentiment.samples.heldout_samples`)."""
    reference_row: dict | None = None
    """π_ref's checkpoint row (:func:`dpolab.experiments.sentiment.curves.reference_curve_row`), once evaluated."""
    reference_id: str = ""
    """π_ref's identity, recorded with the pairs: the initial weights' SHA-256, or its cached SFT weights' name."""
    reference_source: str = ""
    """Where π_ref came from, in words: the initial model, SFT trained now, or SFT reused from an earlier run."""

    def heldout_samples(self) -> dict:
        """π_ref's held-out samples (drawn once; :func:`dpolab.experiments.sentiment.samples.heldout_samples`)."""
        return heldout_samples(self)


def prepare(config: SentimentConfig | None = None, **overrides) -> Setup:
    """Check the settings, load π_ref (``config.model``, or a tiny test model's name) after the optional SFT on
    reviews (trained once per settings, then reused: ``setup.reference_source`` says which), draw the prefixes."""
    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    check_pair_request(config.samples_per_prompt, config.pair_strategy)  # argument errors before any model load
    check_sources(sources(config), builtin=BUILTIN_NAMES)  # every missing hub id named at once, before any work
    device = resolve_device(config.device, config.use_cpu)
    out = from_repo_root(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    reference, tokenizer = load_policy(config.model, seed=config.seed)
    reference = reference.to(device)
    texts = review_texts(config.dataset_name, config.dataset_train_split, config.dataset_text_field)
    train_prefixes, eval_prefixes = make_prefixes(tokenizer, config.n_train_prompts, config.n_eval_prompts,
                                                  config.min_prefix_tokens, config.max_prefix_tokens, config.seed,
                                                  texts)
    setup = Setup(config, reference.eval(), tokenizer, train_prefixes, eval_prefixes, ground_truth(config, device),
                  get_judge("textblob"), out)
    setup.reference_id = weights_digest(reference)
    setup.reference_source = f"the initial model {config.model} (sft_steps=0)"
    setup.timings["load"] = time.perf_counter() - t
    if config.sft_steps > 0:
        t = time.perf_counter()
        setup.reference, folder, reused = sft_reference(setup.reference, tokenizer, config, out, setup.reference_id)
        setup.reference_id = folder.name
        how = "reused from an earlier run with the same settings" if reused else "trained now"
        setup.reference_source = f"SFT on reviews ({config.sft_steps} steps) {how}, cached in {folder}"
        setup.timings["sft"] = time.perf_counter() - t
    return setup


BUILTIN_NAMES = (*BUILTIN_JUDGES, *TINY_MODELS, DEFAULT_MODEL)
"""Names in a config's model/judge fields that are neither paths nor hub ids."""


def sources(config: SentimentConfig) -> list[Source]:
    """What the experiment loads: the model, the review texts and the judge (each a hub id, a path or built in)."""
    return [Source("model", config.model), Source("dataset_name", config.dataset_name, "dataset"),
            Source("judge", config.judge)]


def ground_truth(config: SentimentConfig, device) -> RewardFunction:
    """The ground-truth reward: a built-in judge by name, else a sequence classifier on ``device``."""
    if config.judge in BUILTIN_JUDGES:
        return get_judge(config.judge)
    label = int(config.judge_label) if config.judge_label.isdigit() else config.judge_label
    return load_classifier_judge(config.judge, device=device, label=label, output=config.judge_output)


def evaluate(setup: Setup, name: str, method: str, policy, **extra) -> dict:
    """One results row: ``policy`` sampled on the held-out prefixes, scored, KL to π_ref, held-out pair accuracy."""
    c = setup.config
    held = heldout_samples(setup)
    ratios = completion_logprobs(policy, held["samples"], pad_token_id(setup.tokenizer)) - held["ref_logps"]
    return evaluate_policy(name, method, policy, setup.reference, setup.tokenizer, setup.eval_prefixes,
                           n=c.eval_samples_per_prompt, max_new_tokens=c.max_new_tokens, seed=c.seed + 1,
                           reward_fn=setup.reward_fn, judge_fn=setup.judge_fn,
                           **heldout_pair_accuracy(ratios.numpy(), held["rewards"]), **extra)


def temperature_sweep(setup: Setup, policy) -> list[dict]:
    """``policy``'s win rate against π_ref's held-out samples (temperature 1) at each of the config's
    ``win_rate_temperatures`` (:func:`dpolab.experiments.sentiment.evaluation.temperature_win_rates`), judged by VADER."""
    c = setup.config
    return temperature_win_rates(policy, setup.tokenizer, setup.eval_prefixes, setup.heldout_samples()["rewards"],
                                 setup.reward_fn, c.win_rate_temperatures, n=c.eval_samples_per_prompt,
                                 max_new_tokens=c.max_new_tokens, seed=c.seed + 3)


def reference_rows(setup: Setup) -> list[dict]:
    """π_ref itself and the Best-of-N baselines, from max(best_of_n) reference samples per held-out prefix."""
    held = heldout_samples(setup)
    rows = [evaluate_samples("reference", "Reference", held["samples"], setup.reward_fn, setup.judge_fn, None)]
    return rows + best_of_n_rows(held["samples"], setup.reward_fn, setup.judge_fn, setup.config.best_of_n)

