"""Validate a dataset root without running any model (``marnet datasets check``).

The adapter reads every annotation file (so every format error surfaces as it would in
``extract``), its warnings are collected, and, unless told not to, every image is opened with
:func:`pipeline.datasets.images.load_rgb` to find missing and unreadable files before a long
extraction does.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import load_dataset
from .base import DEFAULT_TEMPLATE, DatasetInfo, DatasetWarning, Record
from .images import BadImageError, load_rgb
from .sources import ImageRef, StoredImage

DRAFT_SIZE = 256  # JPEGs are decoded at about this size, as extraction decodes them
MAX_FAILURES = 10  # failures listed in the report (all are counted)

Progress = Callable[[str, int], AbstractContextManager[Callable[..., None]]]
"""``progress(description, total)``: a context that yields ``advance(n=1)`` (the caller's UI)."""


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A :data:`Progress` that shows nothing."""
    yield lambda n=1, **_: None


@dataclass
class ImageFailure:
    """One image that extraction could not use."""

    split: str
    id: str
    path: str
    kind: str  # "missing" or "unreadable"
    reason: str


@dataclass
class SplitSummary:
    """Counts for one split; image counts are None when images were not scanned."""

    images: int
    classes_present: int
    ingredients_per_image: dict[str, float] | None
    missing: int | None = None
    unreadable: int | None = None


@dataclass
class DatasetReport:
    """What ``marnet datasets check`` found in a dataset root."""

    dataset: str
    root: str
    options: dict[str, Any]
    class_names: list[str]
    ingredient_vocabulary: int
    unique_texts: int
    extra: dict[str, Any]
    splits: dict[str, SplitSummary]
    warnings: list[str]
    images_scanned: bool
    failures: list[ImageFailure] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bad_images(self) -> int:
        """Missing plus unreadable images over all splits (0 when not scanned)."""
        return sum((s.missing or 0) + (s.unreadable or 0) for s in self.splits.values())

    @property
    def ok(self) -> bool:
        """True when every scanned image decoded (warnings do not count)."""
        return self.bad_images == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {**asdict(self), "num_classes": self.num_classes, "bad_images": self.bad_images,
                "ok": self.ok}


def load_with_warnings(name: str, root: Path, template: str,
                       options: dict[str, Any]) -> tuple[DatasetInfo, list[str]]:
    """Read the dataset and return it with the messages of the dataset warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        info = load_dataset(name, root, template, **options)
    for other in caught:
        if not issubclass(other.category, DatasetWarning):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    return info, [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]


def summarise_split(records: list[Record], has_ingredients: bool) -> SplitSummary:
    """Image and class counts and ingredients per image of one split."""
    counts = [len(rec.ingredients) for rec in records]
    per_image = ({"mean": round(sum(counts) / len(counts), 2), "min": min(counts),
                  "max": max(counts)} if has_ingredients and counts else None)
    return SplitSummary(len(records), len({rec.label for rec in records}), per_image)


def class_coverage_warnings(info: DatasetInfo) -> list[str]:
    """Warnings for classes that have no training image."""
    present = {rec.label for rec in info.splits.get("train", [])}
    absent = [name for i, name in enumerate(info.class_names) if i not in present]
    if not absent:
        return []
    return [f"{len(absent)} of {info.num_classes} classes have no train image "
            f"(first: {absent[0]!r})"]


def image_problem(path: ImageRef) -> tuple[str, str] | None:
    """``(kind, reason)`` if ``path`` (or the shard or table holding it) is missing or the
    image cannot be decoded, else None."""
    if not (path.container if isinstance(path, StoredImage) else path).is_file():
        return "missing", f"{path}: file not found"
    try:
        load_rgb(path, draft_size=DRAFT_SIZE)
    except BadImageError as exc:
        return "unreadable", str(exc)
    return None


def scan_images(pairs: list[tuple[str, Record]], workers: int,
                on_image: Callable[[], None] = lambda: None) -> list[ImageFailure]:
    """Open every ``(split, record)`` image on ``workers`` threads; failures in record order."""
    failures = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = pool.map(image_problem, [rec.image for _, rec in pairs])
        for (split, rec), problem in zip(pairs, problems):
            on_image()
            if problem is not None:
                failures.append(ImageFailure(split, rec.id, str(rec.image), *problem))
    return failures


def check_dataset(name: str, root: Path | str, template: str = DEFAULT_TEMPLATE,
                  options: dict[str, Any] | None = None, images: bool = True,
                  workers: int | None = None, progress: Progress = no_progress) -> DatasetReport:
    """Read dataset ``name`` at ``root``, summarise it and (with ``images``) scan its images,
    reporting the scan through ``progress`` (e.g. the command line's progress bar).

    Format errors raise :class:`~pipeline.datasets.base.DatasetError` as in ``extract``.
    """
    options = dict(options or {})
    info, messages = load_with_warnings(name, Path(root), template, options)
    splits = {split: summarise_split(records, info.has_ingredients)
              for split, records in info.splits.items()}
    report = DatasetReport(
        dataset=info.name, root=str(info.root), options={k: str(v) for k, v in options.items()},
        class_names=info.class_names, ingredient_vocabulary=len(info.ingredients),
        unique_texts=len({r.text for recs in info.splits.values() for r in recs}),
        extra=info.extra, splits=splits, warnings=messages + class_coverage_warnings(info),
        images_scanned=images)
    if images:
        pairs = [(split, rec) for split, records in info.splits.items() for rec in records]
        with progress("checking images", len(pairs)) as advance:
            failures = scan_images(pairs, workers or os.cpu_count() or 1, advance)
        for split, summary in splits.items():
            summary.missing = sum(f.split == split and f.kind == "missing" for f in failures)
            summary.unreadable = sum(f.split == split and f.kind == "unreadable"
                                     for f in failures)
        report.failures = failures[:MAX_FAILURES]
    return report
