"""Dataclass configs: ``--set a.b=value`` overrides with type checking, and configs rebuilt
from their JSON dicts."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """An override names an unknown field or a value of the wrong type."""


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the setting, the bad value and the choices."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported; choose one of "
                         f"{', '.join(choices)}")


def require_positive(name: str, value: int | None) -> None:
    """``ValueError`` unless ``value`` is None or >= 1."""
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        return origin(value)
    return value


def set_field(cfg: Any, key: str, value: Any) -> Any:
    """Return a copy of dataclass ``cfg`` with the dotted field ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ConfigError(f"unknown setting {key!r}; known here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(type(cfg))
    if rest:
        child = getattr(cfg, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{head!r} has no sub-settings (asked for {key!r})")
        return dataclasses.replace(cfg, **{head: set_field(child, rest, value)})
    return dataclasses.replace(cfg, **{head: _coerce(value, hints[head], key)})


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    for key, value in overrides.items():
        cfg = set_field(cfg, key, value)
    return cfg


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a (possibly nested) dict as ``dataclasses.asdict`` makes."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f.name)
    return cls(**kwargs)
