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


def test_grid_values_read_as_override_values():
    """Grid values go through dpolab.overrides.parse_value, as the train and reproduce overrides do: YAML's reading,
    plus 1e-5-style numbers (text in YAML 1.1) and Python's None."""
    assert parse_grid(["lr=1e-5,5E-5", "baselines=true,False", "ld_alpha=None,null", "name='0.1',x"]) == {
        "lr": [1e-5, 5e-5], "baselines": [True, False], "ld_alpha": [None, None], "name": ["0.1", "x"]}


def test_collect_tabulates_saved_rows_best_reward_first(tmp_path):
    from dpolab.results import save_model_row
    from dpolab.sweep import collect

    save_model_row({"policy": "a", "method": "DPO", "beta": 0.1, "reward": 0.1, "kl": 1.0, "prompts": ["x"],
                    "prompt_rewards": [0.1]}, tmp_path, source="s")
    save_model_row({"policy": "b", "method": "Best of N", "reward": 0.3, "kl": 0.2}, tmp_path)
    table = collect(tmp_path)
    assert table["policy"].tolist() == ["b", "a"] and table.columns.tolist() == ["policy", "method", "beta", "reward",
                                                                                "kl", "source"]
    assert collect(tmp_path / "none").empty
