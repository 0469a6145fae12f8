"""The student edition: the solution notebooks with every answer taken out, in nbgrader's format.

A solution cell (``nbgrader.solution: true``) keeps the code around its solution region; the region itself, from
the line ``### BEGIN SOLUTION`` to the line ``### END SOLUTION``, becomes nbgrader's stub, indented like the
``BEGIN`` line::

    # YOUR CODE HERE
    raise NotImplementedError()

A solution cell without markers is replaced whole (a markdown one by ``YOUR ANSWER HERE``). Regions between
``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` in graded cells are removed; outputs, execution counts and
all metadata but the kernel, the cell tags and nbgrader's own fields are dropped; locked cells are made read-only
in Jupyter (``editable``/``deletable`` false, as nbgrader's ``LockCells`` does). Markers anywhere else, unbalanced
or nested, are an error that names the notebook, the cell and the line, so that no answer slips through; and the
finished edition is searched for every solution line before it is written (:func:`find_leaks`).

:func:`build_edition` does this with the kit's own code by default, or hands the notebooks to nbgrader's
``generate_assignment`` (``use_nbgrader=True``; ``pip install 'dpolab[course]'``), whose output gets the same search.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NOTEBOOKS = ("01_derivation", "02_training", "06_loss_family")
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's default stub for Python
TEXT_STUB = "YOUR ANSWER HERE"
KEPT_CELL_METADATA = ("tags", "nbgrader", "editable", "deletable")
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")
GRADE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")  # nbgrader's rule: the id names files and database rows
MIN_LEAK_CHARS = 6  # shorter solution lines (``)``, ``else:``) say nothing about the answer


class CourseError(ValueError):
    """A course notebook or submission that cannot be used as it is; the message names the file and the cell."""


def _marker(text: str) -> re.Pattern:
    # nbgrader accepts any comment characters before the words; a marker is a line of its own
    return re.compile(r"^\s*(?:#+|//+|%+)?\s*" + text + r"\s*$")


SOLUTION = (_marker("BEGIN SOLUTION"), _marker("END SOLUTION"))
HIDDEN_TESTS = (_marker("BEGIN HIDDEN TESTS"), _marker("END HIDDEN TESTS"))


@dataclass(frozen=True)
class Exercise:
    """One graded test cell of a source notebook: what it is worth and the code that grades it.

    Attributes:
        notebook: the notebook's stem, e.g. ``01_derivation``.
        grade_id: nbgrader's id of the test cell, unique in its notebook.
        points: what the cell is worth when it runs without an error.
        source: the test cell's code as the instructor wrote it, hidden tests included.
    """

    notebook: str
    grade_id: str
    points: float
    source: str


def read_notebook(path: Path) -> dict:
    """The notebook at ``path`` as JSON; a :class:`CourseError` naming the file when it is not a notebook."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CourseError(f"{path}: not a notebook (not JSON: {err})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or nb.get("nbformat") != 4:
        raise CourseError(f"{path}: not a notebook (no 'cells' list, or nbformat is not 4)")
    return nb


def write_notebook(nb: dict, path: Path) -> None:
    """Write ``nb`` in the layout of the repository's notebooks (one-space indent, UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def source_text(cell: dict) -> str:
    """A cell's source as one string (nbformat stores a string or a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def nbgrader_fields(cell: dict) -> dict:
    """The cell's ``metadata.nbgrader`` (empty when it has none)."""
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def is_graded(cell: dict) -> bool:
    """An autograded test cell: worth points, no answer of the student's in it."""
    fields = nbgrader_fields(cell)
    return bool(fields.get("grade")) and not fields.get("solution")


def exercises(nb: dict, name: str) -> list[Exercise]:
    """The graded cells of source notebook ``name``, in order, after checking nbgrader's metadata.

    Every nbgrader cell needs a ``grade_id`` of letters, digits, ``_`` and ``-``, unique in the notebook; a graded
    cell needs positive ``points``. nbgrader refuses the same notebooks; this says which cell.
    """
    seen, found = {}, []
    for index, cell in enumerate(nb["cells"]):
        fields = nbgrader_fields(cell)
        if not fields:
            continue
        grade_id = fields.get("grade_id")
        where = f"{name}, cell {index}, metadata.nbgrader.grade_id"
        if not isinstance(grade_id, str) or not GRADE_ID.match(grade_id):
            raise CourseError(f"{where}: {grade_id!r} must be letters, digits, '_' or '-'")
        if grade_id in seen:
            raise CourseError(f"{where}: {grade_id!r} is also the id of cell {seen[grade_id]}")
        seen[grade_id] = index
        if is_graded(cell):
            points = fields.get("points")
            if isinstance(points, bool) or not isinstance(points, int | float) or points <= 0:
                raise CourseError(f"{name}, cell {index} ({grade_id}), metadata.nbgrader.points: {points!r} must be "
                                  "a positive number")
            found.append(Exercise(name, grade_id, float(points), source_text(cell)))
    return found


def _cut_regions(lines: list[str], markers: tuple[re.Pattern, re.Pattern], stub: tuple[str, ...] | None,
                 where: str) -> tuple[list[str], list[str]]:
    """``lines`` with each region between ``markers`` (marker lines included) replaced by ``stub`` (indented like
    the begin line; nothing when None), and the lines the regions held."""
    begin, end = markers
    kept, removed, opened = [], [], None
    for number, line in enumerate(lines, start=1):
        if begin.match(line):
            if opened is not None:
                raise CourseError(f"{where}, line {number}: {line.strip()!r} inside the region opened on line {opened}")
            opened = number
            indent = line[: len(line) - len(line.lstrip())]
            kept += [indent + s + "\n" for s in stub or ()]
        elif end.match(line):
            if opened is None:
                raise CourseError(f"{where}, line {number}: {line.strip()!r} without a region to close")
            opened = None
        elif opened is not None:
            removed.append(line)
        else:
            kept.append(line)
    if opened is not None:
        raise CourseError(f"{where}, line {opened}: the region opened here is never closed")
    if kept and kept[-1].endswith("\n"):
        kept[-1] = kept[-1][:-1]  # a cell's source does not end with a newline
    return kept, removed


def _has_marker(lines: list[str], markers: tuple[re.Pattern, re.Pattern]) -> int | None:
    return next((n for n, line in enumerate(lines, start=1) if any(m.match(line) for m in markers)), None)


def student_cell(cell: dict, where: str) -> tuple[dict, list[str]]:
    """The student's version of one cell, and the solution lines taken out of it."""
    fields = nbgrader_fields(cell)
    lines = source_text(cell).splitlines(keepends=True)
    solution = []
    for markers, allowed, what in ((SOLUTION, fields.get("solution"), "solution: true"),
                                   (HIDDEN_TESTS, is_graded(cell), "grade: true and solution: false")):
        line = _has_marker(lines, markers)
        if line is not None and not allowed:
            raise CourseError(f"{where}, line {line}: {lines[line - 1].strip()!r} in a cell whose metadata.nbgrader "
                              f"is not {what}; its text would reach the students")
    if fields.get("solution"):
        if _has_marker(lines, SOLUTION) is None:  # the whole cell is the answer
            solution, lines = lines, [TEXT_STUB] if cell["cell_type"] == "markdown" else ["\n".join(CODE_STUB)]
        else:
            stub = (TEXT_STUB,) if cell["cell_type"] == "markdown" else CODE_STUB
            lines, solution = _cut_regions(lines, SOLUTION, stub, where)
    if is_graded(cell):
        lines, hidden = _cut_regions(lines, HIDDEN_TESTS, None, where)
        solution += hidden
    new = {"cell_type": cell["cell_type"], "metadata": {k: v for k, v in cell.get("metadata", {}).items()
                                                        if k in KEPT_CELL_METADATA}}
    if "id" in cell:
        new["id"] = cell["id"]
    if fields.get("locked"):
        new["metadata"].update(editable=False, deletable=False)
    if cell["cell_type"] == "code":
        new.update(execution_count=None, outputs=[])
    new["source"] = lines
    return new, solution


def student_notebook(nb: dict, name: str) -> tuple[dict, list[str]]:
    """The student edition of notebook ``name`` and every line it had to hide (solutions and hidden tests)."""
    exercises(nb, name)  # metadata checked before anything is written
    cells, hidden = [], []
    for index, cell in enumerate(nb["cells"]):
        new, removed = student_cell(cell, f"{name}, cell {index}")
        cells.append(new)
        hidden += removed
    metadata = {k: v for k, v in nb.get("metadata", {}).items() if k in KEPT_NOTEBOOK_METADATA}
    return {**{k: v for k, v in nb.items() if k not in ("cells", "metadata")}, "metadata": metadata,
            "cells": cells}, hidden


def leak_lines(hidden: list[str]) -> list[str]:
    """The hidden lines worth searching for: stripped, at least :data:`MIN_LEAK_CHARS` long, not comments only."""
    lines = {line.strip() for line in hidden}
    return sorted(line for line in lines if len(line) >= MIN_LEAK_CHARS and not line.startswith("#"))


def find_leaks(student: dict, hidden: list[str]) -> list[str]:
    """Where a hidden line still shows in the student notebook (source, outputs or metadata), one line each."""
    places = [(f"cell {i}", json.dumps(c, ensure_ascii=False) + source_text(c)) for i, c in enumerate(student["cells"])]
    places.append(("the notebook metadata", json.dumps(student.get("metadata", {}), ensure_ascii=False)))
    return [f"{line!r} in {place}" for line in leak_lines(hidden) for place, text in places if line in text]


def _check_no_leaks(student: dict, hidden: list[str], name: str) -> None:
    leaks = find_leaks(student, hidden)
    if leaks:
        raise CourseError(f"{name}: the student edition would show hidden lines: " + "; ".join(leaks) +
                          " (rephrase the other cell, or the solution)")


def build_edition(out: Path, notebooks=DEFAULT_NOTEBOOKS, source: Path | None = None,
                  use_nbgrader: bool = False) -> list[Path]:
    """Write the student edition of ``notebooks`` (stems in ``source``, default the repository's notebooks/) to
    ``out``; return the files written.

    Nothing is written unless every notebook strips cleanly and no hidden line is left in any of them.
    ``use_nbgrader`` runs nbgrader's ``generate_assignment`` instead of the kit's stripping.
    """
    if source is None:
        from dpolab.data.cache import REPO_ROOT

        source = REPO_ROOT / "notebooks"
    paths = [Path(source) / f"{stem}.ipynb" for stem in notebooks]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook (--notebooks takes stems of {source})")
    editions = {}
    for path in paths:
        student, hidden = student_notebook(read_notebook(path), path.stem)
        editions[path.name] = (student, hidden)
    if use_nbgrader:
        nbgrader_students = generate_with_nbgrader(paths)
        editions = {name: (nbgrader_students[name], hidden) for name, (_, hidden) in editions.items()}
    for name, (student, hidden) in editions.items():
        _check_no_leaks(student, hidden, name)
    written = []
    for name, (student, _) in editions.items():
        write_notebook(student, Path(out) / name)
        written.append(Path(out) / name)
    return written


def generate_with_nbgrader(paths: list[Path], assignment: str = "dpolab") -> dict[str, dict]:
    """nbgrader's own student versions of ``paths``, by file name: ``nbgrader generate_assignment`` in a
    temporary course folder (no gradebook database)."""
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        raise CourseError("--use-nbgrader needs nbgrader: pip install 'dpolab[course]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "source" / assignment
        folder.mkdir(parents=True)
        for path in paths:
            shutil.copy(path, folder / path.name)
        done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--no-db",
                               "--force", f"--CourseDirectory.root={tmp}"], cwd=tmp, capture_output=True, text=True)
        release = Path(tmp) / "release" / assignment
        if done.returncode != 0 or not all((release / p.name).is_file() for p in paths):
            raise CourseError(f"nbgrader generate_assignment failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return {p.name: read_notebook(release / p.name) for p in paths}
