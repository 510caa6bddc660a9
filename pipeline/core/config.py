"""Dataclass configs: ``--set a.b=value`` overrides with type checking, and configs rebuilt
from their JSON dicts."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
    """An override names an unknown field or a value of the wrong type."""


def require_modules(modules: Sequence[str], hint: str,
                    error: type[Exception] = ConfigError) -> list[types.ModuleType]:
    """Import ``modules`` in order (the packages of an optional extra), or raise ``error``
    with ``hint`` (what needs them, and the pip command) and the import's own message."""
    loaded = []
    for module in modules:
        try:
            loaded.append(importlib.import_module(module))
        except ImportError as exc:
            raise error(f"{hint} ({exc})") from None
    return loaded


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the setting, the bad value and the choices."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported; choose one of "
                         f"{', '.join(choices)}")


def require_positive(name: str, value: int | None) -> None:
    """``ConfigError`` unless ``value`` is None or >= 1."""
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def require_range(name: str, value: float | None, low: float | None = None,
                  high: float | None = None, low_open: bool = False) -> None:
    """``ConfigError`` unless ``value`` is None or within ``[low, high]`` (``(low, high]``
    with ``low_open``); a bound of None is no bound."""
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high) or value != value:  # NaN fails too
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise ConfigError(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, "
                          f"got {value:g}")


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def require_device(name: str, value: str) -> None:
    """``ConfigError`` unless ``value`` names a device marnet runs on: auto, cpu, cuda, cuda:N
    (whether a GPU is present is checked when the device is used)."""
    kind, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return
    raise ConfigError(f"{name} {value!r} is not a device marnet runs on; choose "
                      f"{', '.join(DEVICES)}")


TEMPLATE_FIELDS = {"ingredients": "salt, pepper", "n": 2}


def require_template(name: str, template: str) -> None:
    """``ConfigError`` unless ``template`` formats with the fields a text template gets:
    ``{ingredients}`` (the comma-joined list) and ``{n}`` (their number)."""
    try:
        template.format(**TEMPLATE_FIELDS)
    except KeyError as exc:
        raise ConfigError(f"{name} {template!r} uses the field {{{exc.args[0]}}}; a template "
                          f"may use {{ingredients}} and {{n}} (write {{{{ and }}}} for "
                          "literal braces)") from None
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"{name} {template!r} is not a valid template ({exc}); it may use "
                          "{ingredients} and {n} (write {{ and }} for literal braces)") from None


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


def set_fields(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass ``cfg`` with every dotted field of ``overrides`` set to its value.

    All the settings of one config change in a single step, so its ``__post_init__`` checks
    the combination asked for (``sampler=ddim`` with ``steps=5``), whatever their order.
    """
    fields = {f.name for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            raise ConfigError(f"unknown setting {prefix + key!r}; known here: "
                              f"{', '.join(sorted(fields))}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = _coerce(value, hints[head], prefix + key)
    for head, children in nested.items():
        child = getattr(cfg, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{prefix + head!r} has no sub-settings (asked for "
                              f"{prefix + head}.{next(iter(children))})")
        direct[head] = set_fields(child, children, f"{prefix}{head}.")
    return dataclasses.replace(cfg, **direct)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``cfg`` with every dotted ``KEY: VALUE`` of ``overrides`` set; a key that would have no
    effect under the resulting settings (a config's ``REQUIRES``) is refused."""
    cfg = set_fields(cfg, overrides)
    for key in overrides:
        require_effective(cfg, key)
    return cfg


def require_effective(cfg: Any, key: str) -> None:
    """``ConfigError`` when the dotted setting ``key`` of ``cfg`` only acts together with
    another setting that does not hold: a dataclass declares these as
    ``REQUIRES = {field: (other field, value it must have)}``."""
    prefix, _, leaf = key.rpartition(".")
    owner = cfg
    for part in prefix.split(".") if prefix else ():
        owner = getattr(owner, part)
    needed = getattr(type(owner), "REQUIRES", {}).get(leaf)
    if needed is None or getattr(owner, needed[0]) == needed[1]:
        return
    other = f"{prefix}.{needed[0]}" if prefix else needed[0]
    raise ConfigError(f"{key} has no effect while {other} is {getattr(owner, needed[0])!r}: "
                      f"it applies with {other}={needed[1]} (add --set {other}={needed[1]}), "
                      f"or leave {key} out")


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
