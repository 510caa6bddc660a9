"""Dataset adapters: real on-disk layouts -> :class:`Record` lists, by registered name."""

from __future__ import annotations

import inspect
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
from .folder import load_folder
from .hf import load_hf
from .imagefolder import load_imagefolder
from .ingredient101 import load_ingredient101
from .synthfood import load_synthfood
from .vireo172 import load_vireo172
from .wds import load_webdataset

ADAPTERS: dict[str, tuple[Loader, str]] = {
    "vireo172": (load_vireo172, "VIREO Food-172: ready_chinese_food/ + SplitAndIngreLabel/ "
                                "(per-image ingredients)"),
    "ingredient101": (load_ingredient101, "Ingredient-101: Annotations/ + the Food-101 images "
                                          "(per-class ingredients; --images-root, "
                                          "--ingredients complete|simplified)"),
    "folder": (load_folder, "your own data: images/ + labels.csv or labels.jsonl "
                            "(path,label,text,split[,ingredients])"),
    "imagefolder": (load_imagefolder, "the Hugging Face imagefolder layout: train/, test/ "
                                      "and optional validation/, with metadata.csv or "
                                      "metadata.jsonl (file_name, label or class sub-folders, "
                                      "text)"),
    "hf": (load_hf, "a Hugging Face DatasetDict saved with save_to_disk, or Parquet files, "
                    "with an Image column (needs the hf extra)"),
    "webdataset": (load_webdataset, "WebDataset .tar shards, --root 'shards/{train,test}-"
                                    "{00000..00009}.tar' (.jpg/.png + .cls/.json + .txt; "
                                    "needs the webdataset extra)"),
    "synthfood": (load_synthfood, "the embedded offline demo, generated on first use "
                                  "(VIREO layout)"),
}


def adapter_options(name: str) -> list[str]:
    """The options adapter ``name`` takes besides ``root`` and ``template``."""
    loader, _ = ADAPTERS[name]
    return [p for p in inspect.signature(loader).parameters if p not in ("root", "template")]


def resolved_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """Every option adapter ``name`` takes, with its default where ``options`` does not set it."""
    loader, _ = ADAPTERS[name]
    parameters = inspect.signature(loader).parameters
    return {p: options.get(p, parameters[p].default) for p in adapter_options(name)}


def load_dataset(name: str, root: Path | str, template: str = DEFAULT_TEMPLATE,
                 **options: object) -> DatasetInfo:
    """Read dataset ``name`` from ``root`` with the registered adapter."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    unknown = sorted(set(options) - set(adapter_options(name)))
    if unknown:
        raise DatasetError(f"dataset {name!r} does not take the option(s) {', '.join(unknown)}; "
                           f"it takes: {', '.join(adapter_options(name)) or 'none'}")
    loader, _ = ADAPTERS[name]
    return loader(Path(root), template=template, **options)


__all__ = ["ADAPTERS", "DEFAULT_TEMPLATE", "SPLITS", "DatasetError", "DatasetInfo",
           "DatasetWarning", "Record", "adapter_options", "load_dataset", "resolved_options"]
