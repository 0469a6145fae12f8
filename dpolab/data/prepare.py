"""Training data in any accepted form, turned into tokenized pairs plus the prompts they came from (the
prompts a KL estimate samples from).

Accepted data: a path or hub id (every source :func:`dpolab.data.sources.open_dataset` reads: ``.jsonl``,
``.json``, ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``, ``save_to_disk`` folders with a split, folders of data
files, hub ids), a ``datasets`` dataset, a list of record dicts, of :class:`dpolab.data.records.PreferenceExample`
or :class:`dpolab.data.sft_records.CompletionExample`, or of already tokenized
:class:`dpolab.data.tokenize.TokenizedPair`. A DPO run reads preference rows; an SFT run also reads
prompt/completion, ``messages`` and ``text`` rows (:mod:`dpolab.data.sft_records`). Bad rows stop the run before
training, naming file, row and field.

Large sets: rows are read, validated and tokenized a chunk at a time (:mod:`dpolab.data.row_chunks`), in
``num_proc`` worker processes when asked (trl's ``dataset_num_proc``), and the pairs are kept as flat numpy
columns (:class:`dpolab.data.store.PairStore`), not as one Python object per pair. Pairs, report and errors are
the same for every ``num_proc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.data.readers import jsonl_lines
from dpolab.data.row_chunks import STAGES, RowSource, tokenize_rows
from dpolab.data.sources import open_dataset, split_spec
from dpolab.data.tokenize import TokenizationReport, TokenizeConfig, TokenizedPair


@dataclass
class PairData:
    """Tokenized pairs and, where known, the prompts they came from (text, or message lists)."""

    pairs: Sequence[TokenizedPair]
    """A :class:`dpolab.data.store.PairStore` (or the list of pairs passed in); an SFT row has no rejected side."""
    prompts: list
    """The prompts of the kept rows that have one (a ``text`` row has none)."""
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
                          special_tokens=getattr(config, "special_tokens", "error"),
                          tools=list(getattr(config, "tools", None) or []),
                          chat_template_kwargs=dict(getattr(config, "chat_template_kwargs", None) or {}),
                          completion_only_loss=getattr(config, "completion_only_loss", True),
                          assistant_only_loss=getattr(config, "assistant_only_loss", False))


def prepare_pairs(data, tokenizer, settings: TokenizeConfig, *, name: str = "data", on_truncation: str = "drop",
                  stage: str = "dpo", split: str | None = None, num_proc: int | None = None) -> PairData:
    """Tokenize ``data`` (any accepted form, see the module docstring) into :class:`PairData`.

    A row that truncation leaves unusable (no response token, no scored token, or chosen = rejected) is dropped
    and counted in ``.report`` (``on_truncation="drop"``), or stops the run (``"error"``); any other bad row stops
    the run, naming file, row and field.

    Args:
        stage: ``"dpo"`` reads preference rows only; ``"sft"`` also the SFT forms.
        split: The split a source with splits is read from when its name has no ``:split`` (the config's
            ``train_split`` / ``eval_split``).
        num_proc: Worker processes that validate and tokenize (None or 1: this process).
    """
    if on_truncation not in ("drop", "error"):
        raise ValueError(f"on_truncation must be 'drop' or 'error', got {on_truncation!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if data is None:
        return PairData([], [])
    if isinstance(data, (str, Path)):
        source = _path_source(str(data), split, num_proc)
    elif hasattr(data, "column_names") and hasattr(data, "__len__"):  # a datasets.Dataset, read by position
        source = RowSource(data, "dataset", name)
    else:
        items = list(data)
        if items and all(isinstance(x, TokenizedPair) for x in items):
            prompts = [tokenizer.decode(p.prompt_ids, skip_special_tokens=True) for p in items]
            report = TokenizationReport(rows=len(items), kept=len(items), truncated=sum(p.truncated for p in items),
                                        repaired=sum(p.repaired for p in items), index=list(range(len(items))))
            return PairData(items, prompts, report=report)
        source = RowSource(items, "items", name)
    if not len(source):
        raise ValueError(f"{name}: no preference pairs" if stage == "dpo" else f"{name}: no training rows")
    pairs, report, prompts, chat = tokenize_rows(source, tokenizer, settings, stage=stage,
                                                 on_error="drop" if on_truncation == "drop" else "raise",
                                                 num_proc=num_proc)
    if not len(pairs):
        raise ValueError(f"{name}: truncation dropped every one of the {report.rows} rows ({report}); raise "
                         f"max_length ({settings.max_length}) or lower max_prompt_length ({settings.max_prompt_length})")
    return PairData(pairs, prompts, chat, report)


def prepare_train_eval(config, tokenizer, train_pairs=None, eval_pairs=None, *, stage: str = "dpo",
                       on_truncation: str = "drop") -> tuple[PairData, PairData]:
    """The training and evaluation data of a training config: ``train_pairs`` / ``eval_pairs`` when given, else
    the config's ``train_data`` / ``eval_data`` (read from its ``train_split`` / ``eval_split``), tokenized with its
    settings. No training pair at all is an error; no evaluation data is an empty :class:`PairData`."""
    settings = tokenize_config(config)
    rows = {"stage": stage, "num_proc": config.dataset_num_proc, "on_truncation": on_truncation}
    train_data = prepare_pairs(train_pairs if train_pairs is not None else config.train_data or None, tokenizer,
                               settings, name=config.train_data or "train_pairs", split=config.train_split, **rows)
    if not train_data.pairs:
        raise ValueError("no training pairs: pass train_pairs=... or set the config field train_data")
    eval_data = prepare_pairs(eval_pairs if eval_pairs is not None else config.eval_data or None, tokenizer,
                              settings, name=config.eval_data or "eval_pairs", split=config.eval_split, **rows)
    return train_data, eval_data


def _path_source(spec: str, split: str | None, num_proc: int | None) -> RowSource:
    """A file, folder or hub id as rows: a ``.jsonl`` file line by line (its errors name the line), anything else
    through :func:`dpolab.data.sources.open_dataset` (rows numbered from 0)."""
    path_text, suffix_split = split_spec(spec)
    path = Path(path_text)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        if suffix_split is not None:
            raise ValueError(f"{path}: a .jsonl file has no splits (asked for {suffix_split!r})")
        return RowSource(jsonl_lines(path), "jsonl", path.name)
    dataset = open_dataset(spec, num_proc=num_proc, default_split=split)
    return RowSource(dataset, "dataset", path.name if path.exists() else spec)
