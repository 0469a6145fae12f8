"""A training run's inputs: the policy named by the config (optionally with a LoRA adapter), and preference
data in any accepted form turned into tokenized pairs plus the prompts that the KL estimate samples from.

Accepted data: a path (``.jsonl`` file, or a folder saved with ``datasets.save_to_disk``), a ``datasets``
dataset, a list of record dicts, of :class:`dpolab.data.PreferenceExample`, or of already tokenized
:class:`dpolab.tokenize.TokenizedPair`. Bad rows stop the run before training, naming file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpolab.data import PreferenceExample, example_from_record, iter_dataset, load_jsonl
from dpolab.tokenize import TokenizeConfig, TokenizedPair, tokenize_examples

TINY_MODELS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}


@dataclass
class PairData:
    """Tokenized pairs and, where known, the prompts they came from (text, or message tuples)."""

    pairs: list[TokenizedPair]
    prompts: list
    chat: bool = False


def load_policy(name: str, *, seed: int = 0):
    """``(model, tokenizer)`` for a config's ``model`` field: ``tiny-gpt2``/``tiny-llama`` or anything
    :func:`dpolab.models.load_model` accepts."""
    if name in TINY_MODELS:
        from dpolab.tiny import tiny_causal_lm

        return tiny_causal_lm(TINY_MODELS[name], seed=seed)
    from dpolab.models import load_model

    return load_model(name)


def add_lora(model, rank: int, alpha: float):
    """Wrap ``model`` with a fresh peft LoRA adapter on every linear layer (the base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "disable_adapter"):
        return model  # already a peft model: train the adapter it has
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tokenize_config(config) -> TokenizeConfig:
    """The tokenization settings of a :class:`dpolab.config.TrainConfig`."""
    return TokenizeConfig(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                          boundary=config.boundary, mask_policy=config.mask_policy)


def prepare_pairs(data, tokenizer, settings: TokenizeConfig, *, name: str = "data") -> PairData:
    """Tokenize ``data`` (any accepted form, see the module docstring) into :class:`PairData`."""
    if data is None:
        return PairData([], [])
    if isinstance(data, (str, Path)):
        data = _load_path(Path(data))
    elif hasattr(data, "column_names"):  # a datasets.Dataset
        data = list(iter_dataset(data, name=name))
    items = list(data)
    if not items:
        raise ValueError(f"{name}: no preference pairs")
    if all(isinstance(x, TokenizedPair) for x in items):
        prompts = [tokenizer.decode(p.prompt_ids, skip_special_tokens=True) for p in items]
        return PairData(items, prompts)
    examples = [x if isinstance(x, PreferenceExample) else example_from_record(x, f"{name}:row {i}")
                for i, x in enumerate(items)]
    pairs, _ = tokenize_examples(examples, tokenizer, settings, on_error="raise")
    chat = any(e.is_conversational for e in examples)
    prompts = [list(e.prompt) if chat else e.prompt for e in examples]
    return PairData(pairs, prompts, chat)


def _load_path(path: Path):
    if path.is_dir():
        from datasets import load_from_disk

        return list(iter_dataset(load_from_disk(str(path)), name=path.name))
    if not path.is_file():
        raise FileNotFoundError(f"preference data {path} does not exist")
    return load_jsonl(path)

