"""VIREO Food-172 (Chen & Ngo, ACM MM 2016), read exactly as released (datasets §1, §5).

Layout::

    <root>/ready_chinese_food/<1..172>/<name>.jpg
    <root>/SplitAndIngreLabel/{TR,VAL,TE}.txt      "/<class>/<name>.jpg" per line
    <root>/SplitAndIngreLabel/IngreLabel.txt       "<path> " + one of {1,-1} per ingredient
    <root>/SplitAndIngreLabel/IngredientList.txt   one ingredient name per line (column order)
    <root>/SplitAndIngreLabel/FoodList.txt         one dish name per line (line k = folder k)

Labels are 0-based (folder number - 1). Ingredients are joined to split lines by exact path.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    DEFAULT_TEMPLATE,
    DatasetError,
    DatasetInfo,
    Record,
    UniqueIds,
    at_line,
    read_lines,
    read_names,
    render_text,
    require_dir,
    require_file,
    require_root,
    warn,
    warn_on_unofficial_counts,
)

IMAGE_DIR = "ready_chinese_food"
ANNOTATION_DIR = "SplitAndIngreLabel"
SPLIT_FILES = {"train": "TR.txt", "val": "VAL.txt", "test": "TE.txt"}
OFFICIAL_COUNTS = {"classes": 172, "ingredients": 353, "train": 66_071, "val": 11_016, "test": 33_154}
_SPLIT_LINE = re.compile(r"^/(\d+)/[^/\s]+\.(jpe?g|png)$", re.IGNORECASE)

LAYOUT_HELP = (
    "VIREO Food-172 layout: <root>/ready_chinese_food/<1..172>/*.jpg and "
    "<root>/SplitAndIngreLabel/{TR,VAL,TE,IngreLabel,IngredientList,FoodList}.txt"
)


def _present_columns(path: Path, line_no: int, values: list[str],
                     num_ingredients: int) -> tuple[int, ...]:
    """Indices of the ``1`` values of one ``IngreLabel.txt`` line; values other than 1/-1 fail."""
    if len(values) != num_ingredients:
        raise at_line(path, line_no, f"expected {num_ingredients} ingredient values (one per "
                      f"line of IngredientList.txt) after the path, found {len(values)}")
    positives = values.count("1")
    if positives + values.count("-1") != len(values):
        col, value = next((c, v) for c, v in enumerate(values) if v not in ("1", "-1"))
        raise at_line(path, line_no, f"ingredient value {value!r} in column {col + 1} is not "
                      "1 (present) or -1 (absent)")
    present, col = [], -1
    for _ in range(positives):  # list.index scans in C: a line has ~3 positives of 353
        col = values.index("1", col + 1)
        present.append(col)
    return tuple(present)


def _read_ingredient_labels(path: Path, num_ingredients: int) -> dict[str, tuple[int, ...]]:
    """Parse ``IngreLabel.txt`` into ``path -> sorted indices of present ingredients``."""
    table: dict[str, tuple[int, ...]] = {}
    lines = UniqueIds("every image has one ingredient line")
    for line_no, line in read_lines(require_file(path, "ingredient label file (IngreLabel.txt)")):
        key, *values = line.split()
        lines.claim(key, path, line_no)
        table[key] = _present_columns(path, line_no, values, num_ingredients)
    return table


def _read_split(path: Path, split: str, num_classes: int, image_root: Path,
                ingredient_table: dict[str, tuple[int, ...]], ingredient_names: list[str],
                template: str, ids: UniqueIds) -> list[Record]:
    records = []
    for line_no, line in read_lines(require_file(path, f"{split} split file")):
        match = _SPLIT_LINE.match(line)
        if match is None:
            raise at_line(path, line_no, f"expected an image path like '/1/4_41.jpg' "
                          f"(leading slash, class folder, file name), found {line!r}")
        class_id = int(match.group(1))
        if not 1 <= class_id <= num_classes:
            raise at_line(path, line_no, f"class folder {class_id} is outside 1..{num_classes} "
                          "(FoodList.txt has one line per class)")
        if line not in ingredient_table:
            raise at_line(path, line_no, f"{line!r} has no line in IngreLabel.txt "
                          "(paths are matched exactly); add its ingredient line")
        ids.claim(line, path, line_no)
        present = ingredient_table[line]
        records.append(Record(
            id=line,
            image=image_root / line.lstrip("/"),
            label=class_id - 1,
            text=render_text(template, [ingredient_names[i] for i in present]),
            ingredients=present,
        ))
    if not records:
        raise DatasetError(f"{path}: the {split} split is empty; it needs one image path per "
                           "line, like '/1/4_41.jpg'")
    return records


def _warn_unlisted(label_file: Path, table: dict[str, tuple[int, ...]],
                   splits: dict[str, list[Record]]) -> None:
    """Warn about ``IngreLabel.txt`` lines whose path is in no split file."""
    listed = {rec.id for records in splits.values() for rec in records}
    unlisted = [key for key in table if key not in listed]
    if unlisted:
        warn(f"{label_file}: {len(unlisted):,} paths are in no split file "
             f"(first: {unlisted[0]!r}); they are not used")


def read_vireo_layout(root: Path, name: str = "vireo172", template: str = DEFAULT_TEMPLATE,
                      expected_counts: dict[str, int] | None = OFFICIAL_COUNTS) -> DatasetInfo:
    """Read a VIREO Food-172 root (or any dataset written in its layout, like the demo)."""
    root = Path(root)
    require_root(root, LAYOUT_HELP)
    ann = require_dir(root / ANNOTATION_DIR, "annotation folder", LAYOUT_HELP)
    class_names = read_names(ann / "FoodList.txt", "dish list (FoodList.txt)", "warn")
    ingredient_names = read_names(ann / "IngredientList.txt",
                                  "ingredient list (IngredientList.txt)", "warn")
    label_file = ann / "IngreLabel.txt"
    table = _read_ingredient_labels(label_file, len(ingredient_names))
    ids = UniqueIds()
    splits = {
        split: _read_split(ann / fname, split, len(class_names), root / IMAGE_DIR, table,
                           ingredient_names, template, ids)
        for split, fname in SPLIT_FILES.items()
    }
    _warn_unlisted(label_file, table, splits)
    if expected_counts:
        found = {"classes": len(class_names), "ingredients": len(ingredient_names),
                 **{s: len(r) for s, r in splits.items()}}
        warn_on_unofficial_counts(name, found, expected_counts)
    return DatasetInfo(
        name=name, root=root, class_names=class_names, ingredients=ingredient_names,
        splits=splits, template=template, extra={"text_level": "image"},
        source_files=[ann / f for f in (*SPLIT_FILES.values(), "IngreLabel.txt",
                                        "IngredientList.txt", "FoodList.txt")],
    )


def load_vireo172(root: Path, template: str = DEFAULT_TEMPLATE) -> DatasetInfo:
    """The ``vireo172`` adapter: per-image ingredients, text over the ingredients present."""
    return read_vireo_layout(root, "vireo172", template)
