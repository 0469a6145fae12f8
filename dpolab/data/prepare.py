"""Preference data in any accepted form, turned into tokenized pairs plus the prompts they came from (the
prompts a KL estimate samples from).

Accepted data: a path (``.jsonl`` file, or a folder saved with ``datasets.save_to_disk``), a ``datasets``
dataset, a list of record dicts, of :class:`dpolab.data.records.PreferenceExample`, or of already tokenized
:class:`dpolab.data.tokenize.TokenizedPair`. Bad rows stop the run before training, naming file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpolab.data.readers import iter_dataset, load_jsonl
from dpolab.data.records import PreferenceExample, example_from_record
from dpolab.data.tokenize import TokenizationReport, TokenizeConfig, TokenizedPair, tokenize_examples


@dataclass
class PairData:
    """Tokenized pairs and, where known, the prompts they came from (text, or message tuples)."""

    pairs: list[TokenizedPair]
    prompts: list
    chat: bool = False
    report: TokenizationReport = field(default_factory=TokenizationReport)
    """Rows read, kept, truncated, and dropped by truncation (with reasons)."""

    def summary(self) -> dict:
        """The report as flat JSON-ready numbers: rows, kept, truncated, dropped, and dropped by reason."""
        r = self.report
        return {"rows": r.rows, "kept": r.kept, "truncated": r.truncated, "dropped": sum(r.dropped.values()),
                "dropped_by_reason": dict(r.dropped)}


def tokenize_config(config) -> TokenizeConfig:
    """The tokenization settings of a :class:`dpolab.train.config.TrainConfig` (or any config with these fields)."""
    return TokenizeConfig(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                          boundary=config.boundary, mask_policy=config.mask_policy,
                          special_tokens=getattr(config, "special_tokens", "error"))


def prepare_pairs(data, tokenizer, settings: TokenizeConfig, *, name: str = "data",
                  on_truncation: str = "drop") -> PairData:
    """Tokenize ``data`` (any accepted form, see the module docstring) into :class:`PairData`.

    A row that truncation leaves unusable (no response token, no scored token, or chosen = rejected) is dropped
    and counted in ``.report`` (``on_truncation="drop"``), or stops the run (``"error"``); any other bad row stops
    the run, naming file, row and field.
    """
    if on_truncation not in ("drop", "error"):
        raise ValueError(f"on_truncation must be 'drop' or 'error', got {on_truncation!r}")
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
        report = TokenizationReport(rows=len(items), kept=len(items), truncated=sum(p.truncated for p in items),
                                    repaired=sum(p.repaired for p in items), index=list(range(len(items))))
        return PairData(items, prompts, report=report)
    examples = [x if isinstance(x, PreferenceExample) else example_from_record(x, f"{name}:row {i}")
                for i, x in enumerate(items)]
    pairs, report = tokenize_examples(examples, tokenizer, settings,
                                      on_error="drop" if on_truncation == "drop" else "raise")
    if not pairs:
        raise ValueError(f"{name}: truncation dropped every one of the {report.rows} rows ({report}); raise "
                         f"max_length ({settings.max_length}) or lower max_prompt_length ({settings.max_prompt_length})")
    kept = [examples[i] for i in report.index]
    chat = any(e.is_conversational for e in kept)
    prompts = [list(e.prompt) if chat else e.prompt for e in kept]
    return PairData(pairs, prompts, chat, report)


def _load_path(path: Path):
    if path.is_dir():
        from datasets import load_from_disk

        return list(iter_dataset(load_from_disk(str(path)), name=path.name))
    if not path.is_file():
        raise FileNotFoundError(f"preference data {path} does not exist")
    return load_jsonl(path)

