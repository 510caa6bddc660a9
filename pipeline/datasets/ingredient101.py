"""Ingredient-101 (Bolaños, Ferrà, Radeva 2017), read exactly as released (datasets §2, §5).

Layout::

    <root>/Annotations/                 (any case: annotations/ works too)
        classes.txt                     one Food-101 class name per line; line i = label i
        ingredients.txt                 line i: comma-separated ingredients of class i (complete)
        ingredients_simplified.txt      the same, simplified names (``ingredients="simplified"``)
        {train,val,test}_images.txt     "<class_name>/<food101_id>" per line, no extension
        {train,val,test}_labels.txt     one 0-based class index per line, aligned with *_images
    <images_root>/<class_name>/<id>.jpg the Food-101 images (default ``<root>/images``)

Ingredients are per class: every image of class i gets line i of the ingredient file, so the
text is per class too (``info.extra["text_level"] == "class"``). The vocabulary is the sorted
set of all names, stored in the cache manifest. Class order comes from ``classes.txt`` only
(Food-101 puts ``cheesecake`` before ``cheese_plate``; sorting would swap them), and every
line is cross-checked: ``classes[label] == image_line.split('/')[0]``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DatasetError,
    DatasetInfo,
    Record,
    UniqueIds,
    at_line,
    case_only_groups,
    read_lines,
    read_names,
    render_text,
    require_dir,
    require_file,
    require_root,
    warn,
    warn_on_unofficial_counts,
)

ANNOTATION_DIR = "Annotations"
INGREDIENT_FILES = {"complete": "ingredients.txt", "simplified": "ingredients_simplified.txt"}
OFFICIAL_COUNTS = {"classes": 101, "train": 68_175, "val": 7_575, "test": 25_250}
OFFICIAL_VOCABULARY = {"complete": 446, "simplified": 227}
_IMAGE_LINE = re.compile(r"^([^/\s]+)/([^/\s]+)$")
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png)$", re.IGNORECASE)

LAYOUT_HELP = (
    "Ingredient-101 layout: <root>/Annotations/{classes,ingredients,ingredients_simplified}.txt "
    "and {train,val,test}_{images,labels}.txt; the Food-101 images under <root>/images/ "
    "or the folder given by --images-root"
)


def find_annotations(root: Path) -> Path:
    """The ``Annotations`` folder of ``root``, matched case-insensitively."""
    require_root(root, LAYOUT_HELP)
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() == "annotations")
    if not found:
        raise DatasetError(f"missing annotation folder: expected {root / ANNOTATION_DIR} "
                           f"(any case). {LAYOUT_HELP}")
    if len(found) > 1:
        raise DatasetError(f"{root} has {len(found)} annotation folders "
                           f"({', '.join(p.name for p in found)}); keep one")
    return found[0]


def resolve_images_root(root: Path, images_root: Path | str | None, classes: list[str]) -> Path:
    """The Food-101 ``images/`` folder: ``images_root`` if given, else ``<root>/images``.

    It must hold at least one folder named after a class, so a wrong folder fails here and
    not as 101,000 missing images.
    """
    folder = Path(images_root) if images_root is not None else root / "images"
    nested = folder / "images"
    hint = (f"did you mean {nested}? " if nested.is_dir() else "") + (
        "Pass the Food-101 images folder (food-101/images, one sub-folder per class) "
        "with --images-root")
    require_dir(folder, "Food-101 images folder", hint)
    if not any((folder / name).is_dir() for name in classes):
        raise DatasetError(f"{folder} holds no folder named after a class of classes.txt "
                           f"(expected e.g. {folder / classes[0]}/). {hint}")
    return folder


def parse_ingredient_line(line: str) -> list[str]:
    """Split one line on commas, strip, drop empty entries and repeats (first one kept)."""
    names = (name.strip() for name in line.split(","))
    return list(dict.fromkeys(name for name in names if name))


def read_class_ingredients(path: Path, num_classes: int) -> list[list[str]]:
    """One de-duplicated ingredient list per class, in ``classes.txt`` order."""
    lines = read_lines(require_file(path, f"ingredient list ({path.name})"))
    if len(lines) != num_classes:
        raise DatasetError(f"{path}: expected one non-empty line per class of classes.txt "
                           f"({num_classes}), found {len(lines)}")
    return [parse_ingredient_line(line) for _, line in lines]


def build_vocabulary(per_class: list[list[str]], path: Path, official: int) -> list[str]:
    """The sorted set of all ingredient names; warn on an unusual size or case-only repeats."""
    vocabulary = sorted({name for names in per_class for name in names})
    if len(vocabulary) != official:
        warn(f"{path}: {len(vocabulary):,} unique ingredients, the official release has "
             f"{official:,} (fine for a partial copy; check the download otherwise)")
    merged = case_only_groups(vocabulary)
    if merged:
        warn(f"{path}: {len(merged)} group(s) of ingredient names differ only in case and are "
             f"kept apart (e.g. {' / '.join(merged[0])}); lowercasing would merge them")
    return vocabulary


def _image_path(path: Path, line_no: int, line: str, classes: list[str], label: int) -> str:
    """Check one ``*_images.txt`` line against its label and return the class-relative path."""
    match = _IMAGE_LINE.match(line)
    if match is None or _IMAGE_SUFFIX.search(line):
        raise at_line(path, line_no, "expected '<class_name>/<id>' with no extension, like "
                      f"'apple_pie/1005649', found {line!r}")
    if classes[label] != match.group(1):
        raise at_line(path, line_no, f"image {line!r} is in class folder {match.group(1)!r} "
                      f"but its label {label} is {classes[label]!r} in classes.txt; the "
                      "*_labels.txt line must index the image's class")
    return line


def _label(path: Path, line_no: int, text: str, num_classes: int) -> int:
    """One ``*_labels.txt`` line: a 0-based index into ``classes.txt``."""
    if not text.lstrip("-").isdigit():
        raise at_line(path, line_no, f"expected an integer class index, found {text!r}")
    label = int(text)
    if not 0 <= label < num_classes:
        raise at_line(path, line_no, f"label {label} is outside 0..{num_classes - 1} "
                      "(0-based line index into classes.txt)")
    return label


def read_split(ann: Path, split: str, classes: list[str], images_root: Path,
               class_texts: list[str], class_ingredients: list[tuple[int, ...]],
               ids: UniqueIds) -> list[Record]:
    """Zip ``<split>_images.txt`` with ``<split>_labels.txt`` into records."""
    images_file = require_file(ann / f"{split}_images.txt", f"{split} image list")
    labels_file = require_file(ann / f"{split}_labels.txt", f"{split} label list")
    image_lines, label_lines = read_lines(images_file), read_lines(labels_file)
    if len(image_lines) != len(label_lines):
        raise DatasetError(f"{images_file} has {len(image_lines):,} non-empty lines but "
                           f"{labels_file} has {len(label_lines):,}; they must align line by "
                           "line (one label per image)")
    if not image_lines:
        raise DatasetError(f"{images_file}: the {split} split is empty; it needs one "
                           "'<class_name>/<id>' per line")
    records = []
    for (image_no, image_line), (label_no, label_text) in zip(image_lines, label_lines):
        label = _label(labels_file, label_no, label_text, len(classes))
        image_id = _image_path(images_file, image_no, image_line, classes, label)
        ids.claim(image_id, images_file, image_no)
        records.append(Record(id=image_id, image=images_root / f"{image_id}.jpg", label=label,
                              text=class_texts[label], ingredients=class_ingredients[label]))
    return records


def load_ingredient101(root: Path, template: str = DEFAULT_TEMPLATE,
                       images_root: Path | str | None = None,
                       ingredients: str = "complete") -> DatasetInfo:
    """The ``ingredient101`` adapter: per-class ingredients from the complete or simplified list."""
    if ingredients not in INGREDIENT_FILES:
        raise DatasetError(f"ingredients must be one of {', '.join(INGREDIENT_FILES)}, "
                           f"not {ingredients!r}")
    root = Path(root)
    ann = find_annotations(root)
    classes = read_names(ann / "classes.txt", "class list (classes.txt)")
    image_folder = resolve_images_root(root, images_root, classes)
    ingredient_file = ann / INGREDIENT_FILES[ingredients]
    per_class = read_class_ingredients(ingredient_file, len(classes))
    vocabulary = build_vocabulary(per_class, ingredient_file, OFFICIAL_VOCABULARY[ingredients])
    column = {name: i for i, name in enumerate(vocabulary)}
    class_ingredients = [tuple(sorted(column[n] for n in names)) for names in per_class]
    class_texts = [render_text(template, names) for names in per_class]
    ids = UniqueIds()
    splits = {split: read_split(ann, split, classes, image_folder, class_texts,
                                class_ingredients, ids) for split in SPLITS}
    warn_on_unofficial_counts("ingredient101", {"classes": len(classes),
                              **{s: len(r) for s, r in splits.items()}}, OFFICIAL_COUNTS)
    return DatasetInfo(
        name="ingredient101", root=root, class_names=classes, ingredients=vocabulary,
        splits=splits, template=template,
        extra={"text_level": "class", "ingredient_list": ingredients,
               "images_root": str(image_folder.resolve())},
        source_files=[ann / "classes.txt", ingredient_file,
                      *(ann / f"{s}_{kind}.txt" for s in SPLITS for kind in ("images", "labels"))],
    )
