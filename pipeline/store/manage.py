"""Cache housekeeping: list, describe, remove, and export to ``.npy`` for other tools."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .cache import (
    MANIFEST,
    CacheError,
    FeatureCache,
    committed_shards,
    from_storage,
    is_feature,
    read_manifest,
    record_path,
    write_json_atomic,
)
from .location import find, is_url, require_local
from .lock import CacheLock


def list_caches(root: Path | str) -> list[Path | str]:
    """Every cache directory (one holding a manifest) below ``root`` (a path or a URL); a
    local ``root`` that is not a folder is an error (a typo would otherwise list 0 caches)."""
    if not is_url(root) and not Path(root).is_dir():
        what = "is a file" if Path(root).exists() else "does not exist"
        raise CacheError(f"cache root {root} {what}; pass the folder caches are written to "
                         "(`marnet extract --cache-dir`; default $MARNET_CACHE or cache)")
    return find(root, MANIFEST)


def remove_cache(path: Path | str) -> None:
    """Delete a cache directory, refusing folders that are not caches and caches being written.

    The lock is taken first (a stale one from a dead extraction is taken over) and removed with
    the folder, so no extraction can start in between.
    """
    path = require_local(path, "remove")
    read_manifest(path)
    CacheLock(path).acquire()
    shutil.rmtree(path)


def repair_cache(path: Path | str, on_shard: Callable[[], None] | None = None
                 ) -> tuple[list[str], list[tuple[str, int]]]:
    """Verify a cache and make it resumable where it is damaged: drop the commit record and
    the stored data of every shard that fails its checks, so that running its ``marnet
    extract`` again rewrites those shards and nothing else.

    The cache is marked incomplete (stage two refuses it until the extraction has run) when a
    shard was dropped or the manifest's shard lists disagree with the records. Holds the lock
    throughout, so it refuses a cache being written. Returns the problems found (as
    :meth:`FeatureCache.verify`) and the dropped ``(split, index)``.
    """
    root = require_local(path, "repair")
    with CacheLock(root):
        cache = FeatureCache(root)
        damaged: list[tuple[str, int]] = []
        problems = cache.verify(on_shard, damaged)
        # records first, manifest second: killed in between, the cache still says complete
        # and the next verify finds the same shards; the other order could leave an
        # "incomplete" cache whose damaged shards still look committed to extract
        for split, index in damaged:
            record_path(root, split, index).unlink(missing_ok=True)
            cache.discard_shard_data(split, index)
        if cache.complete and problems:
            manifest = {k: v for k, v in cache.manifest.items() if k != "completed"}
            write_json_atomic(root / MANIFEST, {**manifest, "status": "incomplete",
                                                "repaired": [f"{s}/{i}" for s, i in damaged]})
        return problems, damaged


def _size_bytes(path: Path | str) -> int | None:
    if is_url(path):
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cache_info(path: Path | str) -> dict[str, Any]:
    """What ``marnet cache info`` shows: status, rows per split, fields, key inputs, skips."""
    cache = FeatureCache(path)
    m = cache.manifest
    splits = {}
    for split, meta in m["splits"].items():
        committed = (meta["num_shards"] if cache.complete
                     else len(committed_shards(cache.root, split)))
        splits[split] = {"rows": meta["rows"], "valid_rows": meta.get("valid_rows"),
                         "shards": meta["num_shards"], "committed_shards": committed,
                         "shard_rows": meta["shard_rows"], "fields": meta["fields"]}
    lock = None if is_url(cache.root) else CacheLock(cache.root)
    holder = lock.holder() if lock else {}
    return {
        "path": str(cache.root), "key": m["key"], "status": m.get("status"),
        "complete": cache.complete, "committed_shards": cache.num_committed(),
        "total_shards": cache.num_shards(), "format": m["format"], "dtype": m["dtype"],
        "dims": m.get("dims", {}), "splits": splits, "inputs": m["inputs"],
        "skipped": m.get("skipped", []), "timings": m.get("timings", {}),
        "settings": m.get("settings", {}), "versions": m.get("versions", {}),
        "created": m.get("created"), "completed": m.get("completed"),
        "size_bytes": _size_bytes(cache.root),
        "locked_by": {**holder, "stale": lock.stale(holder)} if holder else None,
    }


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Unless ``force``, a ``FileExistsError`` naming the first of ``paths`` that exists
    (the files an export is about to write), before anything is written."""
    existing = [] if force else [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more of the files it writes)" if len(existing) > 1 \
            else ""
        raise FileExistsError(f"{existing[0]} exists{more}; pass --force to replace what an "
                              "earlier export wrote, or export to another folder")


def _npy_targets(cache: FeatureCache, out: Path) -> list[Path]:
    """Every file :func:`export_npy` writes into ``out``."""
    return [out / "index.json"] + [
        out / split / f"{field}.{'txt' if spec['dtype'] == 'str' else 'npy'}"
        for split, meta in cache.manifest["splits"].items()
        for field, spec in meta["fields"].items()]


def export_npy(path: Path | str, out: Path | str,
               on_split: Callable[[str], None] | None = None,
               force: bool = False) -> dict[str, Any]:
    """Write a complete cache as plain files other tools read without marnet.

    ``<out>/<split>/<field>.npy`` per numeric field (bfloat16 features as float32: numpy has no
    bfloat16), ``<out>/<split>/id.txt`` (one id per line), and ``<out>/index.json`` (key, key
    inputs, class names, ingredients, and per split the rows and each file's dtype and shape).
    Written shard by shard through memory maps, so memory use stays at one shard. The index is
    written last: a folder without it is an unfinished export. ``on_split(split)`` is called
    after each split. Files of an earlier export are refused unless ``force``.
    """
    cache = FeatureCache(path).require_complete()
    out = Path(out)
    refuse_overwrite(_npy_targets(cache, out), force)
    index: dict[str, Any] = {
        "key": cache.key, "source": str(cache.root), "inputs": cache.manifest["inputs"],
        "class_names": cache.class_names, "ingredients": cache.manifest.get("ingredients", []),
        "splits": {}}
    for split, meta in cache.manifest["splits"].items():
        (out / split).mkdir(parents=True, exist_ok=True)
        files = {field: _export_field(cache, split, field, meta, out / split)
                 for field in meta["fields"]}
        index["splits"][split] = {"rows": meta["rows"], "files": files}
        if on_split:
            on_split(split)
    write_json_atomic(out / "index.json", index)
    return index


def _export_field(cache: FeatureCache, split: str, field: str, meta: dict[str, Any],
                  folder: Path) -> dict[str, Any]:
    spec = meta["fields"][field]
    if spec["dtype"] == "str":
        return _export_text(cache, split, field, folder / f"{field}.txt")
    feature_bf16 = is_feature(field) and cache.dtype == "bfloat16"
    dtype = np.dtype("float32") if feature_bf16 else np.dtype(spec["dtype"])
    shape = (meta["rows"], *spec["shape"])
    target = np.lib.format.open_memmap(folder / f"{field}.npy", mode="w+", dtype=dtype,
                                       shape=shape)
    for shard in cache.shard_list(split):
        start = shard["index"] * meta["shard_rows"]
        values = cache.read_shard(split, field, shard)
        target[start:start + len(values)] = from_storage(values, "bfloat16").float().numpy() \
            if feature_bf16 else values
    target.flush()
    del target
    return {"file": f"{split}/{field}.npy", "dtype": dtype.name, "shape": list(shape)}


def _export_text(cache: FeatureCache, split: str, field: str, target: Path) -> dict[str, Any]:
    with open(target, "w", encoding="utf-8") as fh:
        for shard in cache.shard_list(split):
            for value in cache.read_shard(split, field, shard):
                text = str(value)
                if "\n" in text:
                    raise CacheError(f"{split}/{field} holds a value with a newline ({text!r}); "
                                     "it cannot be exported one per line")
                fh.write(text + "\n")
    return {"file": f"{split}/{target.name}", "dtype": "str",
            "shape": [cache.manifest["splits"][split]["rows"]]}


__all__ = ["cache_info", "export_npy", "list_caches", "refuse_overwrite", "remove_cache"]
