"""``dpolab train stage=reward``: a Bradley–Terry reward model from the preference files DPO reads.

The same :class:`dpolab.train.config.TrainConfig` and data sources as the DPO stage (``train_data``/``eval_data``,
tokenized the same way, bad rows named by file, row and field), with these fields read: ``model`` (whose trunk the
reward model starts from), ``lr`` (trl's ``learning_rate``), ``num_train_epochs`` (or ``max_steps`` when it is 0),
``micro_batch_size`` × ``grad_accum_steps`` (pairs per step), ``max_grad_norm``, ``eval_every`` (trl's
``eval_steps``), ``center_rewards_coefficient``, ``seed``, ``output_dir``, ``overwrite``. Records go to
``output_dir/metrics.jsonl`` with trl ``RewardTrainer``'s names; the best checkpoint by held-out pair accuracy (the
last one without ``eval_data``) is saved as a Hugging Face folder in ``output_dir`` that
``AutoModelForSequenceClassification.from_pretrained`` and :func:`dpolab.sample.judges.load_classifier_judge` read.

Not yet: resuming an interrupted reward run (``resume_from`` is refused) and TensorBoard/W&B trackers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from dpolab.data.cache import atomic_write_text
from dpolab.data.device import resolve_device


def train_reward(config, *, model=None, tokenizer=None, train_pairs=None, eval_pairs=None):
    """Train and save a reward model as described in the module docstring. Returns a
    :class:`dpolab.train.reward.RewardModelResult` whose ``output_dir`` attribute is the saved folder."""
    from dpolab.data.prepare import prepare_train_eval
    from dpolab.data.tokenize import pad_token_id
    from dpolab.evaluate import preference_accuracy
    from dpolab.losses.reward_model import reward_model_loss
    from dpolab.models import load_policy
    from dpolab.train.reward import pair_rewards, reward_model_from_causal_lm, save_reward_model, train_reward_model

    out = Path(config.output_dir)
    if config.resume_from:
        raise ValueError("stage=reward does not resume an interrupted run yet: start it again with overwrite=true "
                         "(its metrics and saved model are replaced only when the new run ends)")
    if (out / "metrics.jsonl").exists() and not config.overwrite:
        raise FileExistsError(f"{out} holds an earlier run (metrics.jsonl); pass overwrite=true to replace it")
    if model is None:
        model, loaded = load_policy(config.model, seed=config.seed, dtype=config.dtype,
                                    revision=config.model_revision, trust_remote_code=config.trust_remote_code)
        tokenizer = tokenizer or loaded
    model = model.to(resolve_device(config.device, config.use_cpu))
    train_data, eval_data = prepare_train_eval(config, tokenizer, train_pairs, eval_pairs, stage="dpo",
                                               on_truncation=config.on_truncation)
    pad = pad_token_id(tokenizer)
    batch = config.micro_batch_size * config.grad_accum_steps
    per_epoch = math.ceil(len(train_data.pairs) / batch)
    epochs = config.num_train_epochs if config.num_train_epochs > 0 else config.max_steps / per_epoch

    def evaluate(reward_model) -> dict:
        chosen, rejected = pair_rewards(reward_model, eval_data.pairs, pad, batch_size=config.eval_batch_size)
        chosen, rejected = chosen.cpu(), rejected.cpu()
        acc = preference_accuracy(chosen.numpy(), rejected.numpy(), source=config.eval_data or "eval_pairs")
        return {"eval_loss": reward_model_loss(chosen, rejected, center_rewards_coefficient=config.center_rewards_coefficient
                                               ).mean().item(),
                "eval_accuracy": acc["accuracy"], "eval_accuracy_ci_low": acc["ci_low"],
                "eval_accuracy_ci_high": acc["ci_high"], "eval_pairs": acc["n"],
                "eval_margin": (chosen - rejected).mean().item()}

    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")

    def on_step(step, record):
        log.write(json.dumps(record) + "\n")
        log.flush()

    reward_model = reward_model_from_causal_lm(model, tokenizer, seed=config.seed)
    try:
        result = train_reward_model(
            reward_model, train_data.pairs, pad, evaluate=evaluate if eval_data.pairs else None,
            num_train_epochs=epochs, learning_rate=config.lr, per_device_train_batch_size=batch,
            center_rewards_coefficient=config.center_rewards_coefficient, max_grad_norm=config.max_grad_norm,
            eval_steps=config.eval_every, seed=config.seed, progress=config.progress, on_step=on_step)
        for record in result.eval_history:
            log.write(json.dumps(record) + "\n")
    finally:
        log.close()
    info = {"stage": "reward", "config": config.to_dict(), "train_pairs": len(train_data.pairs),
            "eval_pairs": len(eval_data.pairs), "best_step": result.best_step,
            "best_eval_accuracy": result.best_metric, "last_eval": result.last_eval,
            "steps": len(result.history)}
    save_reward_model(result.model, tokenizer, out, info)
    atomic_write_text(out / "summary.json", json.dumps(info, indent=1, default=float) + "\n")
    if config.progress:
        print(f"dpolab: reward model saved in {out} (best step {result.best_step}, held-out accuracy "
              f"{result.best_metric:.3f})" if eval_data.pairs else f"dpolab: reward model saved in {out}",
              file=sys.stderr)
    result.output_dir = out
    return result
