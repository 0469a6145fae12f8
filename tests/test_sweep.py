"""The sweep command: grid handling, checked without executing notebooks; the manifest, --continue-on-error,
--resume, --jobs and collect, on a tiny notebook (no model: each point saves one model row and appends its x to a
log, so a test sees which points ran)."""

import json

import pytest

from dpolab.cli.sweep import grid_points, parse_grid, run_name


def test_parse_grid_literals_and_errors():
    assert parse_grid(["beta=0.05,0.1", "loss=sigmoid,ipo", "steps=8"]) == {
        "beta": [0.05, 0.1], "loss": ["sigmoid", "ipo"], "steps": [8]}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_grid(["beta"])


def test_grid_points_are_the_cartesian_product_in_order():
    """2 β × 2 losses = 4 runs, β varying slowest (the order the keys were given)."""
    points = grid_points({"beta": [0.1, 0.5], "loss": ["sigmoid", "ipo"]})
    assert points == [{"beta": 0.1, "loss": "sigmoid"}, {"beta": 0.1, "loss": "ipo"},
                      {"beta": 0.5, "loss": "sigmoid"}, {"beta": 0.5, "loss": "ipo"}]


def test_run_names_carry_the_parameters(tmp_path):
    assert run_name(tmp_path / "03_beta_sweep.ipynb", {"beta": 0.05}) == "03_beta_sweep__beta=0.05"


def test_unknown_grid_parameter_fails_before_running(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from dpolab.cli.sweep import run_sweep

    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("beta: float = 0.1  # β")
    cell.metadata["tags"] = ["parameters"]
    book.cells = [cell]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(book, str(path))
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['betta'\]"):
        run_sweep(path, {"betta": [0.1]}, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_grid_values_read_as_override_values():
    """Grid values go through dpolab.train.overrides.parse_value, as the train and reproduce overrides do: YAML's reading,
    plus 1e-5-style numbers (text in YAML 1.1) and Python's None."""
    assert parse_grid(["lr=1e-5,5E-5", "baselines=true,False", "ld_alpha=None,null", "name='0.1',x"]) == {
        "lr": [1e-5, 5e-5], "baselines": [True, False], "ld_alpha": [None, None], "name": ["0.1", "x"]}



def tiny_notebook(folder):
    """A notebook with parameters x, output_dir, fail_flag and log: it appends x to ``log``, raises when x == 2 and
    the file ``fail_flag`` exists, then saves the model row p<x> (reward x / 10) under ``output_dir/models``."""
    nbformat = pytest.importorskip("nbformat")
    book = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('x: int = 0  # the grid point\noutput_dir: str = ""  # where rows go\n'
                                       'fail_flag: str = ""  # point 2 fails while this file exists\n'
                                       'log: str = ""  # every run appends its x here')
    params.metadata["tags"] = ["parameters"]
    book.cells = [params, nbformat.v4.new_code_cell(
        "from pathlib import Path\n"
        "from dpolab.evaluate.results import save_model_row\n"
        "with open(log, 'a') as f:\n    f.write(f'{x}\\n')\n"
        "if x == 2 and fail_flag and Path(fail_flag).exists():\n    raise RuntimeError('point 2 fails on purpose')\n"
        "save_model_row({'policy': f'p{x}', 'method': 'DPO', 'beta': x / 10, 'reward': x / 10, 'kl': 0.1},"
        " Path(output_dir) / 'models', source='tiny')")]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "tiny.ipynb"
    nbformat.write(book, str(path))
    return path


def ran(log):
    """The x of every execution so far, in order."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.fixture
def sweep_setup(tmp_path):
    """The tiny notebook, fixed parameters pointing into tmp_path, and a stale row left by an earlier run."""
    from dpolab.evaluate.results import save_model_row

    notebook = tiny_notebook(tmp_path)
    fixed = {"output_dir": str(tmp_path / "run"), "fail_flag": str(tmp_path / "flag"), "log": str(tmp_path / "log")}
    save_model_row({"policy": "stale", "method": "DPO", "reward": 9.0, "kl": 0.0}, tmp_path / "run" / "models",
                   source="tiny")
    return notebook, fixed, tmp_path


def test_manifest_records_grid_fixed_parameters_and_every_point(sweep_setup):
    """Two points that complete: the manifest holds the grid, the fixed parameters, and per point its parameters,
    status, executed copy, error, seconds and the one row it saved; collect shows those two rows, not the stale
    one, best reward first, with the table's usual columns."""
    from dpolab.cli.sweep import collect, run_sweep

    notebook, fixed, tmp = sweep_setup
    manifest = run_sweep(notebook, {"x": [1, 3]}, parameters=fixed, out_dir=tmp / "sweep", progress=False)
    saved = json.loads((tmp / "sweep" / "manifest.json").read_text())
    assert saved["format"] == "dpolab.sweep/1" and saved["grid"] == {"x": [1, 3]} and saved["fixed"] == fixed
    assert [p["parameters"] for p in saved["points"]] == [{"x": 1}, {"x": 3}]
    for p, x in zip(saved["points"], (1, 3)):
        assert p["status"] == "completed" and p["error"] is None and p["seconds"] > 0
        assert p["output"].endswith(f"tiny__x={x}.ipynb") and (tmp / "sweep" / f"tiny__x={x}.ipynb").is_file()
        assert [r["path"].rsplit("/", 1)[-1] for r in p["rows"]] == [f"tiny__p{x}.json"]
    assert manifest.path == tmp / "sweep" / "manifest.json" and ran(tmp / "log") == [1, 3]
    table = collect(tmp / "sweep")
    assert table["policy"].tolist() == ["p3", "p1"]  # the stale row (reward 9) of the same folder is not there
    assert table.columns.tolist() == ["policy", "method", "beta", "reward", "kl", "source"]


def test_continue_on_error_records_the_failure_and_runs_the_rest(sweep_setup):
    from dpolab.cli.sweep import collect, run_sweep

    notebook, fixed, tmp = sweep_setup
    (tmp / "flag").touch()
    manifest = run_sweep(notebook, {"x": [1, 2, 3]}, parameters=fixed, out_dir=tmp / "sweep", progress=False,
                         continue_on_error=True)
    assert [p.status for p in manifest.points] == ["completed", "failed", "completed"]
    failed = manifest.points[1]
    assert "RuntimeError: point 2 fails on purpose" in failed.error and failed.seconds > 0
    assert (tmp / "sweep" / "tiny__x=2.ipynb").is_file()  # the executed copy shows the failing cell
    table = collect(tmp / "sweep")
    assert table["policy"].tolist()[:2] == ["p3", "p1"] and table["status"].tolist() == ["completed"] * 2 + ["failed"]
    assert table.loc[2, "x"] == 2 and "fails on purpose" in table.loc[2, "error"]


def test_without_continue_on_error_the_sweep_stops_at_the_failure(sweep_setup):
    papermill = pytest.importorskip("papermill")
    from dpolab.cli.sweep import run_sweep
    from dpolab.cli.sweep_manifest import Manifest

    notebook, fixed, tmp = sweep_setup
    (tmp / "flag").touch()
    with pytest.raises(papermill.PapermillExecutionError, match="fails on purpose"):
        run_sweep(notebook, {"x": [1, 2, 3]}, parameters=fixed, out_dir=tmp / "sweep", progress=False)
    points = Manifest.load(tmp / "sweep").points
    assert [p.status for p in points] == ["completed", "failed", "pending"] and ran(tmp / "log") == [1, 2]


def test_resume_skips_completed_points(sweep_setup):
    """After a sweep whose point 2 failed, --resume runs point 2 only (and a point the grid gained); a sweep with
    other fixed parameters is refused."""
    from dpolab.cli.sweep import collect, run_sweep

    notebook, fixed, tmp = sweep_setup
    (tmp / "flag").touch()
    run_sweep(notebook, {"x": [1, 2, 3]}, parameters=fixed, out_dir=tmp / "sweep", progress=False,
              continue_on_error=True)
    (tmp / "flag").unlink()
    manifest = run_sweep(notebook, {"x": [1, 2, 3, 4]}, parameters=fixed, out_dir=tmp / "sweep", progress=False,
                         resume=True)
    assert ran(tmp / "log") == [1, 2, 3, 2, 4]
    assert [p.status for p in manifest.points] == ["completed"] * 4
    assert collect(tmp / "sweep")["policy"].tolist() == ["p4", "p3", "p2", "p1"]
    with pytest.raises(ValueError, match="records another sweep.*fixed"):
        run_sweep(notebook, {"x": [1]}, parameters={**fixed, "log": str(tmp / "other")}, out_dir=tmp / "sweep",
                  resume=True)


def test_a_new_sweep_in_the_same_folder_collects_only_its_own_rows(sweep_setup):
    from dpolab.cli.sweep import collect, run_sweep

    notebook, fixed, tmp = sweep_setup
    run_sweep(notebook, {"x": [1, 3]}, parameters=fixed, out_dir=tmp / "sweep", progress=False)
    run_sweep(notebook, {"x": [4]}, parameters=fixed, out_dir=tmp / "sweep", progress=False)
    assert collect(tmp / "sweep")["policy"].tolist() == ["p4"]  # p1, p3 stay on disk but are the earlier sweep's


def test_jobs_run_points_in_parallel_processes(sweep_setup):
    """Three points on two worker processes, one failing: the same manifest as a sweep in turn would write."""
    from dpolab.cli.sweep import collect, run_sweep

    notebook, fixed, tmp = sweep_setup
    (tmp / "flag").touch()
    manifest = run_sweep(notebook, {"x": [1, 2, 3]}, parameters=fixed, out_dir=tmp / "sweep", jobs=2,
                         continue_on_error=True)
    assert [p.status for p in manifest.points] == ["completed", "failed", "completed"]
    assert sorted(ran(tmp / "log")) == [1, 2, 3]
    assert collect(tmp / "sweep")["policy"].tolist()[:2] == ["p3", "p1"]


def test_cli_sweep_exit_code_and_output(sweep_setup, capsys):
    """``dpolab sweep --continue-on-error``: every point listed with its status, the table, the manifest; exit 1
    when a point failed."""
    from dpolab.cli import main

    notebook, fixed, tmp = sweep_setup
    (tmp / "flag").touch()
    argv = ["sweep", str(notebook), "--grid", "x=2,3", "--out", str(tmp / "sweep"), "--continue-on-error"]
    for key, value in fixed.items():
        argv += ["-p", key, value]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "failed: " in out and "RuntimeError: point 2 fails on purpose" in out and "completed: " in out
    assert "p3" in out and "stale" not in out and f"manifest: {tmp / 'sweep' / 'manifest.json'}" in out


def test_collect_needs_a_manifest(tmp_path):
    from dpolab.cli.sweep import collect

    with pytest.raises(FileNotFoundError, match="no sweep manifest"):
        collect(tmp_path)
