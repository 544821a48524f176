"""Strict dataclass <-> dict conversion, dotted CLI overrides and field docstrings.

Dataclasses are the single source of truth for every config schema: YAML only holds values.
``from_dict`` rejects unknown keys (with a did-you-mean), checks types, and collects every
problem into one :class:`~layerfreeze.errors.ConfigError`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, TypeVar

import yaml

from layerfreeze.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override_value",
    "field_docs",
    "suggest",
    "describe_fields",
]


def suggest(name: str, candidates: typing.Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or a list of valid names."""
    candidates = sorted(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys: {', '.join(candidates)}." if candidates else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to annotation ``tp``; append a problem and return the raw value on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors: list[str] = []
        for a in non_none:
            sub: list[str] = []
            out = _convert(value, a, path, sub)
            if not sub:
                return out
            errors.extend(sub)
        problems.append(errors[0] if len(non_none) == 1 else
                        f"{path}: expected {' or '.join(_type_name(a) for a in non_none)}, got {value!r}.")
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping (section), got {value!r}.")
            return value
        return _from_dict(tp, value, path, problems)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}.")
            return value
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}.")
            return value
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{path}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        problems.append(f"{path}: expected a number, got {value!r}.")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}.")
        return value
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type[T], data: dict, path: str, problems: list[str]) -> T:
    """Build one (nested) section. Its problems go to ``problems``; a problem in one section
    never stops sibling sections from being checked, so every problem is reported at once."""
    own: list[str] = []
    out = _from_dict_section(cls, data, path, own)
    problems.extend(own)
    return out


def _from_dict_section(cls: type[T], data: dict, path: str, problems: list[str]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            problems.append(f"{prefix}{key}: unknown key.{suggest(str(key), fields)}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}", problems)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    for n in missing:
        problems.append(f"{prefix}{n}: required key is missing.")
    if problems:
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # a section's own message ("model: set exactly one of ...") is not prefixed twice
        problems.extend(
            p if not prefix or p.startswith((prefix, f"{path}:")) else f"{prefix}{p}"
            for p in e.problems
        )
    except (ValueError, TypeError) as e:
        problems.append(f"{path or cls.__name__}: {e}")
    return None  # type: ignore[return-value]


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly.

    Nested dataclass fields accept mappings. ``__post_init__`` may raise :class:`ConfigError`
    (its problems are prefixed with ``path``) or ``ValueError``.

    Raises:
        ConfigError: every unknown key, type mismatch and validation failure at once.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}.")
    out = _from_dict(cls, data, path, problems)
    if problems:
        raise ConfigError(problems)
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict/list/scalars suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as a YAML scalar/flow value."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: typing.Iterable[str], schema: type | None = None) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (in place) and return it.

    When ``schema`` (a dataclass) is given, each path is checked against it so a typo fails
    with a suggestion before any value is used.

    Raises:
        ConfigError: malformed override or unknown key path.
    """
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key.sub=value, e.g. train.lr=1e-4.")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {item!r}: empty key segment in {key!r}.")
            continue
        if schema is not None:
            err = _check_path(schema, parts)
            if err:
                problems.append(f"override {key}: {err}")
                continue
        node = data
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            elif not isinstance(node[p], dict):  # never replace a value the user set silently
                where = ".".join(parts[: i + 1])
                problems.append(
                    f"override {key}: {where} is {node[p]!r}, not a mapping, so it has no key "
                    f"{parts[i + 1]!r}. Set {where} as a whole ({where}=...) instead."
                )
                break
            node = node[p]
        else:
            node[parts[-1]] = parse_override_value(raw)
    if problems:
        raise ConfigError(problems)
    return data


def _check_path(schema: type, parts: list[str]) -> str | None:
    cls: Any = schema
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            # Free-form mapping (e.g. an opaque engine config): anything goes below here.
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        if p not in names:
            done = ".".join(parts[:i])
            where = f"'{done}'" if done else "the top level"
            return f"unknown key '{p}' in {where}.{suggest(p, names)}"
        tp = _hints(cls)[p]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            dcs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            tp = dcs[0] if dcs else tp
        cls = tp
    return None


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written as a string literal right under each dataclass field (litgpt style)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    src = inspect.cleandoc("\n" + src) if src.startswith((" ", "\t")) else src
    tree = ast.parse(src)
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(getattr(node, "value", None), ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flatten a dataclass schema to ``(path, type, default, doc)`` rows (for ``validate``/--help)."""
    rows: list[tuple[str, str, Any, str]] = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((path, "section", None, docs.get(f.name, "")))
            rows.extend(describe_fields(tp, prefix=f"{path}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        rows.append((path, _type_name(tp), default, docs.get(f.name, "")))
    return rows

