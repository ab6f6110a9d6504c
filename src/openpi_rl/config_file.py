"""Configuration files: a TOML file fills the same frozen dataclasses the CLI flags set, so
`--config FILE` and flags name things the same way (flags given after it override it)."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from openpi_rl.secret import MASK, is_secret


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (TOML) dict; unknown keys and wrong types are errors that
    name the key. A field whose type is a union of dataclasses is chosen by a `kind` key
    (e.g. `[model] kind = "pi0_fast"`), matched against each member's `KIND` or class name."""
    name = where.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known: {sorted(names)}")
    # A secret field's error names the key and the expected type, never the value given.
    kwargs = {k: _value(hints[k], v, f"{where}{k}", is_secret(hints[k])) for k, v in data.items()}
    return cls(**kwargs)


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _show(value: Any, secret: bool) -> str:
    return MASK if secret else repr(value)


def _value(tp: Any, value: Any, where: str, secret: bool = False) -> Any:
    tp = _strip(tp)
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [_strip(a) for a in typing.get_args(tp)]
        classes = [m for m in members if dataclasses.is_dataclass(m)]
        if classes and isinstance(value, dict):
            value = dict(value)
            kind = value.pop("kind", None)
            for c in classes:
                if (kind is None and len(classes) == 1) or kind in (
                    getattr(c, "KIND", None),
                    c.__name__,
                ):
                    return from_dict(c, value, where + ".")
            raise ValueError(
                f"{where}: kind {kind!r} is not one of {[getattr(c, 'KIND', c.__name__) for c in classes]}"
            )
        if value is None and type(None) in members:
            return None
        for m in members:
            if m is not type(None):
                try:
                    return _value(m, value, where, secret)
                except ValueError:
                    continue
        raise ValueError(f"{where}: {_show(value, secret)} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin is tuple:
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: expected a table, got {type(value).__name__} {_show(value, secret)}"
            )
        _, item = typing.get_args(tp) or (Any, Any)
        return {k: _value(item, v, f"{where}.{k}", secret) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {_show(value, secret)} is not one of {typing.get_args(tp)}")
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        shown = _show(value, secret)
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {shown}")
    return value


def load(cls: type, path: str | Path) -> Any:
    with open(path, "rb") as f:
        return from_dict(cls, tomllib.load(f))
