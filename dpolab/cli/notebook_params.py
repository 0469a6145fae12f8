"""A notebook's papermill parameters, checked in the cell right after its ``parameters`` cell.

Papermill's command line has two ways to pass a value: ``-p name value`` reads the value as a bool, ``None``, an
int, a float or else *text*, so ``-p betas "[0.3, 3.0]"`` hands the notebook a string; ``-y "name: value"`` reads
YAML, so ``-y "betas: [0.3, 3.0]"`` hands it a list. A parameter the notebook does not have (``-p bta 0.5``) is
only warned about by papermill, and the run goes on with the default. Either slip otherwise surfaces cells later as
an unrelated error, or not at all. :func:`check` stops the notebook at its first cell instead, with one message per
problem that names the parameter, the value received, what was expected and the papermill form that works.

What is checked comes from the notebook itself: the types are the annotations of the ``parameters`` cell
(``name: type = value  # help``; ``list[float]`` gives the element type), the defaults and the injected names
are read from the kernel's input history (IPython's ``In``; papermill's injected cell starts with
``# Parameters``), and the ranges are named in the call::

    check(globals(), positive=["beta", "lr"], counts=["dpo_steps"], models=["model"])
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import numbers
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PAPERMILL_HEADER = "# Parameters"
"""The first line of the cell papermill injects (its cell is tagged ``injected-parameters``)."""


class ParameterError(ValueError):
    """One or more notebook parameters that the notebook cannot use; the message lists each."""


def check(namespace: Mapping[str, Any], *, positive: Iterable[str] = (), counts: Iterable[str] = (),
          non_negative: Iterable[str] = (), probabilities: Iterable[str] = (),
          choices: Mapping[str, Iterable[str]] | None = None, models: Iterable[str] = ()) -> None:
    """Raise :class:`ParameterError` when a parameter injected into the notebook is unknown or unusable.

    Args:
        namespace: the notebook's ``globals()`` after its ``parameters`` cell (and papermill's injected cell).
        positive: numbers (or lists of numbers) that must be > 0, such as ``beta``.
        counts: integers (or lists of integers) that must be >= 1.
        non_negative: numbers that must be >= 0 (seeds, optional step counts where 0 means none).
        probabilities: numbers in [0, 1].
        choices: parameter name -> the names it may take (loss names, strategies).
        models: parameters that name a model: the embedded default, a tiny test model, a local folder or a
            hub id ``owner/name``.
    """
    declared = dict(namespace.get("__annotations__") or {})
    history = list(namespace.get("_ih") or namespace.get("In") or [])
    defaults = parameters_cell_defaults(history, declared)
    problems = [_unknown(name, namespace.get(name), declared) for name in injected_names(history)
                if name not in declared]
    badly_typed = set()
    for name, annotation in declared.items():
        if name in namespace:
            problem = _type_problem(name, annotation, namespace[name], defaults.get(name))
            if problem:
                problems.append(problem)
                badly_typed.add(name)
    rules = [(positive, lambda v: v > 0, "> 0"), (counts, lambda v: v >= 1, ">= 1"),
             (non_negative, lambda v: v >= 0, ">= 0"), (probabilities, lambda v: 0 <= v <= 1, "in [0, 1]")]
    for names, holds, bound in rules:
        for name in names:
            if name in namespace and name not in badly_typed:
                problem = _range_problem(name, namespace[name], holds, bound, defaults.get(name))
                if problem:
                    problems.append(problem)
    for name, allowed in (choices or {}).items():
        allowed = sorted(allowed)
        if name in namespace and name not in badly_typed and namespace[name] not in allowed:
            close = difflib.get_close_matches(str(namespace[name]), allowed, n=1, cutoff=0.6)
            example = close[0] if close else defaults.get(name, allowed[0])
            problems.append(f"{name}: received {namespace[name]!r}, expected one of {', '.join(allowed)}; "
                            f"{'did you mean ' + close[0] + '? ' if close else ''}pass e.g. -p {name} {_p_text(example)}")
    for name in models:
        if name in namespace and name not in badly_typed:
            problem = _model_problem(name, namespace[name])
            if problem:
                problems.append(problem)
    if problems:
        raise ParameterError("this notebook cannot run with these parameters:\n  " + "\n  ".join(problems)
                             + "\n(papermill: -p NAME VALUE passes a number, True/False/None or text; "
                               "-y \"NAME: VALUE\" passes YAML, for lists)")


def injected_names(history: Iterable[str]) -> list[str]:
    """Names assigned in papermill's injected cells among the executed ``history`` (cells starting
    ``# Parameters``), in order of first assignment."""
    names: list[str] = []
    for source in history:
        if isinstance(source, str) and source.lstrip().startswith(PAPERMILL_HEADER):
            for name in _assigned(source):
                if name not in names:
                    names.append(name)
    return names


def parameters_cell_defaults(history: Iterable[str], declared: Iterable[str]) -> dict[str, Any]:
    """The defaults of the last executed cell in ``history`` that annotates ``declared`` names with literals."""
    declared = set(declared)
    for source in reversed(list(history)):
        if not isinstance(source, str):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        found = {}
        for node in tree.body:
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
                    and node.target.id in declared):
                try:
                    found[node.target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
        if found:
            return found
    return {}


def _assigned(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)]


def _unknown(name: str, value: Any, declared: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(declared), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? pass -p {close[0]} {_p_text(value)}" if close else "drop it"
    return (f"{name}: received {value!r}, but this notebook has no parameter {name!r} (papermill only warns, and the "
            f"run would ignore it); {hint}. Its parameters: {', '.join(declared)}")


def _expected(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else str(annotation)


def _element_type(annotation: Any, default: Any) -> type | None:
    """The element type of a list parameter: from ``list[float]``, else from the default's elements."""
    args = typing.get_args(annotation)
    if args:
        return args[0]
    if isinstance(default, list) and default:
        kinds = {type(v) for v in default}
        if kinds == {int}:
            return int
        if kinds <= {int, float}:
            return float
        if kinds == {str}:
            return str
    return None


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` is usable as ``kind`` (an int passes for a float; a bool never passes for a number)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # an annotation this module does not know: papermill's own rules apply


def _type_problem(name: str, annotation: Any, value: Any, default: Any) -> str | None:
    origin = typing.get_origin(annotation) or annotation
    if origin is list:
        element = _element_type(annotation, default)
        expected = f"a list of {element.__name__}" if element else "a list"
        if isinstance(value, str):
            suggestion = _as_list(value, element)
            example = suggestion if suggestion is not None else default if isinstance(default, list) else []
            return (f"{name}: received the string {value!r}, expected {expected} (papermill's -p passes a list as "
                    f"text); pass it with -y: {_y_form(name, example)}")
        if not isinstance(value, (list, tuple)) or (element and not all(_fits(v, element) for v in value)):
            example = default if isinstance(default, list) else []
            return f"{name}: received {value!r}, expected {expected}; pass e.g. {_y_form(name, example)}"
        return None
    if _fits(value, origin):
        return None
    expected = _expected(annotation)
    if origin is str and value is not None:  # -p read the text as a number or a bool
        return (f"{name}: received {value!r} ({type(value).__name__}), expected str (papermill's -p reads "
                f"{value!r} as a {type(value).__name__}); pass it as text with -y: {_y_form(name, str(value))}")
    if origin is bool and isinstance(value, str):
        return f"{name}: received the string {value!r}, expected bool; pass -p {name} True or -p {name} False"
    if origin in (int, float) and isinstance(value, str):
        return f"{name}: received the string {value!r}, expected {expected}; pass a number, e.g. -p {name} " \
               f"{_p_text(default if default is not None else 1)}"
    example = default if _fits(default, origin) else None
    form = f"-p {name} {_p_text(example)}" if example is not None and origin is not str else _y_form(name, example)
    return f"{name}: received {value!r} ({type(value).__name__}), expected {expected}; pass e.g. {form}"


def _range_problem(name: str, value: Any, holds, bound: str, default: Any) -> str | None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not values:
        return f"{name}: received an empty list, expected at least one value {bound}; pass e.g. " \
               f"{_y_form(name, default if isinstance(default, list) and default else [1])}"
    bad = [v for v in values if isinstance(v, numbers.Real) and not holds(v)]
    if not bad:
        return None
    if isinstance(value, (list, tuple)):
        example = default if isinstance(default, list) and default else [v for v in values if holds(v)] or [1]
        return (f"{name}: received {value!r}, expected every value {bound} ({', '.join(map(repr, bad))} is not); "
                f"pass e.g. {_y_form(name, example)}")
    example = default if isinstance(default, numbers.Real) and holds(default) else 1
    return f"{name}: received {value!r}, expected a value {bound}; pass e.g. -p {name} {_p_text(example)}"


def _model_problem(name: str, value: Any) -> str | None:
    from dpolab.data.cache import REPO_ROOT
    from dpolab.models import DEFAULT_MODEL, TINY_MODELS, looks_local

    known = [DEFAULT_MODEL, *TINY_MODELS]
    if value in known:
        return None
    path = Path(value).expanduser()
    if value and (path.exists() or (not path.is_absolute() and (REPO_ROOT / path).exists())):
        return None
    if value and not looks_local(value) and value.count("/") == 1 and all(value.split("/")):
        return None  # a hub id owner/name: whether it loads is the loader's question (network or local cache)
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6) if value else []
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"{name}: received {value!r}, expected a known model name ({', '.join(known)}), an existing local folder, "
            f"or a Hugging Face hub id owner/name (for example HuggingFaceTB/SmolLM2-135M-Instruct); {hint}pass e.g. "
            f"-p {name} {close[0] if close else DEFAULT_MODEL}")


def _as_list(text: str, element: type | None) -> list | None:
    """The list a string like ``"[0.3, 3.0]"`` or ``"0.3,3.0"`` was meant to be, when its elements fit."""
    import yaml

    for candidate in (text, f"[{text}]"):
        try:
            parsed = yaml.safe_load(candidate)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, list) and parsed and (element is None or all(_fits(v, element) for v in parsed)):
            return parsed
    return None


def _p_text(value: Any) -> str:
    """``value`` as papermill's ``-p`` reads it back."""
    return str(value) if isinstance(value, (bool, numbers.Real)) or value is None else _shell_quote(str(value))


def _y_form(name: str, value: Any) -> str:
    """``-y "name: value"`` with the value as YAML flow text (JSON is YAML), quoted for a POSIX shell."""
    return f"-y {_shell_quote(f'{name}: {json.dumps(value, ensure_ascii=False)}')}"


def _shell_quote(text: str) -> str:
    if text and all(c.isalnum() or c in "-_./:" for c in text):
        return text
    return f'"{text}"' if '"' not in text and "$" not in text and "`" not in text else "'" + text.replace(
        "'", "'\"'\"'") + "'"
