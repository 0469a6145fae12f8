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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolab.cache import REPO_ROOT, atomic_write_text
from dpolab.experiments.sentiment_eval import best_of_n_rows, evaluate_policy, evaluate_samples
from dpolab.generate import sample
from dpolab.models import DEFAULT_MODEL, load_model
from dpolab.pairs import build_pairs, pair_settings, save_pairs
from dpolab.judges import get_judge
from dpolab.pairs import check_pair_request
from dpolab.sentiment import review_snippets
from dpolab.tokenize import TokenizedPair


@dataclass
class SentimentConfig:
    """The controlled-sentiment reproduction. Defaults: the small CPU run behind the README's figure."""

    model: str = DEFAULT_MODEL
    """Initial model (the embedded SmolLM2-135M-Instruct, a local folder, or a hub id)."""
    n_train_prompts: int = 96
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
    sft_steps: int = 0
    """Optional SFT of the initial model on review text before anything else (0 = use the model as π_ref)."""
    betas: tuple[float, ...] = (0.05, 0.1, 0.5)
    """The β grid of the DPO runs."""
    loss: str = "sigmoid"
    """DPO-family loss (a name in dpolab.losses.LOSSES)."""
    steps: int = 24
    """Optimizer steps of each DPO and Preferred-FT run."""
    batch_size: int = 8
    """Pairs per optimizer step (micro-batches of 4 accumulated)."""
    lr: float = 5e-5
    """Learning rate of DPO and Preferred-FT (AdamW; small CPU runs need far more than the paper's 1e-6)."""
    rloo_steps: int = 16
    """Steps of the RL baseline (each samples rloo_k continuations of rloo_prompts_per_step prefixes)."""
    rloo_prompts_per_step: int = 4
    """Prefixes per RLOO step."""
    rloo_k: int = 4
    """Samples per prefix in RLOO (the leave-one-out baseline needs ≥ 2)."""
    rloo_kl_coef: float = 0.1
    """β of the KL penalty in the RL baseline's reward."""
    rloo_lr: float = 2e-5
    """RLOO learning rate."""
    best_of_n: tuple[int, ...] = (2, 4, 8)
    """N of the Best-of-N baselines (the reference is sampled max(best_of_n) times per held-out prefix)."""
    eval_samples_per_prompt: int = 4
    """Samples per held-out prefix for each trained policy."""
    seed: int = 0
    """Seed of prompt selection, sampling, pair labels and training."""
    output_dir: str = "runs/sentiment"
    """Where the pairs, metrics, results table and figure go (relative paths from the repository root)."""
    figure: str = "figures/sentiment_frontier.png"
    """Where the frontier figure is written ("" = not written)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        if self.n_train_prompts < 1 or self.n_eval_prompts < 1:
            raise ValueError("n_train_prompts and n_eval_prompts must be >= 1 (an empty prompt set)")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to form a pair, got {self.samples_per_prompt}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError("need 1 <= min_prefix_tokens <= max_prefix_tokens")


def resolve(path: str) -> Path:
    """A path relative to the repository root (notebooks and papermill run from other folders)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def make_prefixes(tokenizer, n_train: int, n_eval: int, lo: int, hi: int, seed: int) -> tuple[list[str], list[str]]:
    """Review prefixes of lo..hi tokens; train and held-out prefixes come from disjoint snippets."""
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
    return prefixes[:n_train], prefixes[n_train:]


def _tokenized_pairs(pairs, samples) -> list[TokenizedPair]:
    """Pairs over the exact sampled token ids (no re-tokenization, so no boundary can shift)."""
    lookup = {}
    for p, (prompt, row) in enumerate(zip(samples.prompts, samples.texts)):
        for i, text in enumerate(row):
            lookup.setdefault((prompt, text), (samples.prompt_ids[p], samples.token_ids[p][i]))
    out = []
    for row in pairs:
        prompt_ids, chosen = lookup[(row["prompt"], row["chosen"])]
        _, rejected = lookup[(row["prompt"], row["rejected"])]
        out.append(TokenizedPair(list(prompt_ids), list(chosen), list(rejected), [1] * len(chosen),
                                 [1] * len(rejected)))
    return out


def run(config: SentimentConfig | None = None, **overrides) -> dict:
    """Run the whole experiment; return ``{"rows": [...], "figure": path, "table": path, "timings": {...}}``."""
    from dpolab.plotting import frontier_figure, save_figure
    from dpolab.trainer import train

    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    # every argument error before the model is loaded
    check_pair_request(config.samples_per_prompt, config.pair_strategy)
    vader_reward, textblob_reward = get_judge("vader"), get_judge("textblob")
    out = resolve(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.perf_counter()
    torch.manual_seed(config.seed)
    reference, tokenizer = load_model(config.model)
    reference.eval()
    train_prefixes, eval_prefixes = make_prefixes(tokenizer, config.n_train_prompts, config.n_eval_prompts,
                                                  config.min_prefix_tokens, config.max_prefix_tokens, config.seed)
    timings["load"] = time.perf_counter() - t0

    common = dict(max_new_tokens=config.max_new_tokens, top_k=len(tokenizer), progress=config.progress)
    t = time.perf_counter()
    if config.sft_steps > 0:
        reference = _sft_on_reviews(reference, tokenizer, config, out)
    timings["sft"] = time.perf_counter() - t

    # preference pairs from reference samples labelled by the ground truth
    t = time.perf_counter()
    ref_train = sample(reference, tokenizer, train_prefixes, config.samples_per_prompt, seed=config.seed, **common)
    scores = vader_reward([p + c for p, row in zip(train_prefixes, ref_train.texts) for c in row])
    scores = scores.reshape(len(train_prefixes), config.samples_per_prompt)
    pairs, stats = build_pairs(train_prefixes, ref_train.texts, scores, config.pair_strategy, config.seed)
    settings = pair_settings(generator=config.model, judge="vader", sampling=ref_train.settings,
                             strategy=config.pair_strategy, seed=config.seed, prompts=train_prefixes)
    save_pairs(pairs, out / "pairs", settings, stats, overwrite=True)
    train_pairs = _tokenized_pairs(pairs, ref_train)
    timings["pairs"] = time.perf_counter() - t

    def evaluate(name, method, policy, **extra):
        return evaluate_policy(name, method, policy, reference, tokenizer, eval_prefixes,
                               n=config.eval_samples_per_prompt, max_new_tokens=config.max_new_tokens,
                               seed=config.seed + 1, reward_fn=vader_reward, judge_fn=textblob_reward, **extra)

    rows = []
    t = time.perf_counter()
    ref_eval = sample(reference, tokenizer, eval_prefixes, max(config.best_of_n), seed=config.seed + 1, **common)
    rows.append(evaluate_samples("reference", "Reference", ref_eval, vader_reward, textblob_reward, None))
    rows.extend(best_of_n_rows(ref_eval, vader_reward, textblob_reward, config.best_of_n))
    timings["reference_eval"] = time.perf_counter() - t

    base = dict(max_steps=config.steps, lr=config.lr, micro_batch_size=min(4, config.batch_size),
                grad_accum_steps=max(1, config.batch_size // 4), seed=config.seed, progress=config.progress,
                kl_samples=0, overwrite=True)
    for beta in config.betas:
        t = time.perf_counter()
        policy = copy.deepcopy(reference)
        result = train(dict(base, stage="dpo", beta=beta, loss=config.loss, reference="precomputed",
                            output_dir=str(out / f"dpo_beta{beta:g}")), model=policy, tokenizer=tokenizer,
                       train_pairs=train_pairs)
        rows.append(evaluate(f"dpo_beta{beta:g}", "DPO", policy, beta=beta, final_metrics=_last(result)))
        timings[f"dpo_beta{beta:g}"] = time.perf_counter() - t
        del policy

    t = time.perf_counter()
    policy = copy.deepcopy(reference)
    result = train(dict(base, stage="sft", output_dir=str(out / "preferred_ft")), model=policy, tokenizer=tokenizer,
                   train_pairs=train_pairs)
    rows.append(evaluate("preferred_ft", "Preferred-FT", policy, final_metrics=_last(result)))
    timings["preferred_ft"] = time.perf_counter() - t
    del policy

    t = time.perf_counter()
    from dpolab.rloo import rloo_train

    policy = copy.deepcopy(reference)
    history = rloo_train(policy, reference, tokenizer, train_prefixes,
                         lambda texts: vader_reward(texts), steps=config.rloo_steps,
                         prompts_per_step=config.rloo_prompts_per_step, k=config.rloo_k,
                         kl_coef=config.rloo_kl_coef, lr=config.rloo_lr, max_new_tokens=config.max_new_tokens,
                         seed=config.seed, progress=config.progress)
    rows.append(evaluate("rloo", "RLOO", policy, kl_coef=config.rloo_kl_coef, final_metrics=history[-1]))
    timings["rloo"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    table = out / "results.json"
    atomic_write_text(table, json.dumps({"config": dataclasses.asdict(config), "pair_stats": dataclasses.asdict(stats),
                                         "rows": rows, "timings": timings}, indent=2, default=str))
    figure = None
    if config.figure:
        figure = save_figure(frontier_figure(rows), resolve(config.figure))
    return {"rows": rows, "table": table, "figure": figure, "timings": timings, "pair_stats": stats}


def _last(result) -> dict:
    history = getattr(result, "history", None) or []
    return history[-1] if history else {}


def _sft_on_reviews(model, tokenizer, config: SentimentConfig, out: Path):
    """Short SFT on whole review snippets (prefix → rest of the snippet), so π_ref writes reviews."""
    from dpolab.trainer import train

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


def table_markdown(rows: list[dict]) -> str:
    """The results as a Markdown table (reward and KL with ± one standard error)."""
    lines = ["| policy | method | VADER reward | KL(π‖π_ref) (nats) | TextBlob | samples |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['method']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     f"{r['kl']:.2f} ± {r['kl_se']:.2f} | {r['judge']:.3f} ± {r['judge_se']:.3f} | {r['n_samples']} |")
    return "\n".join(lines)
