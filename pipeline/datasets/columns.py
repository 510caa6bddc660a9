"""What the column-based adapters (``imagefolder``, ``hf``, ``webdataset``) share.

Each of them finds, per sample, an image, a label, a text and/or ingredients under column (or
JSON key) names the user can change (``--label-column``, ``--text-column``,
``--ingredients-column``), and splits under names of their own that ``--splits`` maps onto
marnet's ``train``/``val``/``test``. This module turns those raw values into records, with the
rules of the ``folder`` adapter:

- labels that are all integers are 0-based class indices (class names ``"0"``..., or the
  dataset's own class names, e.g. a Hugging Face ``ClassLabel``); labels that are all strings
  are class names, in sorted order; mixing the two is an error naming both samples;
- the text is the text column's value; when it is empty or absent, the sentence ``--template``
  builds from the ingredients (a list, or a ``;``-separated string); neither is an error;
- ids are unique; train and test are required, val is optional.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from ..core.config import require_modules
from .base import SPLITS, DatasetError, DatasetInfo, Record, render_text, warn
from .sources import ImageRef

# the names each marnet split is found under by default, first match wins: the Hugging Face
# keywords (datasets.data_files.SPLIT_KEYWORDS)
SOURCE_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
REQUIRED_SPLITS = ("train", "test")
SPLITS_HELP = ("--splits maps marnet's splits to the dataset's, e.g. "
               "'train=train,val=validation,test=test'")


def require_module(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise a :class:`DatasetError` with the one-line install hint."""
    return require_modules([module], f"{purpose} needs the {module} package: pip install "
                                     f"'marnet[{extra}]'", DatasetError)[0]


def parse_split_map(text: str | None) -> dict[str, str]:
    """``"train=train,val=dev"`` -> ``{"train": "train", "val": "dev"}`` (marnet split ->
    the dataset's split name)."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        ours, sep, theirs = (side.strip() for side in item.partition("="))
        if not sep or not ours or not theirs:
            raise DatasetError(f"--splits: {item!r} is not SPLIT=NAME. {SPLITS_HELP}")
        if ours not in SPLITS:
            raise DatasetError(f"--splits: {ours!r} is not one of marnet's splits "
                               f"({', '.join(SPLITS)}). {SPLITS_HELP}")
        mapping[ours] = theirs
    return mapping


def map_splits(available: Sequence[str], splits: str | None, where: str) -> dict[str, str]:
    """``{marnet split: the dataset's split}`` for the splits found at ``where``: the ``--splits``
    entries, else each split's first default name present (:data:`SOURCE_SPLITS`)."""
    given = parse_split_map(splits)
    found = ", ".join(repr(name) for name in available) or "none"
    for ours, theirs in given.items():
        if theirs not in available:
            raise DatasetError(f"{where}: --splits {ours}={theirs}: there is no split "
                               f"{theirs!r}; found {found}")
    mapping = dict(given)
    for ours, names in SOURCE_SPLITS.items():
        if ours not in mapping:
            present = [name for name in names if name in available]
            if present:
                mapping[ours] = present[0]
    missing = [split for split in REQUIRED_SPLITS if split not in mapping]
    if missing:
        raise DatasetError(f"{where}: no {' or '.join(missing)} split (found {found}); train "
                           f"and test are required, val is optional. {SPLITS_HELP}")
    unread = [name for name in available if name not in mapping.values()]
    if unread:
        warn(f"{where}: split(s) {', '.join(map(repr, unread))} not read; {SPLITS_HELP}")
    return {split: mapping[split] for split in SPLITS if split in mapping}


def split_of(path: Path) -> str:
    """The split a data file names: the leading word of its file name (``train`` in
    ``train-00000-of-00004.parquet`` or ``train_3.tar``), else its folder's name (``test`` in
    ``test/0000.tar``)."""
    word = re.match(r"[^-_. 0-9]*", path.name).group(0)
    return word or path.parent.name


@dataclass(frozen=True)
class Columns:
    """Where a sample's label, text and ingredients are (column or JSON key names)."""

    label: str = "label"
    text: str = "text"
    ingredients: str = "ingredients"

    def require_text(self, names: Iterable[str], where: str) -> None:
        """A table must have the text column, the ingredients column, or both."""
        names = list(names)
        if self.text not in names and self.ingredients not in names:
            raise DatasetError(f"{where}: no column {self.text!r} or {self.ingredients!r} for "
                               f"the text (columns: {', '.join(names) or 'none'}); name yours "
                               "with --text-column or --ingredients-column")


@dataclass(frozen=True)
class Sample:
    """One sample as read, before labels become indices; ``where`` names it in errors
    (``metadata.csv:4``, ``train.parquet row 3``, ``shard.tar key 'a'``)."""

    where: str
    split: str
    id: str
    image: ImageRef
    label: int | str
    text: str
    ingredients: tuple[str, ...]


def label_value(value: Any, where: str, column: str) -> int | str:
    """A label as an int (an index) or a str (a class name); an integer string is an int."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, str)):
        raise DatasetError(f"{where}: label {column!r} must be a class name or a 0-based index, "
                           f"found {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DatasetError(f"{where}: label {column!r} is empty; give a class name or a "
                               "0-based index")
        return int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return value


def text_and_ingredients(values: dict[str, Any], where: str, columns: Columns
                         ) -> tuple[str, tuple[str, ...]]:
    """A sample's text and ingredient names from its values (missing keys are empty)."""
    text = values.get(columns.text)
    if text is not None and not isinstance(text, str):
        raise DatasetError(f"{where}: {columns.text!r} must be a string, found {text!r}")
    raw = values.get(columns.ingredients)
    names = raw.split(";") if isinstance(raw, str) else raw
    if names is None:
        names = []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DatasetError(f"{where}: {columns.ingredients!r} must be a list of strings or a "
                           f"';'-separated string, found {raw!r}")
    ingredients = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not (text or "").strip() and not ingredients:
        raise DatasetError(f"{where}: no text: {columns.text!r} and {columns.ingredients!r} are "
                           "both empty or absent; give the text, or the ingredients to build "
                           "it from with --template")
    return (text or "").strip(), ingredients


def class_names_for(samples: Sequence[Sample], given: list[str] | None) -> list[str]:
    """The class names: ``given`` (the dataset's own), else ``"0"``... for index labels, else
    the sorted names; index and name labels mixed is an error naming one of each."""
    first = samples[0]
    for sample in samples:
        if isinstance(sample.label, int) != isinstance(first.label, int):
            raise DatasetError(f"{sample.where}: label {sample.label!r} mixes with "
                               f"{first.where}'s {first.label!r}; use class names or 0-based "
                               "indices throughout")
    if given is not None:
        return list(given)
    if isinstance(first.label, int):
        return [str(i) for i in range(max(s.label for s in samples) + 1)]  # type: ignore[type-var]
    return sorted({str(s.label) for s in samples})


def label_index(sample: Sample, class_names: list[str], positions: dict[str, int]) -> int:
    """The 0-based class index of ``sample``'s label; out of range or unknown is an error."""
    if isinstance(sample.label, int):
        if not 0 <= sample.label < len(class_names):
            raise DatasetError(f"{sample.where}: label {sample.label} is outside "
                               f"0..{len(class_names) - 1} (0-based index)")
        return sample.label
    if sample.label not in positions:
        raise DatasetError(f"{sample.where}: label {sample.label!r} is not one of the dataset's "
                           f"classes ({', '.join(class_names[:5])}...)")
    return positions[sample.label]


def build_info(name: str, root: Path, samples: list[Sample], template: str,
               source_files: list[Path], extra: dict[str, object],
               class_names: list[str] | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``samples`` (labels to indices, text from the ingredients
    where it is empty, ids unique, train and test present)."""
    if not samples:
        raise DatasetError(f"{root}: no samples found")
    names = class_names_for(samples, class_names)
    positions = {class_name: i for i, class_name in enumerate(names)}
    vocabulary = sorted({ingredient for s in samples for ingredient in s.ingredients})
    column = {ingredient: i for i, ingredient in enumerate(vocabulary)}
    first_seen: dict[str, str] = {}
    splits: dict[str, list[Record]] = {}
    for sample in samples:
        earlier = first_seen.setdefault(sample.id, sample.where)
        if earlier != sample.where:
            raise DatasetError(f"{sample.where}: duplicate id {sample.id!r}, already at "
                               f"{earlier}; every sample may appear once")
        splits.setdefault(sample.split, []).append(Record(
            id=sample.id, image=sample.image, label=label_index(sample, names, positions),
            text=sample.text or render_text(template, sample.ingredients),
            ingredients=tuple(sorted(column[i] for i in sample.ingredients))))
    for split in REQUIRED_SPLITS:
        if split not in splits:
            raise DatasetError(f"{root}: the {split} split has no samples; train and test are "
                               "required")
    return DatasetInfo(
        name=name, root=root, class_names=names, ingredients=vocabulary,
        splits={split: splits[split] for split in SPLITS if split in splits},
        template=template, source_files=source_files,
        extra={"text_level": "image",
               "labels": "index" if isinstance(samples[0].label, int) else "name", **extra})
