"""``imagefolder``: the Hugging Face layout, read as ``datasets`` reads it (datasets §6.1).

Layout::

    <root>/train/metadata.csv            one metadata file per split folder (csv or jsonl) ...
    <root>/train/<class>/<image>.jpg     ... with the images below it
    <root>/validation/... or val/...     optional
    <root>/test/...
    <root>/metadata.csv                  ... or one at the root, file_name starting with the
                                         split folder (train/<class>/<image>.jpg)

- Split folders are found by the Hugging Face names (``train``/``training``;
  ``validation``/``valid``/``val``/``dev``; ``test``/``testing``/``eval``/``evaluation``),
  or mapped with ``--splits``.
- ``file_name`` is the image's path relative to the metadata file's folder (no absolute paths,
  no ``..``); the record id is the image's path relative to the root. Only the images the
  metadata lists are read, in its order, as ``datasets`` does.
- The label is the ``--label-column`` (default ``label``) when the metadata has it; otherwise
  the image's class sub-folder (its parent folder's name), the classes sorted, as ``datasets``
  labels an ``imagefolder`` without metadata.
- The text is the ``--text-column`` (default ``text``); when empty, ``--template`` over the
  ``--ingredients-column`` (default ``ingredients``: a JSON list, or ``;``-separated in CSV).

``datasets.load_dataset("imagefolder", data_dir=<root>)`` returns the same samples, labels and
texts for the per-split layout; for the root-level file it ignores the metadata when split
folders exist (so that layout is marnet's reading of it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath
from typing import Any

from .base import (
    DEFAULT_TEMPLATE,
    DatasetError,
    DatasetInfo,
    at_line,
    jsonl_objects,
    read_text,
    require_root,
)
from .columns import Columns, Sample, build_info, label_value, map_splits, text_and_ingredients

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
LAYOUT_HELP = ("imagefolder layout: <root>/train/, <root>/test/ (and <root>/validation/ or "
               "val/), each with metadata.csv or metadata.jsonl (file_name, label, text) and "
               "its images; or one <root>/metadata.csv whose file_name starts with the split")


def split_folders(root: Path) -> dict[str, Path]:
    """The root's sub-folders by name (hidden ones left out): the candidate split folders."""
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith((".", "__"))}


def find_metadata(folder: Path) -> Path | None:
    """``metadata.csv`` or ``metadata.jsonl`` in ``folder`` (both is an error), or None."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise DatasetError(f"{folder} has both {METADATA_FILES[0]} and {METADATA_FILES[1]}; "
                           "keep one")
    return found[0] if found else None


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        rows, line_no = [], reader.line_num + 1
        for fields in reader:
            start, line_no = line_no, reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise at_line(path, start, f"expected {len(header)} comma-separated fields "
                              f"({','.join(header)}), found {len(fields)}; quote fields that "
                              "contain commas")
            rows.append((start, dict(zip(header, fields))))
    except csv.Error as exc:
        raise at_line(path, reader.line_num, f"malformed CSV ({exc})") from None
    return header, rows


def _jsonl_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows = list(jsonl_objects(path, "file_name"))
    return list(dict.fromkeys(key for _, row in rows for key in row)), rows


def read_metadata(path: Path, columns: Columns) -> tuple[bool, list[tuple[int, dict[str, Any]]]]:
    """``(labels from a column?, rows)`` of a metadata file; ``file_name`` and a text or
    ingredients column are required."""
    header, rows = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    if "file_name" not in header:
        raise DatasetError(f"{path}: no file_name column (columns: {', '.join(header) or 'none'})"
                           f"; it holds each image's path relative to {path.parent}")
    columns.require_text(header, str(path))
    if not rows:
        raise DatasetError(f"{path}: no rows; expected one row per image")
    return columns.label in header, rows


def image_path(where: str, value: Any) -> PurePosixPath:
    """``file_name`` as a relative path inside the metadata file's folder."""
    text = value if isinstance(value, str) else ""
    relative = PurePosixPath(text.replace("\\", "/"))
    if not text or relative.is_absolute() or ".." in relative.parts or "://" in text:
        raise DatasetError(f"{where}: file_name {value!r} must be a relative path inside the "
                           "metadata file's folder (like 'cats/001.jpg'), with no '..'")
    return relative


def _sample(where: str, row: dict[str, Any], split: str, image: Path, in_split: PurePosixPath,
            root: Path, label_column: bool, columns: Columns) -> Sample:
    """One metadata row; ``in_split`` is the image's path below its split folder (its parent
    folder is the class when the metadata has no label column)."""
    if label_column:
        label = label_value(row.get(columns.label), where, columns.label)
    elif len(in_split.parts) > 1:
        label = in_split.parent.name
    else:
        raise DatasetError(f"{where}: no label: the metadata has no {columns.label!r} column "
                           f"and {in_split} is not in a class sub-folder; add the column (or "
                           "name it with --label-column) or put the image in <split>/<class>/")
    text, ingredients = text_and_ingredients(row, where, columns)
    return Sample(where, split, image.relative_to(root).as_posix(), image, label, text,
                  ingredients)


def _split_samples(root: Path, folder: Path, split: str, columns: Columns) -> list[Sample]:
    """The samples of one split folder, from its own metadata file."""
    metadata = find_metadata(folder)
    if metadata is None:
        raise DatasetError(f"{folder}: no {' or '.join(METADATA_FILES)}; imagefolder takes each "
                           f"image's text from the metadata. {LAYOUT_HELP}")
    by_column, rows = read_metadata(metadata, columns)
    samples = []
    for line_no, row in rows:
        where = f"{metadata}:{line_no}"
        relative = image_path(where, row.get("file_name"))
        samples.append(_sample(where, row, split, folder.joinpath(*relative.parts), relative,
                               root, by_column, columns))
    return samples


def _root_samples(root: Path, metadata: Path, mapping: dict[str, str], columns: Columns
                  ) -> list[Sample]:
    """The samples of a root-level metadata file: each file_name starts with its split folder;
    rows in folders no split maps to are left out."""
    by_column, rows = read_metadata(metadata, columns)
    ours = {theirs: split for split, theirs in mapping.items()}
    samples = []
    for line_no, row in rows:
        where = f"{metadata}:{line_no}"
        relative = image_path(where, row.get("file_name"))
        if len(relative.parts) < 2:
            raise DatasetError(f"{where}: file_name {str(relative)!r} must start with its split "
                               f"folder ({', '.join(mapping.values())}/...)")
        if relative.parts[0] in ours:
            samples.append(_sample(where, row, ours[relative.parts[0]],
                                   root.joinpath(*relative.parts),
                                   PurePosixPath(*relative.parts[1:]), root, by_column, columns))
    return samples


def load_imagefolder(root: Path, template: str = DEFAULT_TEMPLATE, label_column: str = "label",
                     text_column: str = "text", ingredients_column: str = "ingredients",
                     splits: str | None = None) -> DatasetInfo:
    """The ``imagefolder`` adapter (see the module docstring)."""
    root = require_root(Path(root), LAYOUT_HELP)
    columns = Columns(label_column, text_column, ingredients_column)
    folders = split_folders(root)
    mapping = map_splits(list(folders), splits, str(root))
    root_metadata = find_metadata(root)
    if root_metadata is not None:
        doubled = [folder for folder in folders.values() if find_metadata(folder)]
        if doubled:
            raise DatasetError(f"{root_metadata} and {find_metadata(doubled[0])} both describe "
                               "images; keep the root file or the per-split files")
        samples = _root_samples(root, root_metadata, mapping, columns)
        sources = [root_metadata]
    else:
        samples = [s for split, name in mapping.items()
                   for s in _split_samples(root, folders[name], split, columns)]
        sources = [p for name in mapping.values() if (p := find_metadata(folders[name]))]
    return build_info("imagefolder", root, samples, template, sources, {"splits": mapping})
