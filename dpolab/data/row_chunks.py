"""Validating and tokenizing many rows a chunk at a time, in this process or in ``num_proc`` worker processes.

The rows are cut into chunks of :data:`CHUNK_ROWS` (fewer when that gives every worker a share). Each chunk's rows
are validated (:func:`dpolab.data.sft_records.sft_row` / ``dpo_row``) and tokenized into a
:class:`dpolab.data.store.PairStore`, its :class:`dpolab.data.tokenize.TokenizationReport` and the rows'
prompts; the chunks are joined in order. Errors come out as from a reader that validates every row before it
tokenizes any: the first invalid row in order, else the first row that cannot be tokenized (after one, a chunk
only validates the rest of its rows).

The result (pairs, report, prompts, the error raised) does not depend on ``num_proc``. Workers are forked from
this process where the platform allows it (they inherit the rows and the tokenizer; only positions go to them and
only the packed chunks come back), else spawned with a pickled copy. A worker never touches torch.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dpolab.data.readers import parse_jsonl_line
from dpolab.data.records import DataError, PreferenceExample
from dpolab.data.render import TokenizationError
from dpolab.data.sft_records import CompletionExample, dpo_row, sft_row
from dpolab.data.sft_tokenize import tokenize_row
from dpolab.data.store import PairStore, StoreBuilder
from dpolab.data.tokenize import TokenizationReport, TokenizeConfig, TruncationError

CHUNK_ROWS = 2048
"""Rows per chunk: the Python objects of one chunk at a time (per worker) are all that is held at once."""
STAGES = ("dpo", "sft")


@dataclass
class RowSource:
    """Rows read by position: ``"items"`` (records or examples), ``"jsonl"`` ((line, bytes) of a file, parsed
    when validated) or ``"dataset"`` (a ``datasets.Dataset``, read a slice at a time, None values left out as
    absent keys); ``name`` labels the rows."""

    rows: Any
    kind: str
    name: str

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, start: int, stop: int) -> list[tuple[str, Any]]:
        """``(source, item)`` of rows ``start`` … ``stop − 1``; an item is a record, an example or JSONL bytes."""
        if self.kind == "jsonl":
            return [(f"{self.name}:row {line}", raw) for line, raw in self.rows[start:stop]]
        if self.kind == "dataset":  # a column a row lacks holds None there: the key is absent from the record
            columns = self.rows[start:stop]
            records = [{k: v for k, v in zip(columns, values) if v is not None} for values in zip(*columns.values())]
        else:
            records = self.rows[start:stop]
        return [(getattr(r, "source", "") or f"{self.name}:row {i}", r) for i, r in enumerate(records, start=start)]


def row_example(item, source: str, stage: str) -> PreferenceExample | CompletionExample:
    """The validated example of one item: a DPO run takes preference rows only, an SFT run every form."""
    if isinstance(item, CompletionExample) and stage == "dpo":
        raise DataError(source, None, f"a {item.form} row is SFT data; DPO needs preference rows")
    if isinstance(item, PreferenceExample | CompletionExample):
        return item
    record = parse_jsonl_line(item, source) if isinstance(item, bytes) else item
    return sft_row(record, source) if stage == "sft" else dpo_row(record, source)


def example_prompt(example: PreferenceExample | CompletionExample):
    """The prompt a KL estimate samples from: a preference or prompt/completion row's prompt, a ``messages`` row's
    turns before its first assistant turn; None for a ``text`` row."""
    if isinstance(example, PreferenceExample) or example.form == "prompt_completion":
        return example.prompt
    if example.form == "messages":
        return example.completion[:next(i for i, m in enumerate(example.completion) if m["role"] == "assistant")]
    return None


@dataclass
class Chunk:
    """What one chunk of rows became, or the errors that stop the run."""

    pairs: PairStore | None = None
    report: TokenizationReport = field(default_factory=TokenizationReport)
    prompts: list = field(default_factory=list)
    chat: bool = False
    invalid: DataError | None = None  # the chunk's first invalid row
    error: TokenizationError | None = None  # its first row that cannot be tokenized (and is not dropped)


@dataclass
class Job:
    """The rows and the settings every chunk of one dataset is processed with."""

    source: RowSource
    tokenizer: Any
    settings: TokenizeConfig
    stage: str
    on_error: str  # "drop": leave out rows truncation makes unusable; "raise": stop at them too

    def process(self, span: tuple[int, int]) -> Chunk:
        """The span's rows as packed pairs, their report and prompts (module docstring)."""
        out, builder = Chunk(), StoreBuilder()
        for i, (source, item) in enumerate(self.source.read(*span), start=span[0]):
            try:
                example = row_example(item, source, self.stage)
            except DataError as err:
                return Chunk(invalid=err)
            if out.error is not None:
                continue  # only validation from here on
            out.report.rows += 1
            try:
                pair = tokenize_row(example, self.tokenizer, self.settings)
            except TokenizationError as err:
                if self.on_error == "raise" or not isinstance(err, TruncationError):
                    out.error = err
                    continue
                out.report.errors.append(str(err))
                out.report.dropped[err.why] += 1
                continue
            builder.append(pair)
            out.report.index.append(i)
            out.report.truncated += pair.truncated
            out.report.repaired += pair.repaired
            prompt = example_prompt(example)
            if prompt is not None:
                out.prompts.append(prompt if isinstance(prompt, str) else list(prompt))
            out.chat = out.chat or example.is_conversational
        out.report.kept = len(builder)
        out.pairs = builder.build()
        return out


def tokenize_rows(source: RowSource, tokenizer, settings: TokenizeConfig, *, stage: str = "dpo",
                  on_error: str = "drop", num_proc: int | None = None):
    """Validate and tokenize every row of ``source`` (module docstring).

    Returns:
        ``(pairs, report, prompts, chat)``: a :class:`PairStore`, the merged report (``index`` as positions in
        ``source``), the kept rows' prompts, and whether any kept row is conversational.
    """
    job = Job(source, tokenizer, settings, stage, on_error)
    n, workers = len(source), max(num_proc or 1, 1)
    size = CHUNK_ROWS if workers == 1 else max(1, min(CHUNK_ROWS, -(-n // workers)))
    spans = [(start, min(start + size, n)) for start in range(0, n, size)]
    chunks, error = [], None
    with _mapper(job, workers if len(spans) > 1 else 1) as process:
        for chunk in process(spans):
            if chunk.invalid is not None:  # no earlier chunk holds an invalid row
                raise chunk.invalid
            error = error or chunk.error
            chunks.append(chunk)
    if error is not None:
        raise error
    report = TokenizationReport()
    for c in chunks:
        r = c.report
        report.rows, report.kept = report.rows + r.rows, report.kept + r.kept
        report.truncated, report.repaired = report.truncated + r.truncated, report.repaired + r.repaired
        report.dropped.update(r.dropped)
        report.errors += r.errors
        report.index += r.index
    prompts = [p for c in chunks for p in c.prompts]
    return PairStore.concat([c.pairs for c in chunks]), report, prompts, any(c.chat for c in chunks)


_WORKER_JOB: Job | None = None  # the job of a worker process, set once by its initializer


def _start_worker(job: Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _process_in_worker(span):
    return _WORKER_JOB.process(span)


@contextmanager
def _mapper(job: Job, workers: int) -> Iterator[Callable]:
    """A function that maps a list of spans to their chunks, in order, in ``workers`` processes."""
    if workers == 1:
        yield lambda spans: map(job.process, spans)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(job,))
    try:
        yield lambda spans: pool.map(_process_in_worker, spans)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
