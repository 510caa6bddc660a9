"""Records, dataset descriptions and the errors every adapter raises.

An adapter turns a dataset root on disk into a :class:`DatasetInfo` (class names, ingredient
vocabulary, the files that define it) and, per split, a list of :class:`Record`. Adapters know
nothing of models or caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..core.defaults import DEFAULT_TEMPLATE
from .sources import (
    FINGERPRINT_BYTES,
    ImageRef,
    StoredImage,
    tail_start,
    window_fingerprint,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")



class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file (and line) and what to do."""


class DatasetWarning(UserWarning):
    """Something unusual in a dataset that does not stop it from being read."""


def at_line(path: Path | str, line_no: int, problem: str) -> DatasetError:
    """A :class:`DatasetError` that points at ``path:line_no``."""
    return DatasetError(f"{path}:{line_no}: {problem}")


def warn(message: str) -> None:
    """Emit a :class:`DatasetWarning` (unusual input that can still be read)."""
    warnings.warn(message, DatasetWarning, stacklevel=3)


def case_only_groups(names: Sequence[str]) -> list[list[str]]:
    """Groups of distinct names that differ only in letter case (e.g. ``Temple`` / ``temple``)."""
    by_lower: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        by_lower.setdefault(name.lower(), []).append(name)
    return [group for group in by_lower.values() if len(group) > 1]


def warn_on_unofficial_counts(name: str, found: dict[str, int], official: dict[str, int]) -> None:
    """One warning listing every count in ``found`` that differs from the official release's."""
    differ = [f"{key} {found[key]:,} (official {expected:,})"
              for key, expected in official.items() if key in found and found[key] != expected]
    if differ:
        warn(f"{name}: counts differ from the official release: {', '.join(differ)}; fine for a "
             "partial copy, otherwise check the download")


@dataclass(frozen=True)
class Record:
    """One sample: its image, its 0-based class label and its privileged text.

    ``image`` is an image file, or for adapters that keep images inside containers (tar
    shards, Arrow/Parquet tables) a :class:`~pipeline.datasets.sources.StoredImage`.
    ``ingredients`` holds indices into :attr:`DatasetInfo.ingredients` (sorted, unique);
    ``text`` is the sentence the text backbone reads.
    """

    id: str
    image: ImageRef
    label: int
    text: str
    ingredients: tuple[int, ...] = ()


@dataclass
class DatasetInfo:
    """What a dataset is: names, vocabulary, the files that define it, and per-split records."""

    name: str
    root: Path
    class_names: list[str]
    ingredients: list[str]
    splits: dict[str, list[Record]]
    source_files: list[Path] = field(default_factory=list)
    template: str = DEFAULT_TEMPLATE
    extra: dict[str, object] = field(default_factory=dict)
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_ingredients(self) -> bool:
        return bool(self.ingredients)

    def digest(self) -> str:
        """SHA-256 over the annotation files and the resolved records (ids, images, labels,
        texts) and a fingerprint of every image (:func:`image_fingerprint`; a stored image's
        own, by the same rule).

        Any change to a split file, a label file, the text template, where the images are read
        from or an image file's content changes the digest, and so the cache key. Image paths
        are hashed relative to :attr:`root` when inside it (moving or copying the whole dataset
        root keeps the digest) and absolute otherwise (another images folder, e.g.
        ingredient101's ``--images-root``, changes it); a stored image is named by its
        container, named the same way, and its place in it. Computed once per dataset
        description.
        """
        if self._digest is None:
            h = hashlib.sha256()
            for path in sorted(self.source_files):
                h.update(path.name.encode())
                h.update(hashlib.sha256(path.read_bytes()).digest())
            root = os.path.abspath(self.root)
            for split in sorted(self.splits):
                records = self.splits[split]
                h.update(split.encode())
                for rec, print_ in zip(records, image_fingerprints([r.image for r in records])):
                    image = (rec.image.portable_name(root) if isinstance(rec.image, StoredImage)
                             else portable_path(rec.image, root))
                    h.update(f"{rec.id}\t{image}\t{rec.label}\t{rec.text}\t{print_}\n".encode())
            self._digest = h.hexdigest()
        return self._digest


def image_fingerprint(path: Path | str) -> str:
    """``<size>:<BLAKE2b of the first and last 4 KiB>`` of a file (the whole file when it is
    shorter than 8 KiB), or ``missing``.

    A content fingerprint, unlike the size and modification time make and rsync use: copying a
    dataset (``cp -r`` resets modification times) keeps it, while re-encoding, editing or
    replacing an image changes it (an encoded image's bytes change from its first entropy-coded
    block on, which lies within the first 4 KiB of a JPEG or PNG). It reads 8 KiB per image:
    ``marnet bench`` measures its cost against decoding the images.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(FINGERPRINT_BYTES)
            fh.seek(tail_start(size))
            tail = fh.read(FINGERPRINT_BYTES) if size > FINGERPRINT_BYTES else b""
    except OSError:
        return "missing"
    return window_fingerprint(size, head, tail)


def any_fingerprint(image: ImageRef | str) -> str:
    """:func:`image_fingerprint` of an image file; a stored image's own fingerprint."""
    return image.fingerprint() if isinstance(image, StoredImage) else image_fingerprint(image)


def image_fingerprints(paths: Sequence[ImageRef | str], workers: int = 16) -> list[str]:
    """The fingerprint of each image, in order (threads: the work is file I/O)."""
    if len(paths) < 64:
        return [any_fingerprint(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(any_fingerprint, paths, chunksize=256))


def portable_path(path: Path | str, root: str) -> str:
    """``path`` relative to the absolute folder ``root`` (``/`` separated) when inside it, else
    absolute: how a dataset names a file so that moving the whole dataset keeps the name."""
    absolute = os.path.abspath(path)
    if absolute.startswith(root.rstrip(os.sep) + os.sep):
        return absolute[len(root.rstrip(os.sep)) + 1:].replace(os.sep, "/")
    return absolute


def render_text(template: str, names: Sequence[str]) -> str:
    """Turn an ingredient list into the sentence the text backbone reads (methods §3.17)."""
    return template.format(ingredients=", ".join(names), n=len(names))


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise an error that says what belongs there."""
    if not path.is_file():
        raise DatasetError(f"missing {what}: expected a file at {path}")
    return path


def require_root(root: Path, hint: str) -> Path:
    """Return ``root`` if it is a folder; else say whether it is missing or a file."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {what}. {hint}")
    return root


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a folder, else raise an error that says what belongs there."""
    if not path.is_dir():
        message = f"missing {what}: expected a folder at {path}"
        raise DatasetError(f"{message}. {hint}" if hint else message)
    return path


def _not_utf8(path: Path, line_no: int, reason: str, column: int) -> DatasetError:
    return at_line(path, line_no, f"not valid UTF-8 ({reason} at byte {column + 1} of the line); "
                   "re-save the file as UTF-8")


def read_text(path: Path) -> str:
    """Read a whole UTF-8 text file (a leading BOM is dropped).

    Non-UTF-8 bytes raise a :class:`DatasetError` naming the file and the line they are on.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise _not_utf8(path, data.count(b"\n", 0, exc.start) + 1, exc.reason,
                        exc.start - line_start) from None


class UniqueIds:
    """Remembers where each record id was first listed; a second listing is an error."""

    def __init__(self, rule: str = "every image may appear once, in one split") -> None:
        self._first: dict[str, str] = {}
        self._rule = rule

    def claim(self, record_id: str, path: Path, line_no: int) -> None:
        """Register ``record_id`` as listed at ``path:line_no``; raise if it was listed before."""
        here = f"{path}:{line_no}"
        first = self._first.setdefault(record_id, here)
        if first != here:
            raise at_line(path, line_no, f"duplicate id {record_id!r}, already listed at {first}; "
                          f"{self._rule}. Remove one of the lines")


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Read a UTF-8 text file as ``(line_no, stripped_line)`` pairs, skipping empty lines.

    Accepts LF and CRLF endings and a missing final newline. Non-UTF-8 bytes raise a
    :class:`DatasetError` naming the file and line.
    """
    data = path.read_bytes()
    out: list[tuple[int, str]] = []
    for line_no, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").strip()
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, line_no, exc.reason, exc.start) from None
        if line:
            out.append((line_no, line))
    return out


def jsonl_objects(path: Path, keys: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_no, object)`` per non-empty line of a JSONL file; a line that is not one JSON
    object is an error naming the file and line (``keys``: what the object should hold)."""
    for line_no, line in read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise at_line(path, line_no, f"expected one JSON object per line ({exc.msg} at "
                          f"column {exc.colno})") from None
        if not isinstance(row, dict):
            raise at_line(path, line_no, f"expected a JSON object with {keys}, found "
                          f"{type(row).__name__}")
        yield line_no, row


def read_names(path: Path, what: str, on_duplicate: str = "fail") -> list[str]:
    """One name per non-empty line, in file order (e.g. ``classes.txt``).

    A name listed twice is an error naming both lines (``on_duplicate="fail"``), or, where the
    line number and not the name is the identity (VIREO's ``FoodList.txt``: line k is class
    folder k), kept with one warning (``"warn"``).
    """
    names: list[str] = []
    first_line: dict[str, int] = {}
    repeats: list[str] = []
    for line_no, name in read_lines(require_file(path, what)):
        if name in first_line:
            if on_duplicate == "fail":
                raise at_line(path, line_no, f"{name!r} is already listed at line "
                              f"{first_line[name]}; names must be unique")
            repeats.append(f"{name!r} (lines {first_line[name]} and {line_no})")
        first_line.setdefault(name, line_no)
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: no names found (the file is empty); expected the {what}, "
                           "one name per line")
    if repeats:
        warn(f"{path}: {len(repeats)} name(s) listed more than once, e.g. {repeats[0]}; kept, "
             "as lines and not names identify them, but they cannot be told apart by name")
    return names


Loader = Callable[..., DatasetInfo]
