"""Grading a folder of submissions: each notebook run cell by cell, points per exercise, one table.

Layout (nbgrader's ``submitted/`` folder has it too)::

    SUBMISSIONS/<student>/.../<notebook>.ipynb

The student is the first folder under SUBMISSIONS; the notebook is matched to the source notebook of the same
file name (``01_derivation.ipynb``). Other files in a student's folder are ignored; a file directly under
SUBMISSIONS is reported, as is a ``.ipynb`` that is not a notebook or has no source notebook.

Grading follows nbgrader's autograde: the graded test cells are put back as the instructor wrote them (a student
who edited or emptied a test cell gets the original, hidden tests included), found by their ``grade_id``; every
code cell runs in order in a fresh kernel with a per-cell timeout (a cell that runs longer is interrupted and
counts as an error; after two in a row the rest of the notebook is not run); and an exercise earns its points
when every copy of its test cell ran without an error, none when one failed. A test cell the student deleted
(or whose nbgrader metadata was removed) is reported ``missing``. Points always come from the source notebook.

Grading runs the students' code with the grader's rights, as nbgrader's does: run it in a sandbox you trust.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpolab.course.edition import (
    CourseError,
    Exercise,
    exercises,
    is_graded,
    nbgrader_fields,
    read_notebook,
    source_text,
)

MESSAGE_CHARS = 400  # of an error message, in the report


@dataclass
class ExerciseResult:
    """One exercise of one submission: ``status`` is passed, failed, missing or not run."""

    grade_id: str
    points: float
    max_points: float
    status: str
    message: str = ""


@dataclass
class NotebookResult:
    """One submitted file. ``status``: graded, not submitted, not a notebook, not a course notebook, not in a
    student folder, or kernel error (the kernel died or did not start)."""

    student: str
    notebook: str
    path: str
    status: str
    message: str = ""
    exercises: list[ExerciseResult] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)  # "cell N: error" of cells that are not graded

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self) -> float:
        return sum(e.max_points for e in self.exercises)


def source_exercises(source: Path) -> dict[str, list[Exercise]]:
    """The exercises of every notebook in ``source`` that has some, by stem."""
    found = {}
    for path in sorted(Path(source).glob("*.ipynb")):
        listed = exercises(read_notebook(path), path.stem)
        if listed:
            found[path.stem] = listed
    if not found:
        raise CourseError(f"{source}: no notebook with graded cells (metadata.nbgrader.grade: true)")
    return found


def _first_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def _parameters_cell(assignments: dict) -> dict:
    source = "# Parameters set by the grader\n" + "\n".join(f"{k} = {v!r}" for k, v in assignments.items())
    return {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "execution_count": None,
            "outputs": [], "source": source}


def declared_parameters(cell: dict) -> set[str]:
    """The names a ``parameters`` cell assigns (none when it does not parse)."""
    try:
        tree = ast.parse(source_text(cell))
    except SyntaxError:
        return set()
    targets = [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
    targets += [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def prepared(nb: dict, listed: list[Exercise], parameters: dict | None = None) -> dict:
    """The submission ``nb`` as it will run: every graded cell with the instructor's source (by grade_id), and
    those of ``parameters`` that its ``parameters`` cell declares assigned in a cell right after it (as papermill
    does; one set of parameters serves notebooks with different ones)."""
    originals = {e.grade_id: e.source for e in listed}
    cells = []
    for cell in nb["cells"]:
        grade_id = nbgrader_fields(cell).get("grade_id")
        if is_graded(cell) and grade_id in originals:
            cell = {**cell, "cell_type": "code", "source": originals[grade_id], "outputs": [],
                    "execution_count": None}
        cells.append({**cell, "source": source_text(cell)})  # one string, as nbformat reads a file
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if parameters and tagged:
        declared = declared_parameters(cells[tagged[0]])
        own = {k: v for k, v in parameters.items() if k in declared}
        if own:
            cells.insert(tagged[0] + 1, _parameters_cell(own))
    return {**nb, "cells": cells}


def run_cells(nb: dict, cwd: Path, timeout: float, kernel_name: str = "python3") -> tuple[dict[int, str], int | None]:
    """Execute the code cells of ``nb`` in order in a fresh kernel started in ``cwd``.

    Returns the error message of each cell that failed, by index, and the index of the first cell not run (None
    when all ran): after two timeouts in a row the kernel is taken as stuck, and a dead kernel ends the run.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    errors: dict[int, str] = {}

    def on_error(cell, cell_index, execute_reply):
        content = execute_reply["content"]
        errors[cell_index] = _first_line(f"{content.get('ename', 'Error')}: {content.get('evalue', '')}")

    from dpolab.cli.notebook_output import kernel_manager_class

    notebook = nbformat.from_dict(nb)
    manager = kernel_manager_class()  # the kit's kernels run over IPC where possible (no TCP warning per notebook)
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel_name, allow_errors=True,
                            **({"kernel_manager_class": manager} if manager is not None else {}),
                            interrupt_on_timeout=True, on_cell_error=on_error,
                            error_on_timeout={"ename": "Timeout", "evalue": f"the cell ran longer than {timeout:g} s "
                                              "and was interrupted", "traceback": []},
                            resources={"metadata": {"path": str(cwd)}})
    timeouts_in_a_row = 0
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except DeadKernelError:
                errors[index] = "the kernel died while running this cell"
                return errors, index + 1
            timeouts_in_a_row = timeouts_in_a_row + 1 if errors.get(index, "").startswith("Timeout:") else 0
            if timeouts_in_a_row == 2:
                return errors, index + 1
    return errors, None


def grade_notebook(path: Path, student: str, listed: list[Exercise], *, timeout: float, kernel_name: str = "python3",
                   parameters: dict | None = None) -> NotebookResult:
    """Run one submission and score each exercise of its source notebook (``listed``)."""
    result = NotebookResult(student, listed[0].notebook, str(path), "graded")
    try:
        nb = prepared(read_notebook(path), listed, parameters)
    except CourseError as err:
        result.status, result.message = "not a notebook", str(err)
        result.exercises = [ExerciseResult(e.grade_id, 0.0, e.points, "not run", "not a notebook") for e in listed]
        return result
    where = {}
    for index, cell in enumerate(nb["cells"]):
        if is_graded(cell):
            where.setdefault(nbgrader_fields(cell).get("grade_id"), []).append(index)
    try:
        errors, stopped = run_cells(nb, Path(path).parent, timeout, kernel_name)
    except Exception as err:  # the kernel did not start or broke down: this student only
        errors, stopped = {}, 0
        result.status, result.message = "kernel error", _first_line(f"{type(err).__name__}: {err}")
    if stopped is not None and result.status == "graded":
        result.message = f"stopped after cell {stopped - 1}: {errors.get(stopped - 1, '')}"
    graded_cells = {i for cells in where.values() for i in cells}
    result.other_errors = [f"cell {i}: {m}" for i, m in sorted(errors.items()) if i not in graded_cells]
    for exercise in listed:
        cells = where.get(exercise.grade_id, [])
        failed = [errors[i] for i in cells if i in errors]
        if not cells:
            status, message = "missing", "the graded cell was deleted (or its nbgrader metadata removed)"
        elif failed:
            status, message = "failed", failed[0]
        elif stopped is not None and max(cells) >= stopped:
            status, message = "not run", result.message or "the notebook was not run"
        else:
            status, message = "passed", ""
        points = exercise.points if status == "passed" else 0.0
        result.exercises.append(ExerciseResult(exercise.grade_id, points, exercise.points, status, message))
    return result


def grade_submissions(submissions: Path, source: Path | None = None, *, timeout: float = 600,
                      kernel_name: str = "python3", parameters: dict | None = None) -> list[NotebookResult]:
    """Grade every student folder of ``submissions`` against the exercises of ``source`` (default notebooks/).

    Every source notebook with exercises gets one row per student: graded, or ``not submitted`` with zero points.
    """
    if source is None:
        from dpolab.data.cache import REPO_ROOT

        source = REPO_ROOT / "notebooks"
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise NotADirectoryError(f"{submissions}: not a folder of student folders")
    course = source_exercises(Path(source))
    results = []
    for entry in sorted(submissions.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            results.append(NotebookResult("", entry.stem, str(entry), "not in a student folder",
                                          f"{entry.name}: put each student's files in a folder named after them"))
            continue
        submitted = {}
        for path in sorted(entry.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in path.parts:
                continue
            if path.stem not in course:
                results.append(NotebookResult(entry.name, path.stem, str(path), "not a course notebook",
                                              f"no source notebook {path.name}; expected one of "
                                              f"{', '.join(n + '.ipynb' for n in course)}"))
            elif path.stem in submitted:
                results.append(NotebookResult(entry.name, path.stem, str(path), "not graded",
                                              f"a second {path.name}; graded: {submitted[path.stem]}"))
            else:
                submitted[path.stem] = path
        for stem, listed in course.items():
            if stem in submitted:
                results.append(grade_notebook(submitted[stem], entry.name, listed, timeout=timeout,
                                              kernel_name=kernel_name, parameters=parameters))
            else:
                results.append(NotebookResult(entry.name, stem, "", "not submitted", "", [
                    ExerciseResult(e.grade_id, 0.0, e.points, "not run", "not submitted") for e in listed]))
    return results


def report_table(results: list[NotebookResult]):
    """Points per student (rows) and exercise (columns ``notebook/grade_id (max)``), with the total: a DataFrame."""
    import pandas as pd

    rows = {}
    for r in results:
        row = rows.setdefault(r.student, {})
        for e in r.exercises:
            row[f"{r.notebook}/{e.grade_id} ({e.max_points:g})"] = e.points
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("student")
    if not table.empty:
        maximum = sum(e.max_points for r in results if r.student == table.index[0] for e in r.exercises)
        table[f"total ({maximum:g})"] = table.sum(axis=1)
    return table


def problems(results: list[NotebookResult]) -> list[str]:
    """One line per file that was not graded and per exercise that lost its points, with the reason."""
    lines = []
    for r in results:
        who = f"{r.student or '-'} {Path(r.path).name if r.path else r.notebook}"
        if r.status not in ("graded", "not submitted"):
            lines.append(f"{who}: {r.status}: {r.message}")
        elif r.status == "not submitted":
            lines.append(f"{who}: not submitted")
        else:
            lines += [f"{who} {e.grade_id}: {e.status}: {e.message}" for e in r.exercises if e.status != "passed"]
            if r.other_errors:  # often the cause of a test cell's NameError
                lines.append(f"{who}: errors in cells that are not graded: " + "; ".join(r.other_errors[:3]) +
                             (f"; and {len(r.other_errors) - 3} more" if len(r.other_errors) > 3 else ""))
    return lines


def write_json(results: list[NotebookResult], path: Path) -> None:
    """Every result, with its exercises, points and messages, as JSON."""
    rows = [{**asdict(r), "points": r.points, "max_points": r.max_points} for r in results]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def autograde_with_nbgrader(course: Path, assignment: str, *, timeout: float = 600) -> list[NotebookResult]:
    """Hand grading over to nbgrader in its own course folder, and read its gradebook back as this module's results.

    ``course`` is an nbgrader course folder: the solution notebooks in ``source/<assignment>/``, the submissions in
    ``submitted/<student>/<assignment>/``. The assignment is recorded in the gradebook (``nbgrader
    generate_assignment``, which also writes ``release/``), every submission is autograded (``nbgrader autograde``,
    ``timeout`` seconds per cell), and each student's points per graded cell come from ``gradebook.db``, with the
    error a failed test cell printed in ``autograded/`` as its message. nbgrader's own problems (a submission it
    could not grade) are reported for that student; ``nbgrader export`` and the formgrader work on the same folder.
    """
    import os
    import subprocess
    import sys

    try:
        from nbgrader.api import Gradebook, MissingEntry
    except ImportError:
        raise CourseError("grading with nbgrader needs nbgrader: pip install 'dpolab[course]'") from None
    course = Path(course).resolve()
    if not (course / "source" / assignment).is_dir():
        raise NotADirectoryError(f"{course / 'source' / assignment}: no such folder; an nbgrader course folder holds "
                                 "the solution notebooks in source/<assignment>/ and the submissions in "
                                 "submitted/<student>/<assignment>/")
    root = f"--CourseDirectory.root={course}"
    # nbgrader runs the `alembic` command of its environment, found on PATH: where dpolab runs from a virtual
    # environment that is not activated, its bin folder is not there
    bin_folder = str(Path(sys.executable).parent)
    if bin_folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_folder + os.pathsep + os.environ.get("PATH", "")
    for step in (["generate_assignment", assignment, "--force", root],
                 ["autograde", assignment, "--force", root, f"--ExecutePreprocessor.timeout={timeout:g}"]):
        done = subprocess.run([sys.executable, "-m", "nbgrader", *step], cwd=course, capture_output=True, text=True)
        if step[0] == "generate_assignment" and done.returncode != 0:
            raise CourseError(f"nbgrader generate_assignment failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
    log = done.stderr + done.stdout  # autograde's: it goes on past a student it cannot grade, and says so
    results = []
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        notebooks = [nb.name for nb in gradebook.find_assignment(assignment).notebooks]
        for student in sorted(s.id for s in gradebook.students):
            for name in notebooks:
                path = course / "autograded" / student / assignment / f"{name}.ipynb"
                try:
                    submission = gradebook.find_submission_notebook(name, assignment, student)
                except MissingEntry:
                    problem = next((line.strip() for line in log.splitlines() if student in line and "rror" in line),
                                   "not graded by nbgrader autograde")
                    results.append(NotebookResult(student, name, str(path), "not graded", _first_line(problem)))
                    continue
                errors = _autograded_errors(path)
                order = {e.grade_id: i for i, e in enumerate(exercises(read_notebook(
                    course / "source" / assignment / f"{name}.ipynb"), name))}
                result = NotebookResult(student, name, str(path), "graded")
                for grade in sorted(submission.grades, key=lambda g: order.get(g.name, len(order))):
                    if grade.score is None:  # a manually graded answer nobody has graded yet
                        status, message = "not run", "needs manual grading (nbgrader formgrader)"
                    elif grade.score == grade.max_score:
                        status, message = "passed", ""
                    else:
                        status, message = "failed", errors.get(grade.name, "the test cell failed")
                    result.exercises.append(ExerciseResult(grade.name, float(grade.score or 0.0),
                                                           float(grade.max_score), status, message))
                results.append(result)
    return results


def _autograded_errors(path: Path) -> dict[str, str]:
    """``grade_id → "Name: message"`` of every cell of nbgrader's autograded notebook that shows an error."""
    try:
        nb = read_notebook(path)
    except (CourseError, FileNotFoundError):
        return {}
    errors = {}
    for cell in nb["cells"]:
        failed = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if failed and nbgrader_fields(cell).get("grade_id"):
            errors[nbgrader_fields(cell)["grade_id"]] = _first_line(f"{failed[0].get('ename')}: {failed[0].get('evalue')}")
    return errors
