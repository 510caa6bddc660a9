"""Does a cache match what stage two was asked for? Differences named field by field."""

from __future__ import annotations

import json
from typing import Any

from .errors import CacheError

_MISSING = object()


def flatten(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"visual": {"model": "m"}}`` -> ``{"visual.model": "m"}`` (lists stay whole)."""
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value, default=str)


def diff_inputs(ours: dict[str, Any], theirs: dict[str, Any],
                labels: tuple[str, str] = ("expected", "cache")) -> list[str]:
    """One line per differing key input: ``visual.weights_digest: run "a", cache "b"``."""
    a, b = flatten(ours), flatten(theirs)
    return [f"{name}: {labels[0]} {_show(a.get(name, _MISSING))}, "
            f"{labels[1]} {_show(b.get(name, _MISSING))}"
            for name in sorted(set(a) | set(b))
            if a.get(name, _MISSING) != b.get(name, _MISSING)]


def parse_expectations(items: list[str] | None) -> dict[str, str]:
    """``["visual.model=resnet50", "dtype=float16"]`` -> a dict; malformed items are errors."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CacheError(f"--expect takes NAME=VALUE (e.g. visual.model=vit_base_patch16_224),"
                             f" got {item!r}")
        out[name.strip()] = value.strip()
    return out


def expectation_problems(manifest: dict[str, Any], expect: dict[str, str]) -> list[str]:
    """Expected key inputs (dotted names, or ``key``) that the manifest does not have."""
    known = {"key": manifest.get("key"), **flatten(manifest.get("inputs", {}))}
    problems = []
    for name, wanted in expect.items():
        if name not in known:
            problems.append(f"{name}: not a key input (known: {', '.join(sorted(known))})")
        elif wanted not in (str(known[name]), json.dumps(known[name], default=str)):
            problems.append(f"{name} is {_show(known[name])}, expected {wanted!r}")
    return problems


def require_expected(manifest: dict[str, Any], expect: dict[str, str], where: str) -> None:
    """Raise a :class:`CacheError` naming every expectation the cache at ``where`` misses."""
    problems = expectation_problems(manifest, expect)
    if problems:
        raise CacheError(f"the cache at {where} does not match what was asked for: "
                         + "; ".join(problems))


def require_same_inputs(run_cache: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """Refuse a cache whose key differs from the one a run was trained on, naming the inputs.

    ``run_cache`` is the ``cache`` entry of a run's config (``key`` and, from runs written by
    this version on, ``inputs``).
    """
    if run_cache["key"] == manifest.get("key"):
        return
    differences = (diff_inputs(run_cache["inputs"], manifest.get("inputs", {}),
                               ("run", "cache")) if "inputs" in run_cache else [])
    detail = ": " + "; ".join(differences) if differences else ""
    raise CacheError(f"the cache at {where} (key {manifest.get('key')}) is not the one the run "
                     f"was trained on (key {run_cache['key']}){detail}. Pass the cache it was "
                     "trained on")


__all__ = ["diff_inputs", "expectation_problems", "flatten", "parse_expectations",
           "require_expected", "require_same_inputs"]
