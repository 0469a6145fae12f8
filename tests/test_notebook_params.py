"""Each notebook's parameter check (dpolab.cli.notebook_params.check), run on the notebook's real cells without executing
the rest: the ``parameters`` cell, the cell papermill injects for ``-p``/``-y`` (built by papermill itself, with
the values its command line would parse), then the check cell, in one namespace with IPython's input history as a
kernel keeps it. A string for a list, a negative β (or another out-of-range value) and a misspelt name must each
stop the notebook at its first cell, with a message naming the parameter, the value, and the form that works."""

import json
from pathlib import Path

import pytest
from papermill.cli import _resolve_type
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from dpolab.cli.notebook_params import ParameterError, check

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(path: Path, cli: dict[str, str] | None = None, yaml: dict | None = None) -> list[str]:
    """Sources of the parameters cell, papermill's injected cell (when given parameters) and the check cell."""
    nb = load_notebook_node(str(path))  # as papermill reads it (every cell gets a tags list)
    parameters = {name: _resolve_type(text) for name, text in (cli or {}).items()}  # what `-p name text` passes
    parameters.update(yaml or {})  # what `-y "name: value"` passes
    if parameters:
        nb = parameterize_notebook(nb, parameters, kernel_name="python3", language="python")
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cells = [nb.cells[index]]
    if parameters:
        assert "injected-parameters" in nb.cells[index + 1].metadata.tags
        cells.append(nb.cells[index + 1])
    cells.append(nb.cells[len(cells) + index])
    return [c.source for c in cells]


def _run(sources: list[str]) -> dict:
    """Execute the cells in order in one namespace, keeping IPython's input history (``In``) as a kernel does."""
    namespace = {"In": [""]}
    for source in sources:
        namespace["In"].append(source)
        exec(compile(source, "<cell>", "exec"), namespace)  # noqa: S102 (the notebooks' own cells)
    return namespace


def _parameters(path: Path) -> dict:
    namespace: dict = {}
    exec(compile(_cells(path)[0], "<parameters>", "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in namespace["__annotations__"]}


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ParameterError) as info:
        _run(_cells(path, **kwargs))
    return str(info.value)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_check_cell_follows_the_parameters_cell_and_passes_the_defaults(path):
    nb = json.loads(path.read_text())
    index = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "notebook_params import check" in "".join(nb["cells"][index + 1]["source"])
    namespace = _run(_cells(path))
    assert namespace["__annotations__"].keys() == _parameters(path).keys()
    _run(_cells(path, yaml={"seed": 1}))  # a good injected value passes too


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if any(isinstance(v, list) for v in _parameters(p).values())],
                         ids=lambda p: p.stem)
def test_a_list_given_as_a_string_is_refused_with_the_yaml_form(path):
    name, default = next((k, v) for k, v in _parameters(path).items() if isinstance(v, list))
    text = json.dumps(default)  # e.g. -p betas "[0.1, 1.0, 10.0]": papermill's -p hands the notebook a string
    message = _error(path, cli={name: text})
    assert f"{name}: received the string {text!r}" in message
    assert f"-y '{name}: {text}'" in message or f'-y "{name}: {text}"' in message
    _run(_cells(path, yaml={name: default}))  # the -y form that the message gives works


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_negative_beta_or_count_is_refused(path):
    params = _parameters(path)
    name = "beta" if "beta" in params else next(k for k in ("n_prompts", "num_prompts") if k in params)
    message = _error(path, cli={name: "-0.5" if name == "beta" else "0"})
    expected = "> 0" if name == "beta" else ">= 1"
    assert f"{name}: received {_resolve_type('-0.5' if name == 'beta' else '0')!r}, expected a value {expected}" \
        in message
    assert f"-p {name} {params[name]}" in message  # the default as the example that works


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_an_unknown_parameter_is_an_error_not_a_warning(path):
    params = _parameters(path)
    misspelt = "bta" if "beta" in params else "sed"
    message = _error(path, cli={misspelt: "0.5"})
    right = "beta" if misspelt == "bta" else "seed"
    assert f"{misspelt}: received 0.5, but this notebook has no parameter {misspelt!r}" in message
    assert f"did you mean {right}? pass -p {right} 0.5" in message


def test_every_problem_is_reported_at_once():
    path = next(p for p in NOTEBOOKS if p.stem == "06_loss_family")
    message = _error(path, cli={"betas": "[0.3, 3.0]", "beta": "-1", "bta": "0.5", "loss": "sigmod",
                                "num_pairs": "2.5", "noise_rate": "1.5"})
    for line in ["betas: received the string '[0.3, 3.0]'", '-y "betas: [0.3, 3.0]"', "beta: received -1",
                 "bta: received 0.5", "loss: received 'sigmod'", "did you mean sigmoid?",
                 "num_pairs: received 2.5 (float), expected int", "noise_rate: received 1.5, expected a value in [0, 1]"]:
        assert line in message, line


def test_types_ranges_choices_and_models_by_hand():
    history = ["", 'n: int = 2\nx: float = 0.5\nname: str = "a"\nflag: bool = False\nwords: list = ["a"]\n'
               'model: str = "tiny-llama"\n']

    def problems(**values):
        namespace = {"__annotations__": {"n": int, "x": float, "name": str, "flag": bool, "words": list,
                                         "model": str},
                     "n": 2, "x": 0.5, "name": "a", "flag": False, "words": ["a"], "model": "tiny-llama",
                     "In": history + ["# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())]}
        namespace.update(values)
        try:
            check(namespace, counts=["n"], positive=["x"], choices={"name": ["a", "b"]}, models=["model"])
        except ParameterError as err:
            return str(err)
        return ""

    assert problems() == "" and problems(x=3, n=5, flag=True, model="HuggingFaceTB/SmolLM2-135M-Instruct") == ""
    assert "x: received True (bool), expected float" in problems(x=True)  # a bool is not a number
    assert "name: received 5 (int), expected str (papermill's -p reads 5 as a int)" in problems(name=5)
    assert "-y 'name: \"5\"'" in problems(name=5)
    assert "flag: received the string 'yes', expected bool; pass -p flag True" in problems(flag="yes")
    assert "words: received [1, 2], expected a list of str" in problems(words=[1, 2])
    assert "name: received 'c', expected one of a, b" in problems(name="c")
    assert "did you mean tiny-llama?" in problems(model="tiny_llama")
    assert "model: received './no/such/folder'" in problems(model="./no/such/folder")
    assert "n: received 0, expected a value >= 1; pass e.g. -p n 2" in problems(n=0)
    assert problems(x=float("nan")).startswith("this notebook cannot run")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_full_scale_overrides_and_the_smoke_models_pass(path):
    """What dpolab notebooks --full passes (the .full.yaml beside each notebook, read as papermill's -f reads it),
    and the tiny model of the smoke tests, are accepted."""
    import yaml

    _run(_cells(path, yaml=yaml.safe_load(path.with_suffix(".full.yaml").read_text())))
    if "model" in _parameters(path):
        _run(_cells(path, cli={"model": "tiny-llama"}))
