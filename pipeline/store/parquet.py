"""Export a complete cache as Parquet, one file per split, for pandas, DuckDB, Hugging Face
``datasets`` and any other Arrow reader.

``<out>/<split>.parquet`` holds one row per cache row and one column per cache field, under
the field's name: ``id`` (string), ``label`` (int32), ``valid`` (uint8), ``ingredients``
(``fixed_size_list<uint8, I>``), ``visual`` and ``text`` (``fixed_size_list<float, D>``:
float16 and float32 caches as stored, bfloat16 as float32, exactly), and with ``tokens`` the
token fields (``visual_tokens`` ``[L, D]`` as a list of lists, ``text_tokens``, ``text_mask``).
A ``sentence`` column adds the text each row's ``text`` features were computed from.

Each cache shard is read, written as one row group and dropped, so memory stays at one shard.
A file is written under a temporary name and renamed when whole. The cache key, the key inputs
(backbones, weights digests, dataset digest), class names and ingredient vocabulary travel in
the Parquet schema metadata (``marnet``, JSON; plus a few flat ``marnet.*`` keys).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.config import require_modules
from .cache import TEXT_TABLE, TEXT_TABLE_META, FeatureCache, from_storage, is_feature, to_storage
from .errors import CacheError
from .location import read_bytes, read_text
from .manage import refuse_overwrite

INSTALL_HINT = "Parquet export needs pyarrow: pip install 'marnet[parquet]'"
TOKEN_FIELDS = ("visual_tokens", "text_tokens", "text_mask")
SENTENCE = "sentence"
FIRST_COLUMNS = ("id", "label", "valid", SENTENCE)  # then the others in the cache's order
FORMAT = "marnet-parquet/1"


def require_pyarrow() -> Any:
    """The ``pyarrow`` module (with ``pyarrow.parquet`` loaded), or a :class:`ConfigError`
    with the install hint."""
    return require_modules(["pyarrow", "pyarrow.parquet"], INSTALL_HINT)[0]


@dataclass(frozen=True)
class Sentences:
    """Which text each row's ``text`` features come from: the cache keeps the features of
    every unique text beside its arrays, and a row's features are that table's row cast to
    the cache dtype, so equal bytes name the text. Texts whose features are bit-identical
    (cut to the same tokens by ``--max-length``) cannot be told apart: their rows get null."""

    text_of: dict[bytes, str | None]  # stored text-feature bytes -> text (None: ambiguous)
    ambiguous_texts: int

    @classmethod
    def read(cls, cache: FeatureCache) -> "Sentences | None":
        """The table of ``cache``, or None when it has none (removed, or copied without it)."""
        try:
            meta, blob = read_text(cache.root, TEXT_TABLE_META), read_bytes(cache.root, TEXT_TABLE)
        except FileNotFoundError:
            return None
        try:
            texts, table = json.loads(meta)["texts"], np.load(io.BytesIO(blob))
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheError(f"{cache.root}: {TEXT_TABLE_META} or {TEXT_TABLE} cannot be read "
                             f"({exc}); the cache is damaged: extract it again") from None
        if len(texts) != len(table):
            raise CacheError(f"{cache.root}: {TEXT_TABLE} holds {len(table)} rows for "
                             f"{len(texts)} texts in {TEXT_TABLE_META}; the cache is damaged")
        stored = to_storage(torch.from_numpy(table), cache.dtype)
        text_of: dict[bytes, str | None] = {}
        ambiguous = 0
        for text, row in zip(texts, stored):
            key = row.tobytes()
            if key in text_of:
                ambiguous += 1
                text_of[key] = None
            else:
                text_of[key] = text
        return cls(text_of, ambiguous)

    def of_rows(self, text_rows: np.ndarray, ids: np.ndarray) -> list[str | None]:
        """The text of each stored text-feature row (None where ambiguous); a row matching no
        text is a :class:`CacheError` naming its id (the table is not this cache's)."""
        out = []
        for row, row_id in zip(np.ascontiguousarray(text_rows), ids):
            key = row.tobytes()
            if key not in self.text_of:
                raise CacheError(f"the text features of row {str(row_id)!r} match no text of "
                                 f"{TEXT_TABLE_META}: the table does not belong to these "
                                 "features; extract the cache again")
            out.append(self.text_of[key])
        return out


def export_fields(cache: FeatureCache, tokens: bool) -> list[str]:
    """The cache fields exported: all but the token fields, which need ``tokens`` (and a cache
    extracted with ``--tokens``)."""
    fields = list(cache.manifest["splits"][cache.splits[0]]["fields"])
    if tokens and not any(f in TOKEN_FIELDS for f in fields):
        raise CacheError(f"--tokens: the cache at {cache.root} has no token fields (it was "
                         "extracted without `--tokens`); export without --tokens")
    return [f for f in fields if tokens or f not in TOKEN_FIELDS]


def _export_dtype(field: str, spec: dict[str, Any], cache_dtype: str) -> str:
    """numpy dtype name of a field's exported values (bfloat16 features as float32)."""
    if is_feature(field):
        return "float32" if cache_dtype == "bfloat16" else cache_dtype
    return spec["dtype"]


def _arrow_type(pa: Any, dtype: str, shape: list[int]) -> Any:
    """string, or the numeric type wrapped in one fixed-size list per row dimension."""
    arrow = pa.string() if dtype == "str" else pa.from_numpy_dtype(np.dtype(dtype))
    for size in reversed(shape):
        arrow = pa.list_(arrow, size)
    return arrow


def _column(pa: Any, field: str, values: np.ndarray, dtype: str, shape: list[int],
            cache_dtype: str) -> Any:
    """One shard's rows of ``field`` as an Arrow array of the exported type."""
    if dtype == "str":
        return pa.array([str(v) for v in values], pa.string())
    if is_feature(field):
        values = from_storage(values, cache_dtype).to(getattr(torch, dtype)).numpy()
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(shape):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _metadata(cache: FeatureCache, split: str, columns: dict[str, dict[str, Any]],
              sentences: Sentences | None) -> dict[bytes, bytes]:
    """The schema metadata of a split's file: everything as JSON under ``marnet``, and the
    key, dataset digest and backbones as flat ``marnet.*`` keys for tools that list them."""
    m, inputs = cache.manifest, cache.manifest["inputs"]
    full = {"format": FORMAT, "key": m["key"], "split": split,
            "rows": m["splits"][split]["rows"], "dtype": cache.dtype, "columns": columns,
            "sentence": None if sentences is None else {
                "from": TEXT_TABLE_META, "ambiguous_texts": sentences.ambiguous_texts},
            "inputs": inputs, "class_names": cache.class_names,
            "ingredients": m.get("ingredients", []), "source": str(cache.root)}
    flat = {"key": m["key"], "dataset": inputs["dataset"]["name"],
            "dataset_digest": inputs["dataset"]["digest"], "visual": inputs["visual"]["model"],
            "visual_weights": inputs["visual"]["weights"],
            "visual_weights_digest": inputs["visual"]["weights_digest"],
            "text": inputs["text"]["model"],
            "text_weights_digest": inputs["text"]["weights_digest"]}
    return {b"marnet": json.dumps(full, default=str).encode(),
            **{f"marnet.{k}".encode(): str(v).encode() for k, v in flat.items()}}


def _split_schema(pa: Any, cache: FeatureCache, split: str, fields: list[str],
                  sentences: Sentences | None) -> Any:
    """The Arrow schema of a split's file, with its metadata; ``columns`` in the metadata
    records each column's cache dtype, exported dtype and per-row shape."""
    specs = cache.manifest["splits"][split]["fields"]
    columns = {f: {"cache_dtype": cache.dtype if is_feature(f) else specs[f]["dtype"],
                   "dtype": _export_dtype(f, specs[f], cache.dtype), "shape": specs[f]["shape"]}
               for f in fields}
    if sentences is not None:
        columns[SENTENCE] = {"cache_dtype": None, "dtype": "str", "shape": []}
    names = [c for c in FIRST_COLUMNS if c in columns] + \
        [c for c in columns if c not in FIRST_COLUMNS]
    schema = pa.schema([pa.field(c, _arrow_type(pa, columns[c]["dtype"], columns[c]["shape"]))
                        for c in names])
    return schema.with_metadata(_metadata(cache, split, {c: columns[c] for c in names},
                                          sentences))


def _shard_table(pa: Any, cache: FeatureCache, split: str, shard: dict, schema: Any,
                 sentences: Sentences | None) -> Any:
    """One committed shard (checksums checked) as a table of ``schema``."""
    meta = json.loads(schema.metadata[b"marnet"])["columns"]
    raw = {name: cache.read_shard(split, name, shard) for name in schema.names
           if name != SENTENCE}
    arrays = []
    for name in schema.names:
        if name == SENTENCE:
            arrays.append(pa.array(sentences.of_rows(raw["text"], raw["id"]), pa.string()))
        else:
            arrays.append(_column(pa, name, raw[name], meta[name]["dtype"],
                                  meta[name]["shape"], cache.dtype))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_split(pa: Any, cache: FeatureCache, split: str, fields: list[str], target: Path,
                 sentences: Sentences | None) -> dict[str, Any]:
    """Write ``split`` to ``target`` (temp name, then rename), one row group per shard."""
    import pyarrow.parquet as pq

    schema = _split_schema(pa, cache, split, fields, sentences)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shards = sorted(cache.shard_list(split), key=lambda s: s["index"])
    nulls = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for shard in shards:
                table = _shard_table(pa, cache, split, shard, schema, sentences)
                if sentences is not None:
                    nulls += table.column(SENTENCE).null_count
                writer.write_table(table, row_group_size=max(1, len(table)))
                del table  # one shard in memory at a time
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": str(target), "rows": cache.manifest["splits"][split]["rows"],
            "row_groups": len(shards), "columns": list(schema.names),
            "sentence_nulls": nulls if sentences is not None else None}


def export_parquet(path: Path | str, out: Path | str, tokens: bool = False, force: bool = False,
                   on_split: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the complete cache at ``path`` as ``<out>/<split>.parquet`` (see the module doc).

    ``tokens`` also exports the token fields (large: ``L x D`` values per row). Existing files
    are refused unless ``force``; an incomplete cache is refused. ``on_split(split)`` is called
    after each split. Returns the key and, per split, the file, rows, row groups, columns and
    how many rows have no ``sentence`` (None when the cache has no unique-text table, which
    then leaves the column out).
    """
    pa = require_pyarrow()
    cache = FeatureCache(path).require_complete()
    fields = export_fields(cache, tokens)
    out = Path(out)
    targets = {split: out / f"{split}.parquet" for split in cache.splits}
    refuse_overwrite(targets.values(), force)
    sentences = Sentences.read(cache)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, target in targets.items():
        splits[split] = _write_split(pa, cache, split, fields, target, sentences)
        if on_split:
            on_split(split)
    return {"key": cache.key, "splits": splits, "sentence": sentences is not None}


__all__ = ["INSTALL_HINT", "Sentences", "export_fields", "export_parquet", "require_pyarrow"]
