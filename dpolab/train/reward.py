"""The explicit reward model of the RLHF pipeline (paper §3, step 2), learned from the same preference pairs as DPO.

A reward model here is a ``transformers`` sequence classifier with one output, built from a causal LM (its trunk,
with a fresh linear ``score`` head on the last non-padding token), trained on pairs with the Bradley–Terry loss
(:func:`dpolab.losses.reward_model.reward_model_loss`) and saved as a plain Hugging Face folder, so that
``AutoModelForSequenceClassification.from_pretrained(folder)`` and :func:`dpolab.sample.judges.load_classifier_judge`
read it like any hub reward model. Field names are trl ``RewardConfig``'s where it has them
(``center_rewards_coefficient``, ``num_train_epochs``, ``learning_rate``, ``per_device_train_batch_size``,
``max_grad_norm``, ``eval_steps``), metrics ``RewardTrainer``'s (``loss``, ``accuracy``, ``margin``,
``mean_reward``; evaluation ones prefixed ``eval_``).

The best checkpoint is the one with the highest held-out pair accuracy (the paper picks its reward model by
validation accuracy); it is kept in memory and returned, and the last one is reported beside it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.losses.reward_model import reward_model_loss


def reward_model_from_causal_lm(model, tokenizer, *, seed: int = 0):
    """A one-output sequence classifier with ``model``'s trunk (weights copied) and a new ``score`` head.

    The head is initialised as ``transformers`` initialises it, from ``seed``; the trunk's weights are copied
    exactly, so before training the reward model reads the same hidden states as the policy.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.pad_token_id = pad_token_id(tokenizer)
    config.architectures = None
    config.problem_type = "regression"
    torch.manual_seed(seed)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    reward_model.base_model.load_state_dict(model.base_model.state_dict(), strict=True)  # raises on any mismatch
    first = next(model.parameters())
    return reward_model.to(device=first.device, dtype=first.dtype)


def sequences_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids, right-padded: ``(input_ids, attention_mask)``, shape (N, T) each.

    An empty response scores the prompt's last token (the classifier reads the last non-padding token).
    """
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
    return input_ids, attention_mask


def sequence_rewards(reward_model, prompt_ids, response_ids, pad: int, *, grad: bool = False,
                     batch_size: int = 32) -> torch.Tensor:
    """r(x, y) of every (prompt, response) given as token ids, by the classifier's own forward. Shape: (N,)."""
    out = []
    with torch.set_grad_enabled(grad):
        for s in range(0, len(prompt_ids), batch_size):
            input_ids, attention_mask = sequences_batch(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size],
                                                        pad)
            out.append(reward_model(input_ids=input_ids.to(reward_model.device),
                                    attention_mask=attention_mask.to(reward_model.device)).logits[:, 0].float())
    return torch.cat(out)


def pair_rewards(reward_model, pairs: Sequence[TokenizedPair], pad: int, *, grad: bool = False,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w), r(x, y_l)) of every pair; chosen and rejected rows go through one forward. Shape: (B,) each."""
    prompts = [p.prompt_ids for p in pairs]
    rewards = sequence_rewards(reward_model, prompts + prompts, [p.chosen_ids for p in pairs]
                               + [p.rejected_ids for p in pairs], pad, grad=grad, batch_size=max(batch_size, 2))
    return rewards[:len(pairs)], rewards[len(pairs):]


@dataclass
class RewardModelResult:
    """What :func:`train_reward_model` returns: the best model (in eval mode) and the records of the run."""

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_metric: float = float("nan")
    last_eval: dict = field(default_factory=dict)


def train_reward_model(
    reward_model,
    train_pairs: Sequence[TokenizedPair],
    pad: int,
    *,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    num_train_epochs: float = 1.0,
    learning_rate: float = 1e-5,
    per_device_train_batch_size: int = 8,
    center_rewards_coefficient: float | None = None,
    max_grad_norm: float = 1.0,
    eval_steps: int = 0,
    metric_for_best_model: str = "eval_accuracy",
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> RewardModelResult:
    """Train ``reward_model`` in place on ``train_pairs`` with the Bradley–Terry loss (AdamW, constant rate).

    The pairs are shuffled afresh every epoch from ``seed``; ``num_train_epochs`` may be fractional. ``evaluate``
    (model -> dict of ``eval_*`` metrics) runs every ``eval_steps`` steps, at every epoch's end and at the last step;
    the checkpoint with the highest ``metric_for_best_model`` (the earliest on ties) is returned.
    """
    from tqdm.auto import tqdm

    if not train_pairs:
        raise ValueError("train_reward_model: no training pairs")
    if num_train_epochs <= 0 or per_device_train_batch_size < 1:
        raise ValueError("num_train_epochs must be > 0 and per_device_train_batch_size >= 1")
    n, b = len(train_pairs), per_device_train_batch_size
    per_epoch = math.ceil(n / b)
    total = max(1, math.ceil(num_train_epochs * per_epoch))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / per_epoch))])
    optimizer = torch.optim.AdamW([p for p in reward_model.parameters() if p.requires_grad], lr=learning_rate)
    result = RewardModelResult(reward_model)
    best_state = None

    def run_eval(step: int) -> None:
        nonlocal best_state
        reward_model.eval()
        record = {"step": step, "epoch": step / per_epoch, **evaluate(reward_model)}
        result.eval_history.append(record)
        result.last_eval = record
        value = record[metric_for_best_model]
        if best_state is None or value > result.best_metric:
            result.best_step, result.best_metric = step, float(value)
            best_state = {k: v.detach().clone() for k, v in reward_model.state_dict().items()}

    for step in tqdm(range(1, total + 1), desc="reward model", disable=not progress):
        epoch, start = (step - 1) // per_epoch, (step - 1) % per_epoch * b  # the last batch of an epoch may be short
        batch = [train_pairs[int(i)] for i in order[epoch * n + start:epoch * n + min(start + b, n)]]
        reward_model.train()
        chosen, rejected = pair_rewards(reward_model, batch, pad, grad=True, batch_size=2 * len(batch))
        loss = reward_model_loss(chosen, rejected, center_rewards_coefficient=center_rewards_coefficient).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(reward_model.parameters(), max_grad_norm)
        optimizer.step()
        c, r = chosen.detach(), rejected.detach()
        record = {"step": step, "epoch": step / per_epoch, "loss": loss.item(),
                  "accuracy": ((c > r).float() + 0.5 * (c == r).float()).mean().item(),
                  "margin": (c - r).mean().item(), "mean_reward": torch.cat([c, r]).mean().item(),
                  "grad_norm": float(grad_norm), "learning_rate": learning_rate}
        result.history.append(record)
        if evaluate is not None and (step == total or step % per_epoch == 0 or (eval_steps and step % eval_steps == 0)):
            run_eval(step)
        if on_step is not None:
            on_step(step, record)
    if best_state is not None:
        reward_model.load_state_dict(best_state)
    reward_model.eval()
    return result


def save_reward_model(reward_model, tokenizer, folder: str | Path, info: dict | None = None) -> Path:
    """Save a Hugging Face folder (config, safetensors weights, tokenizer) and ``dpolab_reward_model.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reward_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "dpolab_reward_model.json").write_text(json.dumps(info or {}, indent=1, default=float) + "\n")
    return folder


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (then token ids can be shared between them)."""
    return a.get_vocab() == b.get_vocab()


class RewardModelJudge:
    """A learned reward model as the judge of RL rollouts: it scores sampled token ids directly.

    The reward model was trained on (prompt ids, response ids) pairs of the policy's tokenizer, so rollouts are
    scored the same way: prompt ids + sampled ids, nothing decoded and re-tokenized. A reward model whose
    tokenizer differs from the policy's is refused by name (score texts with
    :func:`dpolab.sample.judges.classifier_judge` and its own tokenizer instead). ``calls`` counts the samples
    scored, so a test can check one query per sample.
    """

    def __init__(self, reward_model, tokenizer, policy_tokenizer, *, name: str = "reward model", batch_size: int = 32):
        if not same_vocabulary(tokenizer, policy_tokenizer):
            raise ValueError(f"reward model {name!r}: its tokenizer's vocabulary differs from the policy's, so sampled "
                             "token ids cannot be scored as they are; score texts with "
                             "dpolab.sample.judges.classifier_judge(model, its_tokenizer) instead")
        self.model, self.name, self.batch_size = reward_model.eval(), name, batch_size
        self.pad = pad_token_id(tokenizer)
        self.calls = 0

    def score_samples(self, samples) -> np.ndarray:
        """r(x, y) of every completion of a :class:`dpolab.sample.generate.Samples`, prompt by prompt. Shape: (P·N,)."""
        prompts, responses = [], []
        for p, rows in enumerate(samples.token_ids):
            for ids in rows:
                prompts.append(samples.prompt_ids[p])
                responses.append(ids)
        scores = sequence_rewards(self.model, prompts, responses, self.pad, batch_size=self.batch_size).cpu().numpy()
        self.calls += len(responses)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise ValueError(f"reward model {self.name!r} returned {scores[bad[0]]} for sample {int(bad[0])}")
        return scores.astype(np.float64)
