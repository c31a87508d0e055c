"""The machinery every typed config of spannorm is built with, and the one ``KEY=VALUE`` override parser.

A config is a dataclass whose field annotations say what is allowed: ``int``, ``float``, ``bool``, ``str``,
``Literal[...]`` for an enumerated field, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[K, V]`` and
nested config dataclasses. :func:`build` turns a plain mapping (YAML, JSON, or command-line strings) into
such a dataclass: it refuses unknown keys, coerces every value to its field's type, checks every
``Literal`` field against its allowed values and every float for finiteness (inf and NaN are refused), then
constructs the dataclass, whose own ``validate`` checks only what annotations cannot say (ranges, relations
between fields). :func:`check_fields` applies the same annotation checks to a dataclass built directly in
Python, so ``ModelConfig(placement="x")`` and ``--model.placement=x`` fail with the same message.

Every failure is a :class:`ConfigError` with one line that names the field, the value and what is allowed.
This module is the bottom layer: it imports nothing else from spannorm.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and what is allowed."""


MAX_SEED = 2**63 - 1
"""Every seed (``train.seed``, ``--seed``) is an integer from 0 to this: a signed 64-bit integer, which torch's
generators and the checkpoint's JSON state hold exactly (also after the small offsets added per rank or
prompt)."""


def fail(path: str, value: Any, allowed: str) -> NoReturn:
    """Raise the one-line :class:`ConfigError` ``"{path}={value!r} is invalid: {allowed}"``."""
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def as_flags(err: ConfigError, flags: Mapping[str, str]) -> ConfigError:
    """``err`` with its leading field named as the command-line flag that set it (``weight_decay=inf is
    invalid`` becomes ``--weight-decay=inf is invalid``), for settings built from a command's options; a
    message about another field comes back as it was."""
    text = str(err)
    name, sep, rest = text.partition("=")
    return ConfigError(f"{flags[name]}={rest}") if sep and name in flags else err


def unknown_key(path: str, name: str, known: Sequence[str]) -> NoReturn:
    """Raise the :class:`ConfigError` for a key ``name`` under ``path`` that is not one of ``known``."""
    where = f"{path}.{name}" if path else name
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where} is not a known config key{hint}; allowed: {', '.join(sorted(known))}")


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls`` (cached per class)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~"))


def _check_literal(path: str, value: Any, tp: Any) -> Any:
    """``value`` if it is one of the (string) values ``Literal`` type ``tp`` allows; else a ConfigError."""
    allowed = typing.get_args(tp)
    if isinstance(value, str) and value in allowed:
        return value
    fail(path, value, f"allowed: {', '.join(str(a) for a in allowed)}")


def _finite_float(path: str, value: Any, number: float) -> float:
    if not math.isfinite(number):
        fail(path, value, "must be a finite number")
    return number


def yaml_value(path: str, text: str) -> Any:
    """``text`` read as one YAML value (``{0: post}``, ``[1, 2]``, ``null``), or a ConfigError naming ``path``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        fail(path, text, "must be a YAML value")


def coerce(path: str, value: Any, tp: Any) -> Any:  # noqa: C901 (one branch per kind of annotation)
    """``value`` (from YAML, JSON or a command-line string) as type ``tp``, or a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if _is_null(value):
            return None
        if len(args) == 1:
            return coerce(path, value, args[0])
        raise ConfigError(f"{path}: unsupported config type {tp}")
    if origin is Literal:
        return _check_literal(path, value, tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = yaml_value(path, value)
        return build(tp, value if value is not None else {}, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        fail(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, bool):
            fail(path, value, "must be an integer")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            fail(path, value, "must be an integer")
        if not math.isfinite(number) or number != int(number):
            fail(path, value, "must be an integer")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            fail(path, value, "must be a number")
        if isinstance(value, (int, float)):
            return _finite_float(path, value, float(value))
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            fail(path, value, "must be a number")
        return _finite_float(path, value, number)
    if tp is str:
        if isinstance(value, (dict, list)):
            fail(path, value, "must be a string")
        return str(value)
    if origin is dict:
        if isinstance(value, str):
            value = yaml_value(path, value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            fail(path, value, "must be a mapping")
        key_tp, value_tp = typing.get_args(tp)
        return {coerce(f"{path}[{k}]", k, key_tp): coerce(f"{path}[{k}]", v, value_tp) for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml_value(path, value)
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            fail(path, value, "must be a list")
        item_args = typing.get_args(tp)
        item_tp = item_args[0] if item_args else Any
        items = [coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Dataclass ``cls`` from a mapping (after ``cls.prepare_mapping(data, path)`` where the class has one): unknown
    keys refused, each value coerced to its field's type (see :func:`coerce`), then constructed, and validated
    with ``validate(path)`` when the class has one. Missing keys keep their defaults."""
    if isinstance(data, cls):
        return data
    prepare = getattr(cls, "prepare_mapping", None)  # a class that reads older spellings of its mapping
    if prepare is not None:
        data = prepare(data, path)
    if not isinstance(data, Mapping):
        fail(path or "config", data, f"must be a mapping of {cls.__name__} fields")
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            unknown_key(path, str(key), list(hints))
        kwargs[key] = coerce(_join(path, str(key)), value, hints[key])
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.init and f.name not in kwargs:
            raise ConfigError(f"{path or cls.__name__} is missing {f.name!r}; allowed keys: {', '.join(hints)}")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass validator tripping over an odd type
        raise ConfigError(f"{path or cls.__name__} is invalid: {err}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path) if path else validate()
    return obj


def check_fields(obj: Any, path: str = "") -> None:
    """The annotation checks of :func:`build` on a dataclass built directly: every ``Literal`` field (and
    ``dict`` values typed ``Literal``) holds an allowed value, and every float is finite."""
    for name, tp in field_types(type(obj)).items():
        _check_value(_join(path, name), getattr(obj, name), tp)


def _check_value(path: str, value: Any, tp: Any) -> None:
    if value is None:
        return
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            _check_value(path, value, inner[0])
        return
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check_literal(path, value, tp)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _finite_float(path, value, value)
    elif origin is dict and isinstance(value, dict):
        value_tp = typing.get_args(tp)[1]
        for key, item in value.items():
            _check_value(f"{path}[{key}]", item, value_tp)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if args:
            for i, item in enumerate(value):
                _check_value(f"{path}[{i}]", item, args[0])


# ---------------------------------------------------------------------- KEY=VALUE overrides
def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``"model.n_layers=24"`` (a leading ``--`` is allowed) into (["model", "n_layers"], "24").

    Every command that takes ``KEY=VALUE`` settings (train, check, profile, bench, sweep plans) parses them
    here; the value stays a string until :func:`build` coerces it to its field's type."""
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        why = ("it has no '='" if not sep else "the key is empty" if not key.strip()
               else f"the key {key.strip()!r} has an empty part")
        raise ConfigError(f"override {text!r} is invalid: {why}; write KEY=VALUE, the KEY dotted into sections, "
                          "e.g. model.n_layers=24")
    return parts, value


def _field_path(text: str, parts: list[str], root: type, path: str) -> list[tuple[str, Any]]:
    """The (name, annotation) of every key of ``parts`` walked down from dataclass ``root``; unknown keys and
    keys that walk into a value fail with a message naming the override."""
    steps: list[tuple[str, Any]] = []
    cls: Any = root
    for depth, name in enumerate(parts):
        if cls is None:
            where = ".".join([path, *parts[:depth]] if path else parts[:depth])
            raise ConfigError(f"override {text!r} is invalid: {where} is a value, not a section")
        hints = field_types(cls)
        if name not in hints:
            unknown_key(".".join([path, *parts[:depth]] if path else parts[:depth]), name, list(hints))
        tp = hints[name]
        steps.append((name, tp))
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        cls = inner[0] if inner else (tp if dataclasses.is_dataclass(tp) else None)
    if dataclasses.is_dataclass(steps[-1][1]):  # a required section, not a value
        where = ".".join([path, *parts] if path else parts)
        raise ConfigError(f"override {text!r} is invalid: name a field, e.g. {where}.FIELD=value")
    return steps


def _strip_root(parts: list[str], path: str) -> list[str]:
    """``model.norm`` and ``norm`` both name ModelConfig's ``norm`` when the settings are for ``model``."""
    return parts[1:] if path and len(parts) > 1 and parts[0] == path else parts


def _override_steps(text: str, root: type, path: str) -> tuple[list[str], str, list[tuple[str, Any]]]:
    """One ``KEY=VALUE`` override: its key parts (a leading ``{path}.`` dropped), its value, and the
    (field name, type) steps of the key through dataclass ``root``; an unknown key fails naming the override."""
    parts, value = parse_override(text)
    parts = _strip_root(parts, path)
    return parts, value, _field_path(text, parts, root, path)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], root: type,
                    path: str = "") -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys into dataclass ``root``; with ``path``, a leading
    ``{path}.`` is optional) to a nested dict. Values stay strings, for :func:`build` to coerce; unknown keys
    fail here, so that the message names the override."""
    out = merge({}, data)
    for text in overrides:
        _, value, steps = _override_steps(text, root, path)
        node = out
        for name, _ in steps[:-1]:
            child = node.get(name)
            if not isinstance(child, dict):
                child = {} if child is None or isinstance(child, str) else dataclasses.asdict(child)
                node[name] = child
            node = child
        node[steps[-1][0]] = value
    return out


def typed_overrides(overrides: Sequence[str], root: type, path: str = "") -> dict[str, Any]:
    """``KEY=VALUE`` settings for the fields of dataclass ``root`` (``--set`` of check, profile and bench) as
    a nested dict whose values are coerced to their fields' types, so a malformed value fails here with the
    same message as in ``spannorm train``. With ``path`` (e.g. ``model``), keys may start with ``{path}.``."""
    out: dict[str, Any] = {}
    for text in overrides:
        parts, value, steps = _override_steps(text, root, path)
        node = out
        for name, _ in steps[:-1]:
            node = node.setdefault(name, {})
        name, tp = steps[-1]
        typed = coerce(".".join([path, *parts] if path else parts), value, tp)
        is_section = dataclasses.is_dataclass(typed) and not isinstance(typed, type)
        node[name] = dataclasses.asdict(typed) if is_section else typed
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, merging nested mappings (a ``placement_overrides`` mapping is one value)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "placement_overrides":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


__all__ = ["MAX_SEED", "ConfigError", "apply_overrides", "as_flags", "build", "check_fields", "coerce", "fail",
           "field_types", "merge", "parse_override", "typed_overrides", "unknown_key", "yaml_value"]
