"""Reading preference examples: a JSONL file validated whole, or a ``datasets`` dataset validated lazily, row by
row; each with a :class:`LoadReport` of rows read, kept and skipped. Every error names the source (``file.jsonl:row
17``) and the field (:func:`dpolab.data.records.example_from_record`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.data.records import DataError, PreferenceExample, example_from_record


@dataclass
class LoadReport:
    """What a loader saw: rows read, rows kept, and the errors of skipped rows (``on_error="skip"``)."""

    rows: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.rows} rows read, {self.kept} kept, {len(self.skipped)} skipped"


class ExampleList(list):
    """A list of :class:`PreferenceExample` that carries the loader's :class:`LoadReport` as ``.report``."""

    report: LoadReport


def check_on_error(on_error: str) -> None:
    """Raise unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def jsonl_lines(path: str | Path) -> list[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file as ``(line number, bytes)``, numbered from 1; decoded by
    :func:`parse_jsonl_line` (so that a parallel reader can parse them where it validates them)."""
    return [(row, raw) for row, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1) if raw.strip()]


def parse_jsonl_line(raw: bytes, source: str):
    """One JSONL line as a record; a :class:`DataError` naming ``source`` for invalid UTF-8 or JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(source, None, f"invalid UTF-8 at byte {err.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(source, None, f"not valid JSON ({err.msg} at column {err.colno})") from None


def load_jsonl(path: str | Path, *, on_error: str = "raise", format: str = "auto") -> ExampleList:
    """Read and validate every row of a JSONL file; return them all, or raise at the first bad row.

    The whole file is validated before anything is returned, so a caller never holds a half-read dataset.
    Blank lines are ignored; rows are numbered by line (1-based).

    Args:
        path: The ``.jsonl`` file, one JSON object per line.
        on_error: ``"raise"`` (a :class:`DataError` naming file, row and field) or ``"skip"`` (bad rows are left
            out and listed in ``.report.skipped``).
        format: Record form, see :mod:`dpolab.data.records`.
    """
    check_on_error(on_error)
    path = Path(path)
    out, report = ExampleList(), LoadReport()
    for row, raw in jsonl_lines(path):
        report.rows += 1
        source = f"{path.name}:row {row}"
        try:
            out.append(example_from_record(parse_jsonl_line(raw, source), source, format))
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped.append(str(err))
    report.kept = len(out)
    out.report = report
    return out


class LazyExamples:
    """Validated examples read lazily from a ``datasets`` dataset (or any iterable of records).

    Iterating reads one row at a time, so a dataset larger than memory (an ``IterableDataset`` or a memory-mapped
    ``Dataset``) is never materialised. ``.report`` counts what the latest pass read and skipped.
    """

    def __init__(self, dataset: Iterable[Mapping], name: str = "dataset", on_error: str = "raise",
                 format: str = "auto"):
        check_on_error(on_error)
        self.dataset, self.name, self.on_error, self.format = dataset, name, on_error, format
        self.report = LoadReport()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[PreferenceExample]:
        self.report = report = LoadReport()
        for row, record in enumerate(self.dataset):
            report.rows += 1
            try:
                example = example_from_record(record, f"{self.name}:row {row}", self.format)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                report.skipped.append(str(err))
                continue
            report.kept += 1
            yield example


def iter_dataset(dataset: Iterable[Mapping], *, name: str = "dataset", on_error: str = "raise",
                 format: str = "auto") -> LazyExamples:
    """Wrap a ``datasets.Dataset``/``IterableDataset`` (rows numbered from 0) as lazily validated examples."""
    return LazyExamples(dataset, name=name, on_error=on_error, format=format)
