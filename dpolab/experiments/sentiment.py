"""The paper's controlled-sentiment experiment (§6.1, Fig. 2 left) on the embedded default.

Pipeline (every step a library call):

1. prompts: 2–8-token prefixes of the Rotten Tomatoes review snippets, disjoint train/held-out snippets;
2. optional SFT of the default model on review text (then this SFT model is π_ref), as the paper fine-tunes
   GPT-2-large on IMDb first;
3. ``samples_per_prompt`` samples of π_ref per training prefix, scored by the ground truth (VADER), turned
   into preference pairs (all pairs of the samples, the paper's choice; ties dropped);
4. DPO over a grid of β, Preferred-FT (SFT on the chosen responses), RLOO (the RL baseline) and Best-of-N
   sampling from π_ref;
5. every policy sampled on the held-out prefixes: mean VADER reward, KL(π‖π_ref), TextBlob as a second
   judge; the reward–KL frontier figure and a table.

:class:`SentimentConfig` defaults are the small CPU run (minutes on two cores); ``configs/sentiment_full.yaml``
is the full one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolab.cache import REPO_ROOT, atomic_write_text
from dpolab.experiments.sentiment_eval import (
    best_of_n_rows,
    evaluate_policy,
    evaluate_samples,
    full_texts,
    heldout_pair_accuracy,
    save_model_row,
)
from dpolab.sample.generate import sample
from dpolab.sample.judges import get_judge
from dpolab.models import DEFAULT_MODEL, load_model
from dpolab.sample.pairs import build_pairs, check_pair_request, pair_settings, save_pairs
from dpolab.sample.sentiment import review_snippets
from dpolab.data.tokenize import TokenizedPair, pad_token_id


@dataclass
class SentimentConfig:
    """The controlled-sentiment reproduction. Defaults: the small CPU run behind the README's figure."""

    model: str = DEFAULT_MODEL
    """Initial model (the embedded SmolLM2-135M-Instruct, a local folder, or a hub id)."""
    n_train_prompts: int = 64
    """Training prefixes (each gets ``samples_per_prompt`` reference samples)."""
    n_eval_prompts: int = 32
    """Held-out prefixes (from snippets no training prefix comes from)."""
    min_prefix_tokens: int = 2
    """Shortest prefix, in tokens of the model's tokenizer (paper: 2)."""
    max_prefix_tokens: int = 8
    """Longest prefix (paper: 8)."""
    samples_per_prompt: int = 4
    """Reference samples per training prefix, turned into preference pairs."""
    pair_strategy: str = "all_pairs"
    """How samples become pairs: "all_pairs" (the paper's), "best_vs_worst" or "bradley_terry"."""
    max_new_tokens: int = 24
    """Length of every continuation, in tokens."""
    sft_steps: int = 8
    """SFT steps on review text before anything else, as the paper's §6.1 (0 = the initial model is π_ref)."""
    methods: tuple[str, ...] = ("dpo",)
    """Trained methods, each a curve: "dpo" (one per β), "preferred_ft", "unlikelihood", "rloo" and "ppo" (one per
    KL coefficient). Best-of-N and π_ref are always evaluated."""
    betas: tuple[float, ...] = (0.1,)
    """The β grid of the DPO runs."""
    loss: str = "sigmoid"
    """DPO-family loss (a name in dpolab.losses.LOSSES)."""
    steps: int = 32
    """Optimizer steps of each DPO, Preferred-FT and Unlikelihood run."""
    eval_every: int = 8
    """Evaluate every trained policy on the held-out prefixes every this many steps (and at the last step)."""
    batch_size: int = 8
    """Pairs per optimizer step (micro-batches of at most 8 accumulated)."""
    lr: float = 5e-5
    """Learning rate of DPO, Preferred-FT and Unlikelihood (AdamW; small CPU runs need far more than the paper's
    1e-6)."""
    unlikelihood_alpha: float = 1.0
    """Weight of the unlikelihood term −log(1 − π(y_l,t)) (Welleck et al.: 1)."""
    rloo_steps: int = 8
    """Steps of the RL baseline (each samples rloo_k continuations of rloo_prompts_per_step prefixes)."""
    rloo_prompts_per_step: int = 4
    """Prefixes per RLOO step."""
    rloo_k: int = 4
    """Samples per prefix in RLOO (the leave-one-out baseline needs ≥ 2)."""
    rloo_kl_coefs: tuple[float, ...] = (0.1,)
    """The KL-coefficient grid of the RL baseline (its reward is VADER − coef · log π/π_ref), one curve each."""
    rloo_lr: float = 2e-5
    """RLOO learning rate."""
    rloo_eval_every: int = 0
    """Evaluate the RL policy every this many steps (0 = ``eval_every``)."""
    ppo_steps: int = 8
    """Steps (rollouts) of PPO, the paper's RL baseline; each samples ppo_k continuations of ppo_prompts_per_step
    prefixes, drawn exactly as RLOO draws them."""
    ppo_prompts_per_step: int = 4
    """Prefixes per PPO rollout."""
    ppo_k: int = 4
    """Samples per prefix in a PPO rollout."""
    ppo_kl_coefs: tuple[float, ...] = (0.05,)
    """The KL-coefficient grid of PPO (per-token penalty, trl's ``kl_coef``), one curve each."""
    ppo_lr: float = 2e-5
    """PPO learning rate (policy and value head)."""
    num_ppo_epochs: int = 2
    """AdamW steps on each rollout (trl's ``num_ppo_epochs``; its default is 4)."""
    ppo_eval_every: int = 0
    """Evaluate the PPO policy every this many steps (0 = ``eval_every``)."""
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16)
    """N of the Best-of-N curve (π_ref is sampled max(best_of_n) times per held-out prefix)."""
    eval_samples_per_prompt: int = 4
    """Samples per held-out prefix for each evaluated checkpoint."""
    heldout_pair_samples: int = 8
    """π_ref samples per held-out prefix whose pairs measure the implicit-reward accuracy (at each run's end)."""
    seed: int = 0
    """Seed of prompt selection, sampling, pair labels and training."""
    output_dir: str = "runs/sentiment"
    """Where the pairs, metrics, results table and figure go (relative paths from the repository root)."""
    figure: str = "figures/sentiment_frontier.png"
    """Where the frontier figure is written ("" = not written)."""
    results: str = ""
    """Also copy the results JSON here (e.g. results/sentiment_default.json; "" = only output_dir/results.json)."""
    progress: bool = True
    """Show the stages and progress bars on stderr."""

    def __post_init__(self):
        if self.n_train_prompts < 1 or self.n_eval_prompts < 1:
            raise ValueError("n_train_prompts and n_eval_prompts must be >= 1 (an empty prompt set)")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to form a pair, got {self.samples_per_prompt}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError("need 1 <= min_prefix_tokens <= max_prefix_tokens")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known: {', '.join(METHODS)}")
        if self.steps < 1 or min(self.eval_every, self.rloo_eval_every, self.ppo_eval_every) < 0:
            raise ValueError("steps must be >= 1, eval_every, rloo_eval_every and ppo_eval_every >= 0")
        counts = {"batch_size": 1, "eval_samples_per_prompt": 1, "heldout_pair_samples": 2, "sft_steps": 0}
        if "rloo" in self.methods:  # a method that is asked for must be able to run: no zero-step RL stage
            counts.update(rloo_steps=1, rloo_prompts_per_step=1, rloo_k=2)
        if "ppo" in self.methods:
            counts.update(ppo_steps=1, ppo_prompts_per_step=1, ppo_k=1, num_ppo_epochs=1)
        for name, least in counts.items():
            if not getattr(self, name) >= least:
                rl = next((m for m in ("rloo", "ppo") if m in name), None)
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)!r}"
                                 + (f" (leave '{rl}' out of methods to skip it)" if rl else ""))
        for name in ("lr", "rloo_lr", "ppo_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)!r}")
        if not self.best_of_n or min(self.best_of_n) < 1:
            raise ValueError(f"best_of_n must list integers >= 1, got {self.best_of_n!r}")
        for name in ("betas", "rloo_kl_coefs", "ppo_kl_coefs"):
            values = getattr(self, name)
            if any(not (math.isfinite(v) and v >= 0) for v in values) or (name == "betas" and 0 in values):
                raise ValueError(f"{name} must be finite, > 0 for betas and >= 0 for KL coefficients; got {values!r}")


METHODS = ("dpo", "preferred_ft", "unlikelihood", "rloo", "ppo")


def resolve(path: str) -> Path:
    """A path relative to the repository root (notebooks and papermill run from other folders)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def make_prefixes(tokenizer, n_train: int, n_eval: int, lo: int, hi: int, seed: int) -> tuple[list[str], list[str]]:
    """Review prefixes of lo..hi tokens; train and held-out prefixes come from disjoint snippets.

    The held-out prefixes are drawn first, so every run with the same ``seed`` and ``n_eval`` evaluates on
    the same prompts whatever its ``n_train`` (runs of different notebooks can be ranked against each other).
    """
    texts = review_snippets()["text"]
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
    """π_ref's samples of the held-out prefixes, their rewards and π_ref's log-probs (see :func:`heldout_samples`)."""
    reference_row: dict | None = None
    """π_ref's checkpoint row (:func:`dpolab.experiments.sentiment_curves.reference_curve_row`), once evaluated."""

    def heldout_samples(self) -> dict:
        """π_ref's held-out samples (drawn once; see the module function :func:`heldout_samples`)."""
        return heldout_samples(self)


def prepare(config: SentimentConfig | None = None, **overrides) -> Setup:
    """Check the settings, load π_ref (after the optional SFT on reviews) and draw the prefixes."""
    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    check_pair_request(config.samples_per_prompt, config.pair_strategy)  # argument errors before any model load
    out = resolve(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    reference, tokenizer = load_model(config.model)
    train_prefixes, eval_prefixes = make_prefixes(tokenizer, config.n_train_prompts, config.n_eval_prompts,
                                                  config.min_prefix_tokens, config.max_prefix_tokens, config.seed)
    setup = Setup(config, reference.eval(), tokenizer, train_prefixes, eval_prefixes, get_judge("vader"),
                  get_judge("textblob"), out)
    setup.timings["load"] = time.perf_counter() - t
    if config.sft_steps > 0:
        t = time.perf_counter()
        setup.reference = sft_on_reviews(setup.reference, tokenizer, config, out)
        setup.timings["sft"] = time.perf_counter() - t
    return setup


def _sampling(setup: Setup, n: int, seed: int) -> dict:
    return dict(max_new_tokens=setup.config.max_new_tokens, top_k=len(setup.tokenizer), seed=seed,
                progress=setup.config.progress, n=n)


def make_pairs(setup: Setup):
    """Reference samples of the training prefixes → VADER scores → preference pairs, saved and reused.

    The pairs are saved under ``output_dir/pairs`` with their settings (generator, judge, sampling, strategy,
    seed, prompts) and token ids; a later run with the same settings (another β of a sweep) loads them
    instead of sampling again. Returns ``(dataset, tokenized_pairs, metadata)``.
    """
    from dpolab.sample.pairs import load_pairs, pairs_match

    config, t = setup.config, time.perf_counter()
    kw = _sampling(setup, config.samples_per_prompt, config.seed)
    sampling = {"n": kw["n"], "max_new_tokens": kw["max_new_tokens"], "temperature": 1.0, "top_p": 1.0,
                "top_k": kw["top_k"], "seed": kw["seed"], "chat": False}
    settings = pair_settings(generator=config.model, judge="vader", sampling=sampling, strategy=config.pair_strategy,
                             seed=config.seed, prompts=setup.train_prefixes, sft_steps=config.sft_steps)
    folder = setup.out / "pairs"
    if config.sft_steps == 0 and pairs_match(folder, settings):
        dataset, metadata = load_pairs(folder)
    else:
        kw.pop("n")
        samples = sample(setup.reference, setup.tokenizer, setup.train_prefixes, config.samples_per_prompt, **kw)
        scores = setup.reward_fn([p + c for p, row in zip(samples.prompts, samples.texts) for c in row])
        scores = scores.reshape(len(samples.prompts), config.samples_per_prompt)
        dataset, stats = build_pairs(samples.prompts, samples.texts, scores, config.pair_strategy, config.seed)
        dataset = _with_token_ids(dataset, samples)
        save_pairs(dataset, folder, settings, stats, overwrite=True)
        metadata = {"stats": stats.to_dict(), "settings": settings}
    pairs = [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [1] * len(r["chosen_ids"]),
                           [1] * len(r["rejected_ids"])) for r in dataset]
    setup.timings["pairs"] = time.perf_counter() - t
    return dataset, pairs, metadata


def _with_token_ids(dataset, samples):
    """Add the exact sampled token ids to each pair (training never re-tokenizes, so no boundary can shift)."""
    lookup = {}
    for p, (prompt, row) in enumerate(zip(samples.prompts, samples.texts)):
        for i, text in enumerate(row):
            lookup.setdefault((prompt, text), (samples.prompt_ids[p], samples.token_ids[p][i]))
    prompt_ids, chosen_ids, rejected_ids = [], [], []
    for row in dataset:
        ids, chosen = lookup[(row["prompt"], row["chosen"])]
        prompt_ids.append(list(ids))
        chosen_ids.append(list(chosen))
        rejected_ids.append(list(lookup[(row["prompt"], row["rejected"])][1]))
    return (dataset.add_column("prompt_ids", prompt_ids).add_column("chosen_ids", chosen_ids)
            .add_column("rejected_ids", rejected_ids))


def train_config(setup: Setup, name: str, **fields) -> dict:
    """The trainer settings shared by every policy of the experiment (a dict for dpolab.train.trainer.train)."""
    c = setup.config
    micro = min(8, c.batch_size)
    return dict(max_steps=c.steps, lr=c.lr, micro_batch_size=micro, grad_accum_steps=max(1, c.batch_size // micro),
                seed=c.seed, progress=c.progress, kl_samples=0, overwrite=True, output_dir=str(setup.out / name),
                **fields)


def _with_policy(policy, on_step):
    """``on_step(step, record)`` for the trainer, given a callback of ``(policy, step, record)``."""
    return None if on_step is None else (lambda step, record: on_step(policy, step, record))


def train_dpo(setup: Setup, pairs: list[TokenizedPair], beta: float, loss: str | None = None, on_step=None):
    """A copy of π_ref trained with DPO at ``beta`` (reference log-probs precomputed once, cached by hash).

    ``on_step(policy, step, record)`` runs after every optimizer step (e.g. to evaluate checkpoints).
    Returns ``(policy, TrainResult)``.
    """
    from dpolab.train.trainer import train

    policy = copy.deepcopy(setup.reference)
    result = train(train_config(setup, f"dpo_beta{beta:g}", stage="dpo", beta=beta, loss=loss or setup.config.loss,
                                reference="precomputed"), model=policy, tokenizer=setup.tokenizer, train_pairs=pairs,
                   on_step=_with_policy(policy, on_step))
    return policy.eval(), result


def train_preferred_ft(setup: Setup, pairs: list[TokenizedPair], on_step=None):
    """Preferred-FT: a copy of π_ref trained with SFT on the chosen responses. Returns ``(policy, TrainResult)``."""
    from dpolab.train.trainer import train

    policy = copy.deepcopy(setup.reference)
    result = train(train_config(setup, "preferred_ft", stage="sft"), model=policy, tokenizer=setup.tokenizer,
                   train_pairs=pairs, on_step=_with_policy(policy, on_step))
    return policy.eval(), result


def train_unlikelihood(setup: Setup, pairs: list[TokenizedPair], on_step=None):
    """Unlikelihood (:mod:`dpolab.baselines.unlikelihood`) from a copy of π_ref. Returns ``(policy, history)``."""
    from dpolab.baselines.unlikelihood import unlikelihood_train

    c = setup.config
    policy = copy.deepcopy(setup.reference)
    history = unlikelihood_train(policy, pairs, pad_token_id(setup.tokenizer), steps=c.steps, batch_size=c.batch_size,
                                 lr=c.lr, alpha=c.unlikelihood_alpha, seed=c.seed, progress=c.progress,
                                 on_step=_with_policy(policy, on_step))
    return policy.eval(), history


def train_rloo(setup: Setup, kl_coef: float | None = None, on_step=None):
    """The RL baseline (dpolab.baselines.rloo) from a copy of π_ref. Returns ``(policy, history)``."""
    from dpolab.baselines.rloo import rloo_train

    c = setup.config
    policy = copy.deepcopy(setup.reference)
    history = rloo_train(policy, setup.reference, setup.tokenizer, setup.train_prefixes, setup.reward_fn,
                         steps=c.rloo_steps, prompts_per_step=c.rloo_prompts_per_step, k=c.rloo_k,
                         kl_coef=c.rloo_kl_coefs[0] if kl_coef is None else kl_coef, lr=c.rloo_lr,
                         max_new_tokens=c.max_new_tokens, seed=c.seed, progress=c.progress,
                         on_step=_with_policy(policy, on_step))
    return policy.eval(), history


def train_ppo(setup: Setup, kl_coef: float | None = None, on_step=None):
    """PPO (dpolab.baselines.ppo) from a copy of π_ref. Returns ``(policy, history)``."""
    from dpolab.baselines.ppo import ppo_train

    c = setup.config
    policy = copy.deepcopy(setup.reference)
    history = ppo_train(policy, setup.reference, setup.tokenizer, setup.train_prefixes, setup.reward_fn,
                        steps=c.ppo_steps, prompts_per_step=c.ppo_prompts_per_step, k=c.ppo_k,
                        kl_coef=c.ppo_kl_coefs[0] if kl_coef is None else kl_coef, lr=c.ppo_lr,
                        num_ppo_epochs=c.num_ppo_epochs, max_new_tokens=c.max_new_tokens, seed=c.seed,
                        progress=c.progress, on_step=_with_policy(policy, on_step))
    return policy.eval(), history


def heldout_samples(setup: Setup) -> dict:
    """max(best_of_n) samples of π_ref per held-out prefix, their VADER rewards and π_ref's log-probs (cached).

    They serve Best-of-N and the reference row, and their pairs are the held-out preference pairs on which every
    trained policy's implicit-reward accuracy is measured (pairs from π_ref's samples, like the training pairs).
    """
    if setup.heldout is None:
        from dpolab.sample.completions import completion_logprobs

        c = setup.config
        kw = _sampling(setup, max(*c.best_of_n, c.heldout_pair_samples, 2), c.seed + 1)
        samples = sample(setup.reference, setup.tokenizer, setup.eval_prefixes, kw.pop("n"), **kw)
        rewards = np.asarray(setup.reward_fn(full_texts(samples))).reshape(len(samples.prompts), -1)
        setup.heldout = {"samples": samples, "rewards": rewards,
                         "ref_logps": completion_logprobs(setup.reference, samples, pad_token_id(setup.tokenizer))}
    return setup.heldout


def evaluate(setup: Setup, name: str, method: str, policy, **extra) -> dict:
    """One results row: ``policy`` sampled on the held-out prefixes, scored, KL to π_ref, held-out pair accuracy."""
    from dpolab.sample.completions import completion_logprobs

    c = setup.config
    held = heldout_samples(setup)
    ratios = completion_logprobs(policy, held["samples"], pad_token_id(setup.tokenizer)) - held["ref_logps"]
    return evaluate_policy(name, method, policy, setup.reference, setup.tokenizer, setup.eval_prefixes,
                           n=c.eval_samples_per_prompt, max_new_tokens=c.max_new_tokens, seed=c.seed + 1,
                           reward_fn=setup.reward_fn, judge_fn=setup.judge_fn,
                           **heldout_pair_accuracy(ratios.numpy(), held["rewards"]), **extra)


def reference_rows(setup: Setup) -> list[dict]:
    """π_ref itself and the Best-of-N baselines, from max(best_of_n) reference samples per held-out prefix."""
    held = heldout_samples(setup)
    rows = [evaluate_samples("reference", "Reference", held["samples"], setup.reward_fn, setup.judge_fn, None)]
    return rows + best_of_n_rows(held["samples"], setup.reward_fn, setup.judge_fn, setup.config.best_of_n)


def run(config: SentimentConfig | None = None, **overrides) -> dict:
    """The whole experiment: every method's reward–KL curve, the matched-KL comparisons, the results file.

    Returns ``{"results", "table", "figure", "timings", "pair_stats"}``; ``results`` is the dict written to
    ``output_dir/results.json`` (and to ``config.results`` when set), in the format that
    :func:`dpolab.experiments.sentiment_report.from_results` reads. The last checkpoint of every curve and the
    Best-of-N rows are also saved with :func:`save_model_row` under ``output_dir/models`` for ranking.
    """
    from dpolab.experiments import sentiment_curves as curves
    from dpolab.experiments.sentiment_report import assemble, write_results

    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    stages = ["load + SFT", "preference pairs", "π_ref held-out samples"]
    stages += [f"DPO β={b:g}" for b in config.betas] if "dpo" in config.methods else []
    stages += [name for key, name in (("preferred_ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood"))
               if key in config.methods]
    stages += [f"RLOO KL coef {k:g}" for k in config.rloo_kl_coefs] if "rloo" in config.methods else []
    stages += [f"PPO KL coef {k:g}" for k in config.ppo_kl_coefs] if "ppo" in config.methods else []
    say = _stage_printer(stages, config.progress)
    t0 = time.perf_counter()

    say("load + SFT")
    setup = prepare(config)
    config, timings = setup.config, setup.timings
    say("preference pairs")
    _, pairs, metadata = make_pairs(setup)
    say("π_ref held-out samples")
    t = time.perf_counter()
    setup.heldout_samples()
    timings["reference_samples"] = time.perf_counter() - t
    setup.reference_row = curves.reference_curve_row(setup)
    if config.progress:
        r = setup.reference_row
        print(f"    π_ref: reward {r['reward']:.6f} ± {r['reward_se']:.6f} over {len(r['prompt_rewards'])} prefixes",
              file=sys.stderr, flush=True)
    rows = [setup.reference_row, *curves.best_of_n_curve_rows(setup, config.best_of_n)]
    learning_curves = {}

    partial_path = setup.out / "results.partial.json"
    finished = _finished_curves(partial_path, config)

    def traced(method: str, knob: float, name: str, train_fn, every: int, steps: int):
        """Train one curve, evaluating at the checkpoint steps; record train and eval seconds apart."""
        if name in finished:  # measured by an earlier run of the same settings that stopped later
            say(name)
            done = finished[name]
            rows.extend(done["rows"])
            learning_curves[done["key"]] = done["learning_curve"]
            timings[f"{name} (train, reused from an earlier run)"] = done["train_seconds"]
            saved[name] = done
            return
        say(name)
        at = curves.checkpoint_steps(steps, every)
        points = [curves.start_row(setup.reference_row, method, knob)]
        spent = {"eval": 0.0}

        def on_step(policy, step, record):
            if step in at:
                started = time.perf_counter()
                points.append(curves.evaluate_checkpoint(setup, policy, method, knob, step,
                                                         pair_accuracy=step == steps))
                spent["eval"] += time.perf_counter() - started
                for part, seconds in points[-1]["eval_seconds"].items():
                    timings[f"evaluation: {part} (all curves)"] = timings.get(
                        f"evaluation: {part} (all curves)", 0.0) + seconds
                if config.progress:
                    r = points[-1]
                    print(f"    step {step}: reward {r['reward']:.3f} ± {r['reward_se']:.3f}, "
                          f"KL {r['kl']:.2f} ± {r['kl_se']:.2f}, gain {r['gain']:+.3f} ± {r['gain_se']:.3f}",
                          file=sys.stderr, flush=True)

        started = time.perf_counter()
        _, result = train_fn(on_step)
        timings[f"{name} (train)"] = time.perf_counter() - started - spent["eval"]
        history = getattr(result, "history", result)
        key = points[-1]["policy"].rsplit("_step", 1)[0]
        learning_curves[key] = [{k: v for k, v in record.items() if isinstance(v, int | float)
                                 and not isinstance(v, bool)} for record in history]
        rows.extend(points)
        # each finished curve is on disk at once: a run stopped later keeps it, and its rerun reuses it
        saved[name] = {"rows": points, "key": key, "learning_curve": learning_curves[key],
                       "train_seconds": timings[f"{name} (train)"]}
        atomic_write_text(partial_path, json.dumps({"config": _reuse_key(config), "curves": saved}, default=float))

    saved = {}

    if "dpo" in config.methods:
        for beta in config.betas:
            traced("DPO", beta, f"DPO β={beta:g}",
                   lambda cb, beta=beta: train_dpo(setup, pairs, beta, on_step=cb), config.eval_every, config.steps)
    if "preferred_ft" in config.methods:
        traced("Preferred-FT", 0.0, "Preferred-FT", lambda cb: train_preferred_ft(setup, pairs, on_step=cb),
               config.eval_every, config.steps)
    if "unlikelihood" in config.methods:
        traced("Unlikelihood", 0.0, "Unlikelihood", lambda cb: train_unlikelihood(setup, pairs, on_step=cb),
               config.eval_every, config.steps)
    if "rloo" in config.methods:
        for coef in config.rloo_kl_coefs:
            traced("RLOO", coef, f"RLOO KL coef {coef:g}",
                   lambda cb, coef=coef: train_rloo(setup, coef, on_step=cb),
                   config.rloo_eval_every or config.eval_every, config.rloo_steps)
    if "ppo" in config.methods:
        for coef in config.ppo_kl_coefs:
            traced("PPO", coef, f"PPO KL coef {coef:g}", lambda cb, coef=coef: train_ppo(setup, coef, on_step=cb),
                   config.ppo_eval_every or config.eval_every, config.ppo_steps)
    total = time.perf_counter() - t0
    timings["other (model copies, bookkeeping)"] = total - sum(timings.values())
    timings["total"] = total

    results = assemble(config, rows, learning_curves, timings, metadata.get("stats"))
    partial_path.unlink(missing_ok=True)  # the whole run is in the results file now
    for row in results["policies"]:
        if row["method"] == "Best of N" or (row["method"] != "Reference" and row.get("final")):
            save_model_row(row, setup.out / "models", source="sentiment")
    paths = write_results(results, setup.out / "results.json", resolve(config.results) if config.results else None,
                          resolve(config.figure) if config.figure else None)
    say(None)
    return {"results": results, **paths, "timings": timings, "pair_stats": metadata.get("stats")}


def _reuse_key(config: SentimentConfig) -> dict:
    """The settings that decide a curve's numbers (not where files go or whether bars are shown)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "figure", "results")}


def _finished_curves(path: Path, config: SentimentConfig) -> dict:
    """Curves an earlier, stopped run of the same settings finished (``results.partial.json``); {} otherwise."""
    try:
        partial = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    same = partial.get("config") == json.loads(json.dumps(_reuse_key(config), default=float))
    if same and partial.get("curves"):
        print(f"dpolab reproduce: reusing {len(partial['curves'])} finished curve(s) of an earlier stopped run with "
              f"the same settings ({path})", file=sys.stderr)
    return partial.get("curves", {}) if same else {}


def _stage_printer(stages: list[str], enabled: bool):
    """``say(name)`` prints "[i/n] name" with the time since the previous stage (``say(None)``: the end)."""
    state = {"t": time.perf_counter(), "t0": time.perf_counter(), "last": None}

    def say(name):
        if not enabled:
            return
        now = time.perf_counter()
        if state["last"] is not None:
            print(f"      {state['last']} done in {now - state['t']:.0f} s", file=sys.stderr, flush=True)
        if name is None:
            print(f"[dpolab reproduce] finished in {now - state['t0']:.0f} s", file=sys.stderr, flush=True)
        else:
            i = stages.index(name) + 1 if name in stages else "?"
            print(f"[dpolab reproduce {i}/{len(stages)}] {name} …", file=sys.stderr, flush=True)
        state["t"], state["last"] = now, name

    return say


def _last(result) -> dict:
    history = getattr(result, "history", None) or []
    return history[-1] if history else {}


def sft_on_reviews(model, tokenizer, config: SentimentConfig, out: Path):
    """Short SFT on review snippets (prefix → rest of the snippet), so π_ref writes reviews; returns the model."""
    from dpolab.train.trainer import train

    texts = review_snippets()["text"]
    rng = np.random.default_rng(config.seed + 7)
    examples = []
    for i in rng.permutation(len(texts))[: config.sft_steps * config.batch_size]:
        ids = tokenizer(texts[int(i)], add_special_tokens=False).input_ids[: config.max_new_tokens + 8]
        k = int(rng.integers(config.min_prefix_tokens, config.max_prefix_tokens + 1))
        if len(ids) > k + 1:
            rest = ids[k:] + [tokenizer.eos_token_id]
            examples.append(TokenizedPair(ids[:k], rest, rest, [1] * len(rest), [1] * len(rest)))
    train(dict(stage="sft", max_steps=config.sft_steps, lr=config.lr, seed=config.seed, progress=config.progress,
               micro_batch_size=4, grad_accum_steps=max(1, config.batch_size // 4), kl_samples=0, overwrite=True,
               output_dir=str(out / "sft")), model=model, tokenizer=tokenizer, train_pairs=examples)
    return model.eval()


from dpolab.experiments.sentiment_report import from_results, table_markdown  # noqa: E402, F401  (public names)
