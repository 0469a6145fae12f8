"""Structure of the numbered notebooks: what papermill and nbval rely on, checked without executing them."""

import ast
import json
from pathlib import Path

import pytest
import yaml

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_derivation", "02_training", "03_beta_sweep", "04_multi_turn", "05_ranking", "06_loss_family",
            "07_on_policy_loop"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def parameters_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_all_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_kernel_outputs_and_single_parameters_cell(path):
    nb = load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3", f"{path.name}: kernel must be python3"
    stored = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or
                                                                                   c.get("execution_count"))]
    assert not stored, f"{path.name}: cells {stored} have stored outputs; strip them before committing"
    assert len(parameters_cells(nb)) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_typed_literals_with_a_comment(path):
    source = "".join(parameters_cells(load(path))[0]["source"])
    tree = ast.parse(source)
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name), (
            f"{path.name}: parameters cell line {node.lineno} is not `name: type = value`")
        ast.literal_eval(node.value)  # raises when the default is not a literal
        line = source.splitlines()[node.lineno - 1]
        assert "#" in line, f"{path.name}: parameter {node.target.id!r} has no help comment"


def parameter_names(path: Path) -> set[str]:
    tree = ast.parse("".join(parameters_cells(load(path))[0]["source"]))
    return {node.target.id for node in tree.body}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_full_yaml_keys_are_parameters(path):
    """papermill only warns on unknown names, so a typo in an override file would silently do nothing."""
    yaml_path = path.with_suffix(".full.yaml")
    assert yaml_path.is_file(), f"{path.name}: missing full-scale overrides {yaml_path.name}"
    overrides = yaml.safe_load(yaml_path.read_text()) or {}
    unknown = set(overrides) - parameter_names(path)
    assert not unknown, f"{yaml_path.name}: keys {sorted(unknown)} are not parameters of {path.name}"


def test_papermill_sees_the_same_parameters():
    papermill = pytest.importorskip("papermill")
    for path in NOTEBOOKS:
        assert set(papermill.inspect_notebook(str(path))) == parameter_names(path), path.name


@pytest.mark.parametrize("stem, data", [("02_training", True), ("03_beta_sweep", True), ("04_multi_turn", True),
                                        ("05_ranking", False)])
def test_notebooks_take_a_model_and_data_as_parameters(stem, data):
    """Any model (the embedded default unless set), and preference data where the notebook trains (empty: its own)."""
    from dpolab.models import DEFAULT_MODEL

    defaults = {node.target.id: ast.literal_eval(node.value) for node in ast.parse("".join(parameters_cells(
        load(NOTEBOOKS[EXPECTED.index(stem)]))[0]["source"])).body}
    assert defaults["model"] == DEFAULT_MODEL
    if data:
        assert defaults["train_data"] == "" and defaults["eval_data"] == ""
