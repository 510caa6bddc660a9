"""Dataset adapters: real on-disk layouts -> :class:`Record` lists, by registered name."""

from __future__ import annotations

from pathlib import Path

from .base import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DatasetError,
    DatasetInfo,
    DatasetWarning,
    Loader,
    Record,
)
from .synthfood import load_synthfood
from .vireo172 import load_vireo172

ADAPTERS: dict[str, tuple[Loader, str]] = {
    "vireo172": (load_vireo172, "VIREO Food-172: ready_chinese_food/ + SplitAndIngreLabel/ "
                                "(per-image ingredients)"),
    "synthfood": (load_synthfood, "the embedded offline demo, generated on first use "
                                  "(VIREO layout)"),
}


def load_dataset(name: str, root: Path | str, template: str = DEFAULT_TEMPLATE,
                 **options: object) -> DatasetInfo:
    """Read dataset ``name`` from ``root`` with the registered adapter."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    loader, _ = ADAPTERS[name]
    return loader(Path(root), template=template, **options)


__all__ = ["ADAPTERS", "DEFAULT_TEMPLATE", "SPLITS", "DatasetError", "DatasetInfo",
           "DatasetWarning", "Record", "load_dataset"]
