"""The settings of the controlled-sentiment experiment (:mod:`dpolab.experiments.sentiment`): one dataclass of
commented, typed fields whose defaults are the small CPU run; ``configs/sentiment_full.yaml`` is the full one.

Settings are checked when the dataclass is built, before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.models import DEFAULT_MODEL
from dpolab.train.overrides import load_config

METHODS = ("dpo", "preferred_ft", "unlikelihood", "rloo", "ppo", "rloo_rm", "ppo_rm", "reward_model", "online_dpo",
           "online_dpo_rm")
"""The trained methods; Best-of-N and π_ref are always evaluated. "rloo" and "ppo" read the ground truth (their
curves are named RLOO-GT and PPO-GT, the paper's oracle); "rloo_rm" and "ppo_rm" read a reward model learned from
the same preference pairs as DPO (curves RLOO and PPO: the RLHF pipeline DPO replaces); "reward_model" trains and
reports the reward model alone (the RM arms train it too). "online_dpo" (curve Online DPO-GT, the ground truth as
judge) and "online_dpo_rm" (Online DPO, the learned reward model as judge) take RLOO's rollouts and DPO's loss."""

OPTIMS = {"adamw_torch": "adamw", "rmsprop": "rmsprop"}
"""HF's ``optim`` names the experiment takes -> dpolab.train.config.TrainConfig's ``optimizer``."""

RL_METHODS = {"rloo": "RLOO-GT", "ppo": "PPO-GT", "rloo_rm": "RLOO", "ppo_rm": "PPO", "online_dpo": "Online DPO-GT",
              "online_dpo_rm": "Online DPO"}
"""Config name of each RL arm -> its curve's name (named by what it reads)."""


@dataclass
class SentimentConfig:
    """The controlled-sentiment reproduction. Defaults: the small CPU run behind the README's figure."""

    model: str = DEFAULT_MODEL
    """Initial model (the embedded SmolLM2-135M-Instruct, a local folder, or a hub id)."""
    dataset_name: str = ""
    """trl's name: the review texts the prefixes (and the SFT on reviews) come from: "" = the embedded Rotten
    Tomatoes snippets; a hub id of IMDb's shape (text, label), e.g. stanfordnlp/imdb (the paper's), or a local
    .parquet/.csv/.jsonl file or folder of that shape (dpolab.sample.review_text)."""
    dataset_train_split: str = "train"
    """trl's name: the split of dataset_name to read (a single file has only "train")."""
    dataset_text_field: str = "text"
    """trl's name: the column of dataset_name that holds the review text."""
    judge: str = "vader"
    """The ground-truth reward: "vader" (the embedded default), "textblob", or a sequence classifier (local folder or
    hub id, e.g. lvwerra/distilbert-imdb, the paper's) scoring prefix + continuation."""
    judge_label: str = "POSITIVE"
    """With a classifier judge: the class whose score is the reward (a name of its id2label, or an index)."""
    judge_output: str = "logit"
    """With a classifier judge: "logit" (the class logit) or "probability" (its softmax probability)."""
    optim: str = "adamw_torch"
    """HF's name: optimizer of DPO, Preferred-FT and the SFT on reviews: "adamw_torch" or "rmsprop" (the paper's,
    §B); Unlikelihood, the reward model and the RL arms keep AdamW."""
    warmup_steps: int = 2
    """HF's name: linear warm-up steps of DPO, Preferred-FT and the SFT on reviews (the paper: 150)."""
    device: str = "auto"
    """Where models train, sample and score: "auto" (CUDA if available, else CPU), "cpu" or "cuda[:N]" (dpolab.data.device)."""
    use_cpu: bool = False
    """HF TrainingArguments' name: true keeps everything on the CPU even where CUDA is available."""
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
    """Optimizer steps of each DPO, Preferred-FT and Unlikelihood run (unless ``num_train_epochs`` is set)."""
    num_train_epochs: float = 0.0
    """When > 0: DPO, Preferred-FT and Unlikelihood run this many passes over their pairs instead of ``steps``
    (ceil(epochs · pairs / batch_size) steps; the rows carry ``epoch``)."""
    heldout_acc_every_eval: bool = False
    """Measure the implicit-reward accuracy on the held-out pairs at every checkpoint (not only the last)."""
    reward_model_epochs: float = 2.0
    """Passes over the preference pairs of the reward model (trl RewardConfig's ``num_train_epochs``); the checkpoint
    with the best held-out pair accuracy, evaluated at each epoch's end, is kept."""
    reward_model_lr: float = 1e-5
    """Learning rate of the reward model (AdamW, constant)."""
    reward_model_batch_size: int = 8
    """Pairs per reward-model step."""
    reward_model_eval_steps: int = 0
    """Also evaluate the reward model every this many steps (0 = at each epoch's end only)."""
    win_rate_temperatures: tuple[float, ...] = ()
    """The paper's Fig. 3 (left): the final policy of every curve (and π_ref) sampled at these temperatures, its win
    rate against π_ref's held-out samples at temperature 1 judged by the ground truth (() = skipped)."""
    center_rewards_coefficient: float = 0.0
    """trl RewardConfig's ``center_rewards_coefficient``: adds c·(r_w + r_l)² to the loss (0 = off)."""
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
    online_dpo_betas: tuple[float, ...] = (0.1,)
    """The β grid of online DPO (one curve each); its rollouts are RLOO's (``rloo_steps``, ``rloo_prompts_per_step``,
    ``rloo_k``: the same reward queries per step), its loss ``loss`` and learning rate ``lr`` are DPO's."""
    online_dpo_pair_strategy: str = "all_pairs"
    """How online DPO pairs a prefix's k samples: "all_pairs" or "best_vs_worst" (ties dropped and counted)."""
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
    """Seed of prompt selection, sampling, pair labels, evaluation and (unless ``train_seeds`` is set) training."""
    train_seeds: tuple[int, ...] = ()
    """Training seeds: every trained curve (DPO at each β, Preferred-FT, Unlikelihood, each RL arm at each knob) is
    trained once per seed listed (() = once, with ``seed``). Only training's randomness changes (the pairs' order,
    the RL arms' prompt order and rollout samples): π_ref, the prefixes, the pairs, the reward model and the
    evaluation samples stay those of ``seed``, so runs with different training seeds merge and their spread is
    training noise. A curve trained with a seed other than ``seed`` is named with it ("DPO β=0.1 seed 1")."""
    output_dir: str = "runs/sentiment"
    """Where the pairs, metrics, results table and figure go (relative paths from the repository root)."""
    figure: str = "figures/sentiment_frontier.png"
    """Where the frontier figure is written ("" = not written)."""
    results: str = ""
    """Also copy the results JSON here (e.g. results/sentiment_default.json; "" = only output_dir/results.json)."""
    progress: bool = True
    """Show the stages and progress bars on stderr."""

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> SentimentConfig:
        """Defaults, then the YAML file at ``path`` (e.g. ``configs/sentiment_full.yaml``), then ``overrides`` (a dict
        or ``"key=value"`` strings; ``betas=0.1,0.5``, ``methods=dpo,rloo``), type-checked as
        :func:`dpolab.train.overrides.load_config` does for every config."""
        return load_config(cls, path, overrides, help_command="dpolab reproduce --help")

    def __post_init__(self):
        from dpolab.data.device import check_device

        check_device(self.device, self.use_cpu)
        if self.optim not in OPTIMS:
            raise ValueError(f"optim must be one of {sorted(OPTIMS)} (HF's names), got {self.optim!r}")
        if self.judge_output not in ("logit", "probability"):
            raise ValueError(f"judge_output must be 'logit' or 'probability', got {self.judge_output!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
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
        if {"rloo", "rloo_rm", "online_dpo", "online_dpo_rm"} & set(self.methods):  # a method that is asked for must be able to run
            counts.update(rloo_steps=1, rloo_prompts_per_step=1, rloo_k=2)
        if self.online_dpo_pair_strategy not in ("all_pairs", "best_vs_worst"):
            raise ValueError(f"online_dpo_pair_strategy must be 'all_pairs' or 'best_vs_worst', got "
                             f"{self.online_dpo_pair_strategy!r}")
        if {"rloo_rm", "ppo_rm", "reward_model", "online_dpo_rm"} & set(self.methods):
            counts.update(reward_model_batch_size=1)
        if {"ppo", "ppo_rm"} & set(self.methods):
            counts.update(ppo_steps=1, ppo_prompts_per_step=1, ppo_k=1, num_ppo_epochs=1)
        for name, least in counts.items():
            if not getattr(self, name) >= least:
                rl = next((m for m in ("rloo", "ppo") if m in name), None)
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)!r}"
                                 + (f" (leave '{rl}' out of methods to skip it)" if rl else ""))
        if not (math.isfinite(self.num_train_epochs) and self.num_train_epochs >= 0):
            raise ValueError(f"num_train_epochs must be >= 0 (0 = use steps), got {self.num_train_epochs!r}")
        if not (math.isfinite(self.reward_model_epochs) and self.reward_model_epochs > 0):
            raise ValueError(f"reward_model_epochs must be > 0, got {self.reward_model_epochs!r}")
        if self.reward_model_eval_steps < 0 or any(not (math.isfinite(t) and t > 0) for t in self.win_rate_temperatures):
            raise ValueError("reward_model_eval_steps must be >= 0 and win_rate_temperatures > 0")
        if not (math.isfinite(self.center_rewards_coefficient) and self.center_rewards_coefficient >= 0):
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient!r}")
        for name in ("lr", "rloo_lr", "ppo_lr", "reward_model_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)!r}")
        if len(set(self.train_seeds)) != len(self.train_seeds) or any(t < 0 for t in self.train_seeds):
            raise ValueError(f"train_seeds must list distinct integers >= 0, got {self.train_seeds!r}")
        if not self.best_of_n or min(self.best_of_n) < 1:
            raise ValueError(f"best_of_n must list integers >= 1, got {self.best_of_n!r}")
        for name in ("betas", "online_dpo_betas", "rloo_kl_coefs", "ppo_kl_coefs"):
            values = getattr(self, name)
            if any(not (math.isfinite(v) and v >= 0) for v in values) or ("betas" in name and 0 in values):
                raise ValueError(f"{name} must be finite, > 0 for betas and >= 0 for KL coefficients; got {values!r}")


