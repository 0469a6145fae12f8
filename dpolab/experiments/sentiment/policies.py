"""The policies the controlled-sentiment experiment compares, each trained from a copy of π_ref, and the short SFT on
review text that makes π_ref (the paper's §6.1 fine-tunes GPT-2-large on IMDb first), trained once per settings and
reused from the dpolab cache (:func:`sft_reference`), so every β of a sweep starts from the same π_ref.

Every ``train_*`` takes the experiment's :class:`dpolab.experiments.sentiment.Setup` and returns ``(policy, record)``
with the trained copy in eval mode; ``on_step(policy, step, record)`` runs after every optimizer step (e.g. to
evaluate checkpoints).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights

from dpolab.baselines.online_dpo import online_dpo_train
from dpolab.baselines.ppo import ppo_train
from dpolab.baselines.rloo import rloo_train
from dpolab.baselines.rollout import RolloutSettings
from dpolab.baselines.unlikelihood import unlikelihood_train
from dpolab.data.cache import build_artifact, cache_dir
from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.experiments.sentiment.config import OPTIMS, SentimentConfig
from dpolab.sample.pairs import json_hash
from dpolab.sample.review_text import review_texts
from dpolab.train.trainer import train


def train_config(setup, name: str, steps: int | None = None, seed: int | None = None, **fields) -> dict:
    """The trainer settings shared by every policy of the experiment (a dict for dpolab.train.trainer.train);
    ``seed``: the training seed (default: the experiment's ``seed``)."""
    c = setup.config
    micro = min(8, c.batch_size)
    return dict(max_steps=steps or c.steps, lr=c.lr, micro_batch_size=micro, grad_accum_steps=max(1, c.batch_size // micro),
                seed=c.seed if seed is None else seed, progress=c.progress, kl_samples=0, overwrite=True,
                output_dir=str(setup.out / (name if seed is None or seed == c.seed else f"{name}_seed{seed}")),
                **run_fields(c), **fields)


def run_fields(c: SentimentConfig) -> dict:
    """The trainer fields every run of the experiment shares: optimizer, warm-up and device."""
    return dict(optimizer=OPTIMS[c.optim], warmup_steps=c.warmup_steps, device=c.device, use_cpu=c.use_cpu)


def with_policy(policy, on_step):
    """``on_step(step, record)`` for the trainer, given a callback of ``(policy, step, record)``."""
    return None if on_step is None else (lambda step, record: on_step(policy, step, record))


def train_dpo(setup, pairs: list[TokenizedPair], beta: float, loss: str | None = None, on_step=None,
              eval_pairs: list[TokenizedPair] | None = None, steps: int | None = None, seed: int | None = None):
    """A copy of π_ref trained with DPO at ``beta`` (reference log-probs precomputed once, cached by hash).

    ``on_step(policy, step, record)`` runs after every optimizer step (e.g. to evaluate checkpoints); with
    ``eval_pairs`` (held-out pairs) the run ends with an evaluation on them (``result.eval_history``, trl's
    ``eval_`` names); ``seed`` is the training seed (default: the experiment's). Returns ``(policy, TrainResult)``.
    """
    policy = copy.deepcopy(setup.reference)
    result = train(train_config(setup, f"dpo_beta{beta:g}", steps, seed, stage="dpo", beta=beta, loss=loss or setup.config.loss,
                                reference="precomputed"), model=policy, tokenizer=setup.tokenizer, train_pairs=pairs,
                   eval_pairs=eval_pairs, on_step=with_policy(policy, on_step))
    return policy.eval(), result


def train_preferred_ft(setup, pairs: list[TokenizedPair], on_step=None, steps: int | None = None,
                       seed: int | None = None):
    """Preferred-FT: a copy of π_ref trained with SFT on the chosen responses. Returns ``(policy, TrainResult)``."""
    policy = copy.deepcopy(setup.reference)
    result = train(train_config(setup, "preferred_ft", steps, seed, stage="sft"), model=policy, tokenizer=setup.tokenizer,
                   train_pairs=pairs, on_step=with_policy(policy, on_step))
    return policy.eval(), result


def train_unlikelihood(setup, pairs: list[TokenizedPair], on_step=None, steps: int | None = None,
                       seed: int | None = None):
    """Unlikelihood (:mod:`dpolab.baselines.unlikelihood`) from a copy of π_ref. Returns ``(policy, history)``."""
    c = setup.config
    policy = copy.deepcopy(setup.reference)
    history = unlikelihood_train(policy, pairs, pad_token_id(setup.tokenizer), steps=steps or c.steps, batch_size=c.batch_size,
                                 lr=c.lr, alpha=c.unlikelihood_alpha, seed=c.seed if seed is None else seed,
                                 progress=c.progress,
                                 on_step=with_policy(policy, on_step))
    return policy.eval(), history


def _rl_policy(setup, train_fn, on_step, reward_fn=None, seed: int | None = None, *, steps: int,
               prompts_per_step: int, k: int, lr: float, **arm):
    """An on-policy arm (``train_fn``: :func:`rloo_train`, :func:`ppo_train` or :func:`online_dpo_train`) from a copy
    of π_ref on the training prefixes, reading ``reward_fn`` (default: the ground truth; a
    :class:`dpolab.train.reward.RewardModelJudge` for the RLHF arms), its rollouts the arm's ``steps``,
    ``prompts_per_step``, ``k`` and ``lr`` with the experiment's sample length; ``seed`` is the training seed (prompt
    order and rollout samples; default: the experiment's); ``arm``: the trainer's own settings (``kl_coef``, ...).
    Returns ``(policy, history)``."""
    c = setup.config
    policy = copy.deepcopy(setup.reference)
    settings = RolloutSettings(steps=steps, prompts_per_step=prompts_per_step, k=k, lr=lr,
                               max_new_tokens=c.max_new_tokens, seed=c.seed if seed is None else seed,
                               progress=c.progress)
    history = train_fn(policy, setup.reference, setup.tokenizer, setup.train_prefixes,
                       setup.reward_fn if reward_fn is None else reward_fn, settings,
                       on_step=with_policy(policy, on_step), **arm)
    return policy.eval(), history


def train_rloo(setup, kl_coef: float | None = None, on_step=None, reward_fn=None, seed: int | None = None):
    """The RL baseline (dpolab.baselines.rloo) from a copy of π_ref. Returns ``(policy, history)``."""
    c = setup.config
    return _rl_policy(setup, rloo_train, on_step, reward_fn, seed, steps=c.rloo_steps,
                      prompts_per_step=c.rloo_prompts_per_step, k=c.rloo_k,
                      kl_coef=c.rloo_kl_coefs[0] if kl_coef is None else kl_coef, lr=c.rloo_lr)


def train_ppo(setup, kl_coef: float | None = None, on_step=None, reward_fn=None, seed: int | None = None):
    """PPO (dpolab.baselines.ppo) from a copy of π_ref. Returns ``(policy, history)``."""
    c = setup.config
    return _rl_policy(setup, ppo_train, on_step, reward_fn, seed, steps=c.ppo_steps, prompts_per_step=c.ppo_prompts_per_step,
                      k=c.ppo_k, kl_coef=c.ppo_kl_coefs[0] if kl_coef is None else kl_coef, lr=c.ppo_lr,
                      num_ppo_epochs=c.num_ppo_epochs)


def train_online_dpo(setup, beta: float | None = None, on_step=None, reward_fn=None, seed: int | None = None):
    """Online DPO (dpolab.baselines.online_dpo) from a copy of π_ref: RLOO's rollouts, DPO's loss and learning rate,
    the judge ``reward_fn`` (default: the ground truth). Returns ``(policy, history)``."""
    c = setup.config
    return _rl_policy(setup, online_dpo_train, on_step, reward_fn, seed, steps=c.rloo_steps,
                      prompts_per_step=c.rloo_prompts_per_step, k=c.rloo_k,
                      beta=c.online_dpo_betas[0] if beta is None else beta, loss_type=c.loss,
                      pair_strategy=c.online_dpo_pair_strategy, lr=c.lr)


def train_reward_model_on_pairs(setup, pairs: list[TokenizedPair]):
    """The RLHF pipeline's reward model: π_ref's trunk with a scalar head, trained with the Bradley–Terry loss on the
    same preference pairs as DPO, the checkpoint with the best held-out pair accuracy kept (evaluated at each
    epoch's end on the held-out pairs of π_ref's samples, the pairs every policy's implicit reward is scored on).

    Saved as a Hugging Face folder under ``output_dir/reward_model``. Returns ``(judge, summary)``: a
    :class:`dpolab.train.reward.RewardModelJudge` for the RL arms and a dict for the results file.
    """
    from dpolab.experiments.sentiment.curves import first_samples
    from dpolab.experiments.sentiment.evaluation import heldout_pair_accuracy
    from dpolab.train.reward import (
        RewardModelJudge,
        reward_model_from_causal_lm,
        save_reward_model,
        train_reward_model,
    )

    c = setup.config
    held = setup.heldout_samples()
    k = min(c.heldout_pair_samples, held["rewards"].shape[1])
    heldout = first_samples(held["samples"], k)
    scorer = {}

    def evaluate(model) -> dict:
        judge = scorer.setdefault("judge", RewardModelJudge(model, setup.tokenizer, setup.tokenizer))
        scores = judge.score_samples(heldout).reshape(len(heldout.prompts), k)
        acc = heldout_pair_accuracy(scores, held["rewards"][:, :k])
        return {"eval_accuracy": acc["heldout_acc"], "eval_accuracy_se": acc["heldout_acc_se"],
                "eval_pairs": acc["heldout_pairs"]}

    model = reward_model_from_causal_lm(setup.reference, setup.tokenizer, seed=c.seed)
    result = train_reward_model(model, pairs, pad_token_id(setup.tokenizer), evaluate=evaluate,
                                num_train_epochs=c.reward_model_epochs, learning_rate=c.reward_model_lr,
                                per_device_train_batch_size=c.reward_model_batch_size,
                                center_rewards_coefficient=c.center_rewards_coefficient or None,
                                eval_steps=c.reward_model_eval_steps, seed=c.seed,
                                progress=c.progress)
    best = next(r for r in result.eval_history if r["step"] == result.best_step)
    summary = {"train_pairs": len(pairs), "epochs": c.reward_model_epochs, "lr": c.reward_model_lr,
               "batch_size": c.reward_model_batch_size, "best_step": result.best_step, "best_epoch": best["epoch"],
               "heldout_acc": best["eval_accuracy"], "heldout_acc_se": best["eval_accuracy_se"],
               "heldout_pairs": best["eval_pairs"], "last_heldout_acc": result.last_eval["eval_accuracy"],
               "last_heldout_acc_se": result.last_eval["eval_accuracy_se"], "eval_history": result.eval_history,
               "history": result.history, "selected_on": "held-out pairs of π_ref's samples (the reported ones)"}
    folder = save_reward_model(model, setup.tokenizer, setup.out / "reward_model",
                               {k: v for k, v in summary.items() if k != "history"})
    summary["folder"] = str(folder)
    return RewardModelJudge(model, setup.tokenizer, setup.tokenizer, name=f"reward model ({folder.name})"), summary


def sft_on_reviews(model, tokenizer, config: SentimentConfig, out: Path):
    """Short SFT on review snippets (prefix → rest of the snippet), so π_ref writes reviews; returns the model."""
    texts = review_texts(config.dataset_name, config.dataset_train_split, config.dataset_text_field)
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
               output_dir=str(out / "sft"), **run_fields(config)),
          model=model, tokenizer=tokenizer, train_pairs=examples)
    return model.eval()


def sft_settings(config: SentimentConfig, tokenizer, weights_sha256: str) -> dict:
    """What decides the SFT on reviews: the initial weights and vocabulary, and the fields :func:`sft_on_reviews`
    reads (where its files go and whether bars show do not)."""
    return {"format": "dpolab.sft_reviews/1", "model": config.model, "weights_sha256": weights_sha256,
            "vocab_sha256": json_hash(sorted(tokenizer.get_vocab().items())), "sft_steps": config.sft_steps,
            "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
            "min_prefix_tokens": config.min_prefix_tokens, "max_prefix_tokens": config.max_prefix_tokens,
            "max_new_tokens": config.max_new_tokens, **_non_default(config, SFT_SOURCE_FIELDS)}


SFT_SOURCE_FIELDS = ("dataset_name", "dataset_train_split", "dataset_text_field", "optim", "warmup_steps")
"""Later fields that decide the SFT on reviews; in its cache key only when changed, so earlier caches stay valid."""


def _non_default(config: SentimentConfig, names) -> dict:
    defaults = SentimentConfig()
    return {n: getattr(config, n) for n in names if getattr(config, n) != getattr(defaults, n)}


def sft_reference(model, tokenizer, config: SentimentConfig, out: Path, weights_sha256: str):
    """π_ref: ``model`` after :func:`sft_on_reviews`, trained once per :func:`sft_settings` and then reused.

    The first run trains a copy and saves its weights as a cache artifact (``$DPOLAB_CACHE/sft_reviews/<hash of the
    settings>``, written atomically under a lock, so parallel runs of a sweep train it once); every run, the first
    included, loads those weights into ``model``, so a run that trains and a run that reuses start from the same
    bits. Returns ``(model in eval mode, the artifact folder, whether it was reused)``.
    """
    settings = sft_settings(config, tokenizer, weights_sha256)
    trained = []

    def build(tmp: Path) -> None:
        save_weights(sft_on_reviews(copy.deepcopy(model), tokenizer, config, out), str(tmp / "model.safetensors"))
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        trained.append(True)

    folder = build_artifact(cache_dir() / "sft_reviews" / json_hash(settings)[:24], build, info=settings)
    load_weights(model, str(folder / "model.safetensors"))
    return model.eval(), folder, not trained
