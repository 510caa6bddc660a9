"""``folder``: a generic layout for your own data, an image folder plus one label table.

Layout::

    <root>/images/...                  image files, in any sub-folders
    <root>/labels.csv                  header: path,label,text,split[,ingredients]
      or <root>/labels.jsonl           one JSON object per line with the same keys
    <root>/classes.txt                 optional: one class name per line (line k = class k)

- ``path`` is relative to ``<root>/images/`` (no absolute paths, no ``..``); it is the id.
- ``label``: if every label is an integer, labels are 0-based indices and ``classes.txt``
  (optional) names them; otherwise every label is a class name, and the class order is the
  order of ``classes.txt`` if present, else the sorted unique names.
- ``split`` is ``train``, ``val`` or ``test``; train and test are required, val is optional
  (the trainer then holds out 10% of train).
- ``text`` is the privileged text; when empty it is built from the ingredients with the
  template. ``ingredients`` (optional) is a ``;``-separated list in CSV, a list in JSONL.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from .base import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DatasetError,
    DatasetInfo,
    Record,
    UniqueIds,
    at_line,
    case_only_groups,
    jsonl_objects,
    read_names,
    read_text,
    render_text,
    require_dir,
    require_root,
    warn,
)

IMAGE_DIR = "images"
LABEL_FILES = ("labels.csv", "labels.jsonl")
CLASSES_FILE = "classes.txt"
REQUIRED_COLUMNS = ("path", "label", "split")
TEXT_COLUMNS = ("text", "ingredients")
KNOWN_COLUMNS = REQUIRED_COLUMNS + TEXT_COLUMNS
REQUIRED_SPLITS = ("train", "test")

LAYOUT_HELP = (
    "folder layout: <root>/images/... and <root>/labels.csv (header path,label,text,split"
    "[,ingredients]) or <root>/labels.jsonl; optional <root>/classes.txt"
)


@dataclass(frozen=True)
class Row:
    """One validated line of the label table, before labels are resolved to indices."""

    line_no: int
    path: str
    label: str
    text: str
    split: str
    ingredients: tuple[str, ...]


def find_label_file(root: Path) -> Path:
    """``labels.csv`` or ``labels.jsonl`` at ``root`` (exactly one of them)."""
    require_root(root, LAYOUT_HELP)
    found = [root / name for name in LABEL_FILES if (root / name).is_file()]
    if not found:
        raise DatasetError(f"missing label table: expected {root / LABEL_FILES[0]} or "
                           f"{root / LABEL_FILES[1]}. {LAYOUT_HELP}")
    if len(found) > 1:
        raise DatasetError(f"{root} has both {LABEL_FILES[0]} and {LABEL_FILES[1]}; keep one")
    return found[0]


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_no, {column: value})`` per CSV data row; the header must name the columns.

    ``line_no`` is the line a row starts on (a quoted field may span lines).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    line_no = 1
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        _require_columns(path, 1, header)
        line_no = reader.line_num + 1
        for fields in reader:
            start, line_no = line_no, reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                spans = (f"; the row runs on to line {reader.line_num}, is a quote left open?"
                         if reader.line_num > start else "; quote fields that contain commas")
                raise at_line(path, start, f"expected {len(header)} comma-separated fields "
                              f"({','.join(header)}), found {len(fields)}{spans}")
            row = dict(zip(header, (field.strip() for field in fields)))
            if "ingredients" in row:
                row["ingredients"] = row["ingredients"].split(";")
            yield start, row
    except csv.Error as exc:
        raise at_line(path, line_no, f"malformed CSV ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_no, object)`` per non-empty JSONL line."""
    keys = f"keys {', '.join(REQUIRED_COLUMNS + TEXT_COLUMNS)}"
    for line_no, row in jsonl_objects(path, keys):
        _require_columns(path, line_no, list(row))
        yield line_no, row


def _require_columns(path: Path, line_no: int, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise at_line(path, line_no, f"column {repeated[0]!r} is named twice; name each once")
    for name in names:
        close = difflib.get_close_matches(name, KNOWN_COLUMNS, n=1, cutoff=0.75)
        if name not in KNOWN_COLUMNS and close and close[0] not in names:
            raise at_line(path, line_no, f"column {name!r} is not one marnet reads; did you mean "
                          f"{close[0]!r}? Rename it (columns: {', '.join(KNOWN_COLUMNS)}; others "
                          "are ignored)")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing or not any(name in names for name in TEXT_COLUMNS):
        raise at_line(path, line_no, f"expected the columns {', '.join(REQUIRED_COLUMNS)} and "
                      f"text and/or ingredients, found {', '.join(names) or 'none'}")


def _warn_extra_columns(path: Path, names: set[str]) -> None:
    """One warning naming the columns the table has and marnet does not read."""
    extra = sorted(names - set(KNOWN_COLUMNS))
    if extra:
        warn(f"{path}: column(s) {', '.join(map(repr, extra))} are not read (marnet reads "
             f"{', '.join(KNOWN_COLUMNS)})")


def _string(path: Path, line_no: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise at_line(path, line_no, f"{key} must be a string or a number, found "
                      f"{json.dumps(value)}")
    return str(value).strip()


def _ingredient_names(path: Path, line_no: int, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise at_line(path, line_no, "ingredients must be a list of strings (JSONL) or a "
                      f"';'-separated list (CSV), found {json.dumps(value)}")
    return tuple(dict.fromkeys(name.strip() for name in value if name.strip()))


def _image_path(path: Path, line_no: int, value: str) -> str:
    """The image path relative to ``images/``, normalised; absolute paths and ``..`` refused."""
    relative = PurePosixPath(value.replace("\\", "/"))
    if (not value or relative.is_absolute() or PureWindowsPath(value).drive
            or ".." in relative.parts):
        raise at_line(path, line_no, f"path {value!r} must be relative to {IMAGE_DIR}/ "
                      "(like 'cats/001.jpg'), with no '..'")
    return relative.as_posix()


def parse_row(path: Path, line_no: int, row: dict[str, Any]) -> Row:
    """Validate one label-table row (CSV or JSONL) into a :class:`Row`."""
    split = _string(path, line_no, row, "split").lower()
    if split not in SPLITS:
        raise at_line(path, line_no, f"split must be one of {', '.join(SPLITS)}, "
                      f"found {row.get('split')!r}")
    label = _string(path, line_no, row, "label")
    if not label:
        raise at_line(path, line_no, "label is empty; give a class name or a 0-based index")
    ingredients = _ingredient_names(path, line_no, row.get("ingredients"))
    text = _string(path, line_no, row, "text")
    if not text and not ingredients:
        raise at_line(path, line_no, "text and ingredients are both empty; give the image's "
                      "text, or its ingredients to build the text from the template")
    return Row(line_no, _image_path(path, line_no, _string(path, line_no, row, "path")),
               label, text, split, ingredients)


def read_rows(path: Path) -> list[Row]:
    """All rows of ``labels.csv`` / ``labels.jsonl``, validated, ids unique."""
    parsed = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    rows, ids, columns = [], UniqueIds(), set()
    for line_no, raw in parsed:
        row = parse_row(path, line_no, raw)
        ids.claim(row.path, path, row.line_no)
        rows.append(row)
        columns.update(raw)
    _warn_extra_columns(path, columns)
    return rows


def _is_index(label: str) -> bool:
    return label.lstrip("-").isdigit()


@dataclass(frozen=True)
class ClassIndex:
    """Class names and the rule that maps a row's label to its 0-based index."""

    names: list[str]
    by_index: bool
    order: str  # where the class order comes from: classes.txt, integer labels or sorted names

    @cached_property
    def positions(self) -> dict[str, int]:
        """Class name -> index."""
        return {name: i for i, name in enumerate(self.names)}

    def index(self, path: Path, row: Row) -> int:
        """The 0-based class index of ``row``; unknown names and indices are errors."""
        if self.by_index:
            label = int(row.label)
            if not 0 <= label < len(self.names):
                raise at_line(path, row.line_no, f"label {label} is outside "
                              f"0..{len(self.names) - 1} (0-based index; classes from "
                              f"{self.order})")
            return label
        if row.label not in self.positions:
            raise at_line(path, row.line_no, f"label {row.label!r} is not a class in "
                          f"{self.order}; add it there or fix the label")
        return self.positions[row.label]


def _labels_by_index(path: Path, rows: list[Row]) -> bool:
    """True if every label is an integer, False if every label is a name; mixing is an error."""
    by_index = _is_index(rows[0].label)
    for row in rows:
        if _is_index(row.label) != by_index:
            raise at_line(path, row.line_no, f"label {row.label!r} mixes with line "
                          f"{rows[0].line_no}'s {rows[0].label!r}; use class names or 0-based "
                          "integer indices throughout")
    return by_index


def _warn_unused_indices(rows: list[Row], count: int) -> None:
    used = {int(row.label) for row in rows}
    unused = [i for i in range(count) if i not in used]
    if unused:
        warn(f"labels are 0-based indices but {len(unused)} of 0..{count - 1} have no image "
             f"(first: {unused[0]}); if your labels start at 1, subtract 1")


def class_index(root: Path, label_file: Path, rows: list[Row]) -> ClassIndex:
    """Decide how labels map to classes: integer indices, or names (see the module doc)."""
    by_index = _labels_by_index(label_file, rows)
    classes_file = root / CLASSES_FILE
    if classes_file.is_file():
        index = ClassIndex(read_names(classes_file, "class names"), by_index, CLASSES_FILE)
    elif by_index:
        count = max(int(row.label) for row in rows) + 1
        _warn_unused_indices(rows, count)
        index = ClassIndex([str(i) for i in range(count)], True, "integer labels")
    else:
        index = ClassIndex(sorted({row.label for row in rows}), False, "sorted label names")
    groups = case_only_groups(index.names)
    if groups:
        where = classes_file if index.order == CLASSES_FILE else label_file
        warn(f"{where}: {len(groups)} group(s) of class names differ only in case and are "
             f"separate classes (e.g. {' / '.join(groups[0])}); if they are one class, write "
             "its name one way")
    return index


def load_folder(root: Path, template: str = DEFAULT_TEMPLATE) -> DatasetInfo:
    """The ``folder`` adapter: ``images/`` plus ``labels.csv`` or ``labels.jsonl``."""
    root = Path(root)
    label_file = find_label_file(root)
    image_root = require_dir(root / IMAGE_DIR, "image folder", LAYOUT_HELP)
    rows = read_rows(label_file)
    if not rows:
        raise DatasetError(f"{label_file}: no rows; expected one row per image")
    classes = class_index(root, label_file, rows)
    vocabulary = sorted({name for row in rows for name in row.ingredients})
    column = {name: i for i, name in enumerate(vocabulary)}
    splits: dict[str, list[Record]] = {}
    for row in rows:
        splits.setdefault(row.split, []).append(Record(
            id=row.path, image=image_root / row.path, label=classes.index(label_file, row),
            text=row.text or render_text(template, row.ingredients),
            ingredients=tuple(sorted(column[name] for name in row.ingredients))))
    for split in REQUIRED_SPLITS:
        if split not in splits:
            raise DatasetError(f"{label_file}: no rows with split {split!r}; train and test "
                               "are required (val is optional)")
    classes_file = root / CLASSES_FILE
    source_files = [label_file, *([classes_file] if classes_file.is_file() else [])]
    return DatasetInfo(
        name="folder", root=root, class_names=classes.names, ingredients=vocabulary,
        splits={split: splits[split] for split in SPLITS if split in splits},
        template=template, source_files=source_files,
        extra={"text_level": "image", "labels": "index" if classes.by_index else "name",
               "class_order": classes.order},
    )
