"""Reward functions ("judges") behind one checked interface: a list of texts in, one finite score per text out.

Any callable ``texts -> scores`` becomes a :class:`RewardFunction`, which calls it in batches and checks
what comes back. A judge that raises, returns the wrong number of scores, or returns NaN, infinity or a
non-number fails with :class:`RewardFunctionError` naming the judge and quoting the offending text, so
a bad judge never slips a silent NaN into a preference dataset. Built in: VADER (the ground-truth reward
of the sentiment experiment) and TextBlob (the second judge), from :mod:`dpolab.sample.sentiment`; and an
adapter for any ``transformers`` sequence classifier or reward model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dpolab.sample.sentiment import textblob_reward, vader_reward


class RewardFunctionError(ValueError):
    """A reward function failed or returned unusable scores; the message quotes the offending text."""


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


@dataclass
class RewardFunction:
    """A named, checked reward function: ``reward(texts) -> np.ndarray`` of shape ``(len(texts),)``, float64.

    Attributes:
        name: how the judge is recorded in dataset metadata and named in errors.
        fn: the underlying callable over a list of texts (returns a list, array or tensor of scores).
        batch_size: texts per call to ``fn`` (None: all at once).
    """

    name: str
    fn: Callable[[list[str]], Sequence[float]]
    batch_size: int | None = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Score every text. Shape: (len(texts),)."""
        if isinstance(texts, str):
            raise TypeError(f"reward function {self.name!r}: expected a list of texts, got a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"reward function {self.name!r}: text {i} is a {type(text).__name__}, not a string")
        step = self.batch_size or max(len(texts), 1)
        parts = [self._score_batch(texts[s:s + step], s) for s in range(0, len(texts), step)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def _score_batch(self, texts: list[str], offset: int) -> np.ndarray:
        try:
            raw = self.fn(texts)
        except Exception as err:
            raise self._locate_exception(texts, offset, err) from err
        try:
            scores = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise RewardFunctionError(
                f"reward function {self.name!r} returned something that is not a list of numbers for texts "
                f"{offset}..{offset + len(texts) - 1} (first: {_quote(texts[0])}): {raw!r:.200}") from err
        if scores.ndim == 2 and scores.shape[1] == 1:  # a (N, 1) head, as reward models return
            scores = scores[:, 0]
        if scores.shape != (len(texts),):
            raise RewardFunctionError(
                f"reward function {self.name!r} returned {scores.size} score(s) in shape {scores.shape} for "
                f"{len(texts)} text(s) {offset}..{offset + len(texts) - 1} (first: {_quote(texts[0])}); "
                "it must return exactly one score per text")
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            i = int(bad[0])
            raise RewardFunctionError(
                f"reward function {self.name!r} returned {scores[i]} for text {offset + i}: {_quote(texts[i])}"
                f" ({len(bad)} non-finite score(s) in this batch)")
        return scores

    def _locate_exception(self, texts: list[str], offset: int, err: Exception) -> RewardFunctionError:
        """Find which text makes the judge raise by scoring the batch one text at a time."""
        for i, text in enumerate(texts if len(texts) > 1 else []):
            try:
                self.fn([text])
            except Exception as single:
                return RewardFunctionError(f"reward function {self.name!r} raised {type(single).__name__}: {single} "
                                           f"on text {offset + i}: {_quote(text)}")
        where = f"text {offset}: {_quote(texts[0])}" if len(texts) == 1 else (
            f"the batch of texts {offset}..{offset + len(texts) - 1} (each alone scores fine; first: {_quote(texts[0])})")
        return RewardFunctionError(f"reward function {self.name!r} raised {type(err).__name__}: {err} on {where}")


BUILTIN_JUDGES = {"vader": vader_reward, "textblob": textblob_reward}


def get_judge(judge: str | Callable | RewardFunction, name: str | None = None,
              batch_size: int | None = None) -> RewardFunction:
    """A :class:`RewardFunction` from a built-in name (``"vader"``, ``"textblob"``), a callable, or one as is."""
    if isinstance(judge, RewardFunction):
        return judge
    if isinstance(judge, str):
        if judge not in BUILTIN_JUDGES:
            raise ValueError(f"unknown judge {judge!r}; built in: {sorted(BUILTIN_JUDGES)}, or pass a callable")
        return RewardFunction(name or judge, BUILTIN_JUDGES[judge], batch_size)
    if not callable(judge):
        raise TypeError(f"a judge must be a name, a callable texts -> scores, or a RewardFunction; got {judge!r:.80}")
    return RewardFunction(name or getattr(judge, "__name__", type(judge).__name__), judge, batch_size)


def score_completions(judge, completions: Sequence[Sequence[str]], prompts: Sequence[str] | None = None) -> np.ndarray:
    """Score ``completions[p][i]`` (alone, or appended to its text prompt ``prompts[p]``). Shape: (P, N).

    Every prompt must have the same number of completions (as :func:`dpolab.sample.generate.sample` returns).
    """
    judge = get_judge(judge)
    counts = {len(row) for row in completions}
    if len(counts) > 1:
        raise ValueError(f"every prompt needs the same number of completions, got counts {sorted(counts)}")
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} rows of completions")
    if prompts is not None and not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts are prepended to completions, so they must be texts (score chats by their replies)")
    texts = [(prompts[p] if prompts is not None else "") + text for p, row in enumerate(completions) for text in row]
    return judge(texts).reshape(len(completions), counts.pop() if counts else 0)


def classifier_judge(model, tokenizer, *, label: int | str | None = None, output: str = "logit",
                     batch_size: int = 16, max_length: int = 512, name: str | None = None) -> RewardFunction:
    """A judge from a ``transformers`` sequence classifier or reward model.

    Args:
        model: an ``AutoModelForSequenceClassification``-style model (one output: a reward model).
        tokenizer: its tokenizer (texts are right-padded and truncated to ``max_length``).
        label: the class whose score is the reward (index or ``id2label`` name); required with several classes.
        output: ``"logit"`` (the class logit, or the reward model's single output) or ``"probability"``.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens.
        name: recorded in metadata; defaults to the model's ``name_or_path`` and label.
    """
    num_labels = model.config.num_labels
    if output not in ("logit", "probability"):
        raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
    if num_labels == 1:
        index = 0
        if output == "probability":
            raise ValueError("a reward model with one output has no class probability; use output='logit'")
    elif label is None:
        raise ValueError(f"the classifier has {num_labels} classes {model.config.id2label}; say which one is "
                         "rewarded with label=")
    elif isinstance(label, str):
        names = {v: int(k) for k, v in model.config.id2label.items()}
        if label not in names:
            raise ValueError(f"label {label!r} is not one of the classifier's labels {sorted(names)}")
        index = names[label]
    else:
        if not 0 <= label < num_labels:
            raise ValueError(f"label index {label} out of range for {num_labels} classes")
        index = label
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers: batching needs some pad token
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers need it to find the last token

    @torch.no_grad()
    def score(texts: list[str]) -> torch.Tensor:
        model.eval()
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()
        return logits[:, index] if output == "logit" else logits.softmax(-1)[:, index]

    label_name = model.config.id2label.get(index, str(index)) if num_labels > 1 else "reward"
    return RewardFunction(name or f"{model.config.name_or_path or type(model).__name__}:{label_name}:{output}",
                          score, batch_size)


def load_classifier_judge(name_or_path: str, device: str | torch.device = "cpu", **kwargs) -> RewardFunction:
    """:func:`classifier_judge` for a saved classifier folder or hub id (float32, on ``device``; e.g.
    ``lvwerra/distilbert-imdb``, the paper's IMDb sentiment classifier, with ``label="POSITIVE"``). A hub id on a
    machine that cannot reach the hub is read from the local Hugging Face cache only."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpolab.models import hub_reachable

    offline = not Path(name_or_path).expanduser().exists() and not hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, local_files_only=offline).to(device)
    kwargs.setdefault("name", name_or_path)
    return classifier_judge(model, tokenizer, **kwargs)
