"""``hf``: a ``save_to_disk`` dataset or Parquet files, images inside (datasets §6.2).

Two layouts at ``<root>``:

- ``dataset_dict.json`` plus one folder per split (what ``DatasetDict.save_to_disk`` writes),
  read with ``datasets.load_from_disk``; the records point into its memory-mapped Arrow files;
- ``*.parquet`` files anywhere below the root (``data/train-00000-of-00002.parquet``,
  ``test.parquet``, ``default/train/0000.parquet``): each file's split is the leading word of
  its name, else its folder's name; a split's files are read in sorted path order. Their
  columns' meaning (``Image``, ``ClassLabel``) comes from the schema through
  ``datasets.Features``.

The image column (``--image-column``; default: the one ``Image`` column) holds ``{bytes, path}``
structs; images are decoded from their bytes (:class:`~pipeline.datasets.sources.TableCell`).
A row with no bytes whose ``path`` is an existing file reads that file; without either it is an
error naming the file and row. Labels come from ``--label-column`` (a ``ClassLabel`` gives the
class names), texts from ``--text-column``, or ``--template`` over ``--ingredients-column``;
``--splits`` maps the dataset's split names (default: ``train``, ``validation``/``val``,
``test``). The record id is ``<split>/<row>`` (the row within the split, from 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import DEFAULT_TEMPLATE, DatasetError, DatasetInfo, require_root
from .columns import (
    Columns,
    Sample,
    build_info,
    label_value,
    map_splits,
    require_module,
    split_of,
    text_and_ingredients,
)
from .sources import ImageRef, TableCell, binary_fingerprints, read_arrow, struct_child

LAYOUT_HELP = ("hf layout: a DatasetDict saved with save_to_disk (dataset_dict.json and one "
               "folder per split), or Parquet files named by split (train-00000-of-00001.parquet"
               ", test.parquet) with an image column of {bytes, path}")


@dataclass
class Table:
    """One Arrow or Parquet file of a split: the columns marnet reads, row by row."""

    path: Path
    features: Any  # datasets.Features
    values: dict[str, list[Any]]  # label, text and ingredient columns that exist
    fingerprints: list[str | None]  # per row: the image bytes' fingerprint, None without bytes
    image_paths: list[str | None]  # per row: the image column's path


def is_image(feature: Any) -> bool:
    """An ``Image`` feature, or a plain struct of ``bytes`` (binary) and ``path`` (a Parquet
    file written without the Hugging Face schema metadata)."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    return (isinstance(feature, dict) and set(feature) == {"bytes", "path"}
            and getattr(feature["bytes"], "dtype", "") in ("binary", "large_binary"))


def image_column_of(features: Any, given: str | None, where: str) -> str:
    """The image column: ``given``, else the one image column (:func:`is_image`)."""
    if given is not None:
        if given not in features:
            raise DatasetError(f"{where}: no image column {given!r} (columns: "
                               f"{', '.join(features)}); name it with --image-column")
        if not is_image(features[given]):
            raise DatasetError(f"{where}: column {given!r} is {features[given]}, not an Image "
                               "column of {bytes, path}")
        return given
    images = [name for name, feature in features.items() if is_image(feature)]
    if len(images) != 1:
        found = f"{len(images)} ({', '.join(images)})" if images else "none"
        raise DatasetError(f"{where}: expected one Image column, found {found} (columns: "
                           f"{', '.join(features)}); name it with --image-column")
    return images[0]


def _wanted(features: Any, columns: Columns, where: str) -> list[str]:
    """The label, text and ingredient columns ``features`` has; the label and a text source
    are required."""
    if columns.label not in features:
        raise DatasetError(f"{where}: no label column {columns.label!r} (columns: "
                           f"{', '.join(features)}); name it with --label-column")
    columns.require_text(features, where)
    return [name for name in (columns.label, columns.text, columns.ingredients)
            if name in features]


def _image_struct(chunks: Any) -> tuple[list[str | None], list[str | None]]:
    """Per row of an image column's struct chunks: the bytes' fingerprint (None without
    bytes) and the path."""
    prints = [p for chunk in chunks for p in binary_fingerprints(struct_child(chunk, "bytes"))]
    paths = [p for chunk in chunks for p in struct_child(chunk, "path").to_pylist()]
    return prints, paths


def arrow_table(path: Path, features: Any, image: str, columns: Columns) -> Table:
    """A ``save_to_disk`` Arrow file, memory-mapped: only the bytes each image's fingerprint
    hashes are read."""
    data = read_arrow(str(path))
    wanted = _wanted(features, columns, str(path))
    return Table(path, features, {name: data.column(name).to_pylist() for name in wanted},
                 *_image_struct(data.column(image).chunks))


def parquet_table(path: Path, features: Any, image: str, columns: Columns) -> Table:
    """A Parquet file: the label/text columns, and the images' fingerprints and paths
    (Parquet pages are read whole: each row group's images are read once, here)."""
    import pyarrow.parquet as pq

    wanted = _wanted(features, columns, str(path))
    file = pq.ParquetFile(path)
    prints: list[str | None] = []
    paths: list[str | None] = []
    for group in range(file.metadata.num_row_groups):  # one group's images in memory at a time
        group_prints, group_paths = _image_struct(
            file.read_row_group(group, columns=[image]).column(0).chunks)
        prints += group_prints
        paths += group_paths
    data = file.read(columns=wanted)
    return Table(path, features, {name: data.column(name).to_pylist() for name in wanted},
                 prints, paths)


def saved_splits(root: Path) -> dict[str, list[tuple[Path, Any]]]:
    """``{split: [(arrow file, features)]}`` of a ``save_to_disk`` DatasetDict."""
    datasets = require_module("datasets", "hf", "--dataset hf")
    loaded = datasets.load_from_disk(str(root))
    if not isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(f"{root} holds a single Dataset, not a DatasetDict with splits; save "
                           "DatasetDict({'train': ..., 'test': ...}) instead. " + LAYOUT_HELP)
    return {split: [(Path(f["filename"]), ds.features) for f in ds.cache_files]
            for split, ds in loaded.items()}


def parquet_splits(root: Path) -> dict[str, list[tuple[Path, Any]]]:
    """``{split: [(parquet file, features)]}`` of the Parquet files below ``root``."""
    datasets = require_module("datasets", "hf", "--dataset hf")
    import pyarrow.parquet as pq

    files = sorted(p for p in root.rglob("*.parquet")
                   if not any(part.startswith(".") for part in p.relative_to(root).parts))
    out: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
        out.setdefault(split_of(path), []).append(
            (path, datasets.Features.from_arrow_schema(schema)))
    return out


def _image_ref(table: Table, row: int, image: str, where: str) -> ImageRef:
    if table.fingerprints[row] is not None:
        return TableCell(table.path, row, image, table.fingerprints[row])
    path = table.image_paths[row]
    if path and Path(path).is_file():
        return Path(path)
    raise DatasetError(f"{where}: the image column {image!r} has no bytes and its path "
                       f"{path!r} is not a file; embed the images (Dataset.cast_column with "
                       "Image() before saving) or fix the path")


def table_samples(table: Table, split: str, source: str, first: int, image: str,
                  columns: Columns) -> list[Sample]:
    """The samples of one file; ``first`` is its first row's index within the split."""
    samples = []
    for row in range(len(table.fingerprints)):
        where = f"{table.path} row {row}"
        values = {name: column[row] for name, column in table.values.items()}
        label = label_value(values.get(columns.label), where, columns.label)
        text, ingredients = text_and_ingredients(values, where, columns)
        samples.append(Sample(where, split, f"{source}/{first + row}",
                              _image_ref(table, row, image, where), label, text, ingredients))
    return samples


def class_label_names(tables: list[Table], label: str) -> list[str] | None:
    """The class names of a ``ClassLabel`` label column (the same in every file), or None."""
    import datasets

    named = [(t.path, t.features[label].names) for t in tables
             if isinstance(t.features[label], datasets.ClassLabel)]
    for path, names in named:
        if names != named[0][1]:
            raise DatasetError(f"{path}: its ClassLabel names differ from {named[0][0]}'s; "
                               "every split must share one list of classes")
    return named[0][1] if named else None


def load_hf(root: Path, template: str = DEFAULT_TEMPLATE, image_column: str | None = None,
            label_column: str = "label", text_column: str = "text",
            ingredients_column: str = "ingredients", splits: str | None = None) -> DatasetInfo:
    """The ``hf`` adapter (see the module docstring)."""
    root = require_root(Path(root), LAYOUT_HELP)
    columns = Columns(label_column, text_column, ingredients_column)
    saved = (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
    files = saved_splits(root) if saved else parquet_splits(root)
    if not files:
        raise DatasetError(f"{root}: no dataset_dict.json and no .parquet files. {LAYOUT_HELP}")
    mapping = map_splits(list(files), splits, str(root))
    samples, tables = [], []
    for split, source in mapping.items():
        first = 0
        for path, features in files[source]:
            image = image_column_of(features, image_column, str(path))
            read = arrow_table if path.suffix == ".arrow" else parquet_table
            tables.append(read(path, features, image, columns))
            samples += table_samples(tables[-1], split, source, first, image, columns)
            first += len(tables[-1].fingerprints)
    # a saved DatasetDict's features (class names among them) are in its JSON files
    source_files = [root / "dataset_dict.json", *sorted(root.glob("*/dataset_info.json"))] \
        if (root / "dataset_dict.json").is_file() else []
    return build_info("hf", root, samples, template, source_files, {"splits": mapping},
                      class_label_names(tables, columns.label))

