"""The course edition (dpolab.course): student notebooks built from nbgrader's markers, and grading.

Building and grading are checked on a tiny synthetic notebook (numpy only, two exercises worth 2 and 1 points, one
with a hidden test), graded once for seven students: the solutions (3/3), the untouched student edition (0/3), a
sign flipped (loses exactly that exercise's point), a function that loops forever (the per-cell timeout fails that
exercise only), a deleted test cell (reported missing), a test cell emptied by the student (restored, hidden test
included), and a file that is not a notebook. The real notebooks 01, 02 and 06 are only built, not executed: their
exercises are paired and unique, and no solution line survives in the student edition.
"""

import copy
import json
import re

import pytest

from dpolab.course.edition import (
    DEFAULT_NOTEBOOKS,
    CourseError,
    build_edition,
    exercises,
    is_graded,
    leak_lines,
    nbgrader_fields,
    read_notebook,
    source_text,
    student_notebook,
    write_notebook,
)
from dpolab.data.cache import REPO_ROOT


def code(source: str, **nbgrader) -> dict:
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
    if nbgrader:
        cell["metadata"]["nbgrader"] = {"schema_version": 3, "task": False, "locked": False, "solution": False,
                                        "grade": False, **nbgrader}
    return cell


def solution(grade_id: str, source: str) -> dict:
    return code(source, solution=True, grade_id=grade_id)


def graded_test(grade_id: str, points: float, source: str) -> dict:
    return code(source, grade=True, locked=True, grade_id=grade_id, points=points)


SQUARE = '''def square(x):
    """x squared."""
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION'''
SQUARE_TEST = '''assert square(3) == 9, "square(3) must be 9"
### BEGIN HIDDEN TESTS
assert square(-4) == 16, "square of a negative number must be positive"
### END HIDDEN TESTS'''
NEGATE = '''def negate(values):
    ### BEGIN SOLUTION
    return -values
    ### END SOLUTION'''
NEGATE_TEST = 'assert negate(np.arange(3)).tolist() == [0, -1, -2], "negate: the sign is wrong"'


def synthetic() -> dict:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "# A tiny course"},
             code("import numpy as np"),
             solution("square", SQUARE), graded_test("square_test", 2, SQUARE_TEST),
             solution("negate", NEGATE), graded_test("negate_test", 1, NEGATE_TEST),
             code("print('done')")]
    cells[1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "return x * x\n"}]
    cells[1]["execution_count"] = 3
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}, "secret": "return -values"},
            "nbformat": 4, "nbformat_minor": 5}


def replace_in(nb: dict, grade_id: str, old: str, new: str) -> dict:
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if nbgrader_fields(cell).get("grade_id") == grade_id:
            assert old in source_text(cell)
            cell["source"] = source_text(cell).replace(old, new)
    return nb


def test_student_edition_stubs_solutions_and_drops_hidden_tests_outputs_and_metadata():
    student, hidden = student_notebook(synthetic(), "tiny")
    cells = student["cells"]
    assert source_text(cells[2]) == ('def square(x):\n    """x squared."""\n    # YOUR CODE HERE\n'
                                     '    raise NotImplementedError()')
    assert source_text(cells[3]) == 'assert square(3) == 9, "square(3) must be 9"'
    assert cells[3]["metadata"]["editable"] is False and cells[3]["metadata"]["deletable"] is False
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in cells)
    assert student["metadata"] == {"kernelspec": synthetic()["metadata"]["kernelspec"]}
    assert "    return x * x\n" in hidden and any("square(-4)" in line for line in hidden)
    text = json.dumps(student)
    assert not [line for line in leak_lines(hidden) if line in text]


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("### END SOLUTION", "without a region"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the region"),
])
def test_unbalanced_markers_name_the_cell_and_line(source, message):
    nb = synthetic()
    nb["cells"][2]["source"] = source
    with pytest.raises(CourseError, match=f"tiny, cell 2, line .*{message}"):
        student_notebook(nb, "tiny")


def test_markers_outside_solution_cells_and_bad_metadata_are_refused():
    nb = synthetic()
    nb["cells"][6]["source"] = "### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION"
    with pytest.raises(CourseError, match="tiny, cell 6, line 1: .* not solution: true"):
        student_notebook(nb, "tiny")
    nb = synthetic()
    nb["cells"][5]["metadata"]["nbgrader"]["grade_id"] = "square_test"
    with pytest.raises(CourseError, match="cell 5.*'square_test' is also the id of cell 3"):
        exercises(nb, "tiny")
    nb = synthetic()
    del nb["cells"][5]["metadata"]["nbgrader"]["points"]
    with pytest.raises(CourseError, match="cell 5 .*points: None must be a positive number"):
        exercises(nb, "tiny")


def test_a_solution_line_repeated_in_another_cell_stops_the_build(tmp_path):
    nb = synthetic()
    nb["cells"][6]["source"] = "def negate(values):\n    return -values"  # the answer, given away elsewhere
    write_notebook(nb, tmp_path / "src" / "tiny.ipynb")
    with pytest.raises(CourseError, match="'return -values' in cell 6"):
        build_edition(tmp_path / "out", ["tiny"], tmp_path / "src")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """One grading run over seven students of the synthetic notebook (timeout 5 s per cell)."""
    from dpolab.course.grading import grade_submissions

    root = tmp_path_factory.mktemp("course")
    write_notebook(synthetic(), root / "source" / "tiny.ipynb")
    build_edition(root / "student", ["tiny"], root / "source")
    edition = read_notebook(root / "student" / "tiny.ipynb")
    solved = synthetic()
    subs = root / "submitted"
    write_notebook(solved, subs / "alice" / "tiny.ipynb")
    write_notebook(edition, subs / "bob" / "assignment1" / "tiny.ipynb")  # nbgrader's layout
    write_notebook(replace_in(solved, "negate", "return -values", "return values"), subs / "carol" / "tiny.ipynb")
    (subs / "dave").mkdir()
    (subs / "dave" / "tiny.ipynb").write_text("these are my answers: x * x and -x")
    write_notebook(replace_in(solved, "square", "return x * x", "while True:\n        pass"),
                   subs / "erin" / "tiny.ipynb")
    frank = copy.deepcopy(solved)
    frank["cells"] = [c for c in frank["cells"] if nbgrader_fields(c).get("grade_id") != "negate_test"]
    write_notebook(frank, subs / "frank" / "tiny.ipynb")
    grace = replace_in(replace_in(solved, "square", "return x * x", "return x * abs(x)"), "square_test",
                       'assert square(3) == 9, "square(3) must be 9"', "pass")
    write_notebook(grace, subs / "grace" / "tiny.ipynb")
    (subs / "notes.txt").write_text("not in a student folder")
    results = grade_submissions(subs, root / "source", timeout=5)
    return {r.student: r for r in results if r.student}, results


def scores(result) -> dict:
    return {e.grade_id: (e.points, e.status) for e in result.exercises}


def test_solutions_get_full_marks_and_the_student_edition_zero(graded):
    by_student, _ = graded
    assert by_student["alice"].status == "graded" and by_student["alice"].points == 3
    assert by_student["alice"].other_errors == [] and by_student["bob"].other_errors == []
    assert scores(by_student["alice"]) == {"square_test": (2, "passed"), "negate_test": (1, "passed")}
    bob = by_student["bob"]
    assert bob.status == "graded" and bob.points == 0 and bob.max_points == 3
    assert all(e.status == "failed" and "NotImplementedError" in e.message for e in bob.exercises)


def test_a_classic_mistake_loses_exactly_its_exercise(graded):
    carol = graded[0]["carol"]
    assert scores(carol) == {"square_test": (2, "passed"), "negate_test": (0, "failed")}
    assert "the sign is wrong" in carol.exercises[1].message


def test_bad_submissions_are_reported_and_grading_goes_on(graded):
    by_student, results = graded
    assert by_student["dave"].status == "not a notebook" and by_student["dave"].points == 0
    erin = by_student["erin"]  # square loops forever: interrupted, and the next exercise still runs
    assert scores(erin) == {"square_test": (0, "failed"), "negate_test": (1, "passed")}
    assert erin.exercises[0].message.startswith("Timeout")
    assert scores(by_student["frank"]) == {"square_test": (2, "passed"), "negate_test": (0, "missing")}
    assert [r.status for r in results if not r.student] == ["not in a student folder"]


def test_edited_test_cells_are_restored_with_their_hidden_tests(graded):
    grace = graded[0]["grace"]
    assert scores(grace)["square_test"] == (0, "failed")
    assert "square of a negative number must be positive" in grace.exercises[0].message


def test_report_table_and_json(graded, tmp_path):
    from dpolab.course.grading import problems, report_table, write_json

    _, results = graded
    table = report_table(results)
    assert table.loc["alice", "total (3)"] == 3 and table.loc["carol", "tiny/negate_test (1)"] == 0
    assert any(line.startswith("dave tiny.ipynb: not a notebook") for line in problems(results))
    write_json(results, tmp_path / "grades.json")
    rows = json.loads((tmp_path / "grades.json").read_text())
    assert {r["student"]: r["points"] for r in rows if r["student"]}["frank"] == 2


def test_cli_builds_the_student_edition(tmp_path):
    from dpolab.cli import main

    write_notebook(synthetic(), tmp_path / "src" / "tiny.ipynb")
    assert main(["course", "build", str(tmp_path / "out"), "--notebooks", "tiny", "--source",
                 str(tmp_path / "src")]) == 0
    assert "raise NotImplementedError()" in (tmp_path / "out" / "tiny.ipynb").read_text()
    assert main(["course", "build", str(tmp_path / "out"), "--notebooks", "nope", "--source",
                 str(tmp_path / "src")]) == 2


# ---- the real notebooks: built, never executed here ----

REAL = [REPO_ROOT / "notebooks" / f"{stem}.ipynb" for stem in DEFAULT_NOTEBOOKS]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_each_exercise_is_a_solution_cell_followed_by_its_graded_test(path):
    nb = read_notebook(path)
    listed = exercises(nb, path.stem)  # unique grade_ids, positive points
    assert listed, f"{path.name} has no exercise"
    cells = nb["cells"]
    for index, cell in enumerate(cells):
        if nbgrader_fields(cell).get("solution"):
            assert "### BEGIN SOLUTION" in source_text(cell), f"{path.name} cell {index}"
            following = next(c for c in cells[index + 1:] if c["cell_type"] == "code")
            assert is_graded(following), f"{path.name} cell {index}: the next code cell is not a graded test"
            assert "from dpolab" not in source_text(cell).split("### BEGIN SOLUTION")[1], (
                f"{path.name} cell {index}: the solution must be the student's own code, not a library call")
        if is_graded(cell):
            assert nbgrader_fields(cell)["locked"] is True and cell["outputs"] == []


def test_the_student_edition_of_the_real_notebooks_gives_no_answer_away(tmp_path):
    written = build_edition(tmp_path)
    assert [p.name for p in written] == [p.name for p in REAL]
    for source, built in zip(REAL, written):
        text = built.read_text()
        _, hidden = student_notebook(read_notebook(source), source.stem)
        solution_lines = {line.strip() for cell in read_notebook(source)["cells"] if nbgrader_fields(cell).get("solution")
                          for line in source_text(cell).split("### BEGIN SOLUTION")[1].split("### END SOLUTION")[0]
                          .splitlines() if line.strip()}
        assert solution_lines and solution_lines <= {line.strip() for line in hidden}
        for line in solution_lines:
            assert line not in text and json.dumps(line)[1:-1] not in text, f"{built.name}: {line!r}"
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
        assert text.count("raise NotImplementedError()") == len(
            [c for c in read_notebook(source)["cells"] if nbgrader_fields(c).get("solution")])
        student = read_notebook(built)
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in student["cells"])
        params = [c for c in student["cells"] if "parameters" in c["metadata"].get("tags", [])]
        assert len(params) == 1  # papermill still finds the parameters cell


def test_nbgrader_builds_the_same_edition(tmp_path):
    pytest.importorskip("nbgrader")
    ours = build_edition(tmp_path / "ours")
    theirs = build_edition(tmp_path / "nbgrader", use_nbgrader=True)
    for a, b in zip(ours, theirs):
        sources_a = [source_text(c) for c in read_notebook(a)["cells"]]
        sources_b = [source_text(c) for c in read_notebook(b)["cells"]]
        assert sources_a == sources_b, a.name


def test_grading_parameters_go_only_to_notebooks_that_declare_them():
    from dpolab.course.grading import prepared

    nb = synthetic()
    nb["cells"].insert(1, {**code("scale: int = 1  # a parameter"), "metadata": {"tags": ["parameters"]}})
    nb = replace_in(nb, "square_test", "square(3) == 9", "square(3) == 0")  # a student's edit of a locked cell
    run = prepared(nb, exercises(synthetic(), "tiny"), {"scale": 3, "model": "tiny-llama"})
    assert source_text(run["cells"][2]) == "# Parameters set by the grader\nscale = 3"
    assert source_text(run["cells"][5]) == SQUARE_TEST  # restored, hidden tests included
    assert prepared(synthetic(), exercises(synthetic(), "tiny"), {"model": "x"})["cells"] == [
        {**c, "source": source_text(c)} for c in synthetic()["cells"]]


# ---- the real exercises, cell by cell: the solution passes its test cell, the stub and classic mistakes fail ----
# Not the notebooks run: in one namespace, the notebook's parameters cell (literals), the import statements of the
# code cells before the exercise (imports only, no computation), stand-ins for what earlier cells computed, then the
# solution (or stub, or mistaken) cell and the test cell with its hidden tests, as the grader runs it. Milliseconds.

def _standins(stem: str) -> dict:
    """What the test cells read from cells that are not run here: 01's bandit (rewards and log π_ref of a 4 × 6
    bandit, as §1 draws them) and 02's implicit rewards of the trained policy on its training pairs."""
    import types

    import torch

    generator = torch.Generator().manual_seed(0)
    if stem == "01_derivation":
        rewards = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        ref = torch.log_softmax(0.5 * torch.randn(4, 6, generator=generator, dtype=torch.float64), -1)
        return {"bandit": types.SimpleNamespace(rewards=rewards, ref_logprobs=ref), "ref": ref}
    if stem == "02_training":
        return {"chosen_r": torch.randn(24, generator=generator), "rejected_r": torch.randn(24, generator=generator)}
    return {}


def _imports_of(cell: dict) -> str:
    import ast

    tree = ast.parse(source_text(cell))
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom))


def run_exercise(stem: str, grade_id: str, solution_source: str | None = None) -> None:
    """Run exercise ``grade_id`` of notebook ``stem`` as graded: its solution cell (or ``solution_source``), then
    its test cell, hidden tests included; raises what the test cell raises."""
    cells = read_notebook(REPO_ROOT / "notebooks" / f"{stem}.ipynb")["cells"]
    test_index = next(i for i, c in enumerate(cells) if nbgrader_fields(c).get("grade_id") == grade_id)
    solution_index = max(i for i in range(test_index) if nbgrader_fields(cells[i]).get("solution"))
    namespace: dict = {}
    for cell in cells[:solution_index]:
        if cell["cell_type"] != "code":
            continue
        if "parameters" in cell["metadata"].get("tags", []):
            exec(source_text(cell), namespace)
        else:
            exec(_imports_of(cell), namespace)
    namespace.update(_standins(stem))
    exec(source_text(cells[solution_index]) if solution_source is None else solution_source, namespace)
    exec(source_text(cells[test_index]), namespace)


REAL_EXERCISES = [(path.stem, e.grade_id) for path in REAL for e in exercises(read_notebook(path), path.stem)]


@pytest.mark.parametrize("stem, grade_id", REAL_EXERCISES, ids=[g for _, g in REAL_EXERCISES])
def test_each_real_test_cell_passes_on_the_solution_and_fails_on_the_stub(stem, grade_id):
    run_exercise(stem, grade_id)
    nb = read_notebook(REPO_ROOT / "notebooks" / f"{stem}.ipynb")
    student, _ = student_notebook(nb, stem)
    test_index = next(i for i, c in enumerate(nb["cells"]) if nbgrader_fields(c).get("grade_id") == grade_id)
    stub_index = max(i for i in range(test_index) if nbgrader_fields(nb["cells"][i]).get("solution"))
    with pytest.raises(NotImplementedError):
        run_exercise(stem, grade_id, source_text(student["cells"][stub_index]))


# (notebook, exercise, the solution's line, a classic mistake in its place, what the test cell must say)
MISTAKES = [
    ("01_derivation", "pi_star_test", "tilted = ref_logprobs + rewards / beta", "tilted = ref_logprobs + rewards * beta",
     "r·β in place of r/β"),
    ("01_derivation", "pi_star_test", "return tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)",
     "return tilted", "log_optimal_policy"),
    ("01_derivation", "dpo_loss_test", "beta * (chosen_logratio - rejected_logratio)",
     "beta * (rejected_logratio - chosen_logratio)", "chosen and rejected swapped (the sign of the margin flipped)"),
    ("01_derivation", "dpo_loss_test", "return -torch.nn.functional.logsigmoid(beta * (chosen_logratio - rejected_logratio))",
     "return -torch.log(torch.sigmoid(beta * (chosen_logratio - rejected_logratio)))",
     "margins of thousands of nats"),  # only the hidden test catches the unstable form
    ("02_training", "sequence_logprobs_test", "(scored * response_mask[:, 1:]).sum(-1)", "scored.sum(-1)",
     "(no mask)"),
    ("02_training", "sequence_logprobs_test", "logits[:, :-1]", "logits[:, 1:]", "my_sequence_logprobs"),
    ("02_training", "reward_accuracy_test", "(wins + 0.5 * ties).mean()", "wins.mean()", "ties counted as losses"),
    ("06_loss_family", "ipo_loss_test", "- 1 / (2 * beta)) ** 2", "- 1 / beta) ** 2", "the target 1/β in place of 1/(2β)"),
    ("06_loss_family", "ipo_loss_test", "(policy_chosen_logps - ref_chosen_logps) / chosen_lengths",
     "(policy_chosen_logps - ref_chosen_logps) / rejected_lengths", "my_ipo_loss"),
]


@pytest.mark.parametrize("stem, grade_id, right, wrong, message", MISTAKES,
                         ids=[f"{m[1]}-{i}" for i, m in enumerate(MISTAKES)])
def test_a_classic_mistake_fails_its_real_test_cell_with_a_message(stem, grade_id, right, wrong, message):
    from dpolab.course.checks import ExerciseError

    cells = read_notebook(REPO_ROOT / "notebooks" / f"{stem}.ipynb")["cells"]
    test_index = next(i for i, c in enumerate(cells) if nbgrader_fields(c).get("grade_id") == grade_id)
    solution = source_text(cells[max(i for i in range(test_index) if nbgrader_fields(cells[i]).get("solution"))])
    assert right in solution, f"the solution of {grade_id} changed; update MISTAKES"
    with pytest.raises(ExerciseError, match=re.escape(message)):
        run_exercise(stem, grade_id, solution.replace(right, wrong, 1))


def test_nbgrader_autograde_hand_over(tmp_path):
    """The same three submissions graded by nbgrader in its own course folder give the same points and messages."""
    pytest.importorskip("nbgrader")
    from dpolab.course.grading import autograde_with_nbgrader, report_table

    course = tmp_path / "course"
    write_notebook(synthetic(), course / "source" / "a1" / "tiny.ipynb")
    build_edition(tmp_path / "student", ["tiny"], course / "source" / "a1")
    write_notebook(synthetic(), course / "submitted" / "alice" / "a1" / "tiny.ipynb")
    write_notebook(read_notebook(tmp_path / "student" / "tiny.ipynb"), course / "submitted" / "bob" / "a1" / "tiny.ipynb")
    write_notebook(replace_in(synthetic(), "negate", "return -values", "return values"),
                   course / "submitted" / "carol" / "a1" / "tiny.ipynb")
    results = {r.student: r for r in autograde_with_nbgrader(course, "a1", timeout=30)}
    assert scores(results["alice"]) == {"square_test": (2, "passed"), "negate_test": (1, "passed")}
    assert all(e.status == "failed" and "NotImplementedError" in e.message for e in results["bob"].exercises)
    assert results["bob"].points == 0
    assert scores(results["carol"]) == {"square_test": (2, "passed"), "negate_test": (0, "failed")}
    assert "the sign is wrong" in results["carol"].exercises[1].message
    assert report_table(list(results.values())).loc["carol", "total (3)"] == 2
