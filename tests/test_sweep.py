"""The sweep command's grid handling, checked without executing notebooks."""

import pytest

from dpolab.sweep import grid_points, parse_grid, run_name


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
    from dpolab.sweep import run_sweep

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
