"""Typed loading of a config dataclass: its defaults, then a YAML file, then ``key=value`` overrides.

One loader serves every config of the kit (:class:`dpolab.train.config.TrainConfig`,
:class:`dpolab.experiments.sentiment.config.SentimentConfig`) and the same value parser serves the sweep
grids (:func:`dpolab.cli.sweep.parse_grid`), so a value reads the same way everywhere::

    config = load_config(TrainConfig, "configs/run.yaml", ["beta=0.5", "lr=1e-5", "loss_type=sigmoid,sft"])

- A value on the command line reads as it would in the YAML file (``beta=0.5`` is a float, ``progress=false``
  a bool, ``loss_type=[sigmoid, sft]`` a list), and ``1e-5`` is a number although YAML 1.1 reads it as text.
- A ``str`` field keeps the text as given (``output_dir=2024`` is the string ``"2024"``).
- A list or tuple field also takes ``a,b,c``; each item is checked against the item type.
- ``name.key=value`` sets one entry of a ``dict`` field (``loss_params.label_smoothing=0.1``).
- Each value is checked against the field's type annotation before the dataclass is built; a key that is not a
  field, or a value of the wrong type, raises :class:`ConfigError` naming the source (file or override) and the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key that does not exist, or a value of the wrong type or range."""


# Numbers that YAML 1.1 leaves as text because they lack a dot ("1e-5", "5E-5").
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_NULL = ("null", "Null", "NULL", "None", "~")


def parse_value(text: str) -> Any:
    """Text from the command line as a value: YAML's reading of it (numbers, true/false, null, ``[a, b]``,
    ``{k: v}``, else the text itself), plus ``1e-5``-style numbers and Python's ``None``."""
    stripped = text.strip()
    if not stripped:
        return text
    if stripped in _NULL:
        return None
    if _NUMBER.fullmatch(stripped):
        return float(stripped)
    try:
        return yaml.safe_load(stripped)
    except yaml.YAMLError:
        return text  # e.g. "a: b: c" is no YAML value; keep the text and let the type check speak


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"key=value"``; the value stays text and is parsed against the field's type later."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip(), value.strip()


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = (),
                help_command: str = "") -> T:
    """An instance of the dataclass ``cls``: its defaults, then the YAML file at ``path``, then ``overrides``
    (a dict, or ``"key=value"`` strings applied in order). ``help_command`` is named in the unknown-key error."""
    values: dict[str, Any] = {}
    if path is not None:
        for key, value in read_yaml(Path(path)).items():
            values[key] = coerce(cls, key, value, source=str(path), help_command=help_command)
    if isinstance(overrides, Mapping):
        items = [(k, v, f"override {k}={v!r}") for k, v in overrides.items()]
    else:
        items = [(*parse_override(text), f"override {text!r}") for text in overrides]
    hints = field_types(cls)
    for key, value, source in items:
        name, dot, entry = key.partition(".")
        if dot and hints.get(name) is dict:  # loss_params.NAME=VALUE
            parsed = parse_value(value) if isinstance(value, str) else value
            if not isinstance(parsed, (int, float, bool, str)):
                raise ConfigError(f"{source}: entry {entry!r} of field {name!r} must be a number, bool or string, "
                                  f"got {parsed!r}")
            values[name] = {**values.get(name, {}), entry: parsed}
        else:
            values[key] = coerce(cls, key, value, source, help_command=help_command)
    return cls(**values)


def field_types(cls: type) -> dict[str, Any]:
    """``{name: type annotation}`` of the dataclass ``cls``'s fields (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(cls: type, key: str, value: Any, source: str = "config", help_command: str = "") -> Any:
    """Check ``value`` against the type of field ``key`` of ``cls`` and return it as that type, or raise naming
    the source and the key. Text is parsed by :func:`parse_value` unless the field (or list item) is a ``str``."""
    hints = field_types(cls)
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        see = f"; see `{help_command}`" if help_command else ""
        raise ConfigError(f"{source}: {key!r} is not a {cls.__name__} field{hint}{see}")
    return _convert(hints[key], value, key, source)


def _convert(expected: Any, value: Any, key: str, source: str) -> Any:
    if isinstance(expected, types.UnionType) and type(None) in typing.get_args(expected):  # X | None
        if value is None or (isinstance(value, str) and value.strip() in _NULL):
            return None
        expected = next(a for a in typing.get_args(expected) if a is not type(None))
    origin = typing.get_origin(expected)
    if expected in (list, tuple) or origin in (list, tuple):
        return _convert_sequence(expected, value, key, source)
    text = value if isinstance(value, str) else None
    if text is not None and expected is not str:
        value = parse_value(text)
    if origin is Literal:
        if value in typing.get_args(expected):
            return value
    elif expected is str:
        if text is not None or isinstance(value, (int, float)) and not isinstance(value, bool):
            return text if text is not None else str(value)
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # "nan", "inf": refused by the range checks, not here
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{source}: field {key!r} expects {type_name(expected)}, got {type(value).__name__} {value!r}")


def _convert_sequence(expected: Any, value: Any, key: str, source: str) -> list | tuple:
    """A list or tuple field: a YAML list, ``a,b,c``, or one item; each item checked against the item type."""
    args = typing.get_args(expected)
    item_type = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else None
    if isinstance(value, str):
        parsed = parse_value(value)
        if not isinstance(parsed, (list, tuple)):  # a,b,c (or one item): each item is text, as a scalar field's value
            parsed = [v.strip() for v in value.split(",") if v.strip()]
            if item_type is None:
                parsed = [parse_value(v) for v in parsed]
        value = parsed
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):  # one item, as trl's str loss_type
        items = [value]
    else:
        raise ConfigError(f"{source}: field {key!r} expects {type_name(expected)}, got {type(value).__name__} "
                          f"{value!r}")
    if item_type is not None:
        try:
            items = [_convert(item_type, item, key, source) for item in items]
        except ConfigError:
            raise ConfigError(f"{source}: field {key!r} expects {type_name(expected)}, got {value!r}") from None
    container = typing.get_origin(expected) or expected
    return container(items)


def type_name(tp: Any) -> str:
    """A field type as the errors and ``--help`` show it: ``float``, ``'adamw' | 'rmsprop'``, ``tuple[float, ...]``."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp)
    return getattr(tp, "__name__", str(tp))


def field_docs(cls: type) -> dict[str, tuple[str, str, str]]:
    """``{name: (type, default, comment)}`` for every field of ``cls``, read from the string under each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    comments = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            comments[node.target.id] = " ".join(after.value.value.split())
    defaults = dataclasses.asdict(cls())
    return {name: (type_name(tp), repr(defaults[name]), comments.get(name, "")) for name, tp in field_types(cls).items()}


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line}; first given on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (line numbers in the error)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of config fields in the YAML file at ``path`` ({} for an empty file)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level, got {type(data).__name__}")
    return data
