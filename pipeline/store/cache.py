"""The feature cache: content key, manifest, shard-by-shard writes with resume, reads, verify.

Write protocol (design §4): the shard, a fixed block of rows, is the unit of work.
A shard is written whole through the backend (each file atomically, by temp + rename, and
fsynced), then its commit record (row count, per-field SHA-256, timings, writer) is written
atomically to ``shards/<split>/<index>.json``: the record is the commit point. A shard without
a record does not exist: resume rewrites it. Because batches never straddle
shard boundaries, a killed and resumed run computes every shard exactly as an uninterrupted run
would. A lock file stops two writers; the manifest's ``status`` turns ``complete`` only after
every shard of every split is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .backends import FORMATS, FieldSpec, open_backend
from .errors import CacheError, DamagedShard, describe_os_error
from .location import as_location, is_url, join, read_text, require_local
from .lock import CacheLock

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
TEMP_PATTERNS = ("**/*.partial", "**/*.tmp[0-9]*")  # zarr's and ours; left by killed writers
FEATURE_FIELDS = ("visual", "text")  # float fields, checked finite and cast on read
# beside the arrays: the features of each unique text (float32, row i = TEXT_TABLE_META's
# "texts"[i], sorted), from which every row's `text` features were gathered
TEXT_TABLE = "text_table.npy"
TEXT_TABLE_META = "text_table.json"


def content_key(inputs: dict[str, Any]) -> str:
    """A short stable hash of everything that determines a cache's contents."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync it, and rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def field_checksum(values: np.ndarray) -> str:
    """SHA-256 of a field's rows: dtype, shape and raw bytes (strings as a JSON list)."""
    h = hashlib.sha256()
    if values.dtype.kind in "UOT":  # str, object, numpy StringDType
        h.update(json.dumps([str(v) for v in values]).encode())
    else:
        arr = np.ascontiguousarray(values)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(memoryview(arr.reshape(-1)).cast("B"))  # the raw bytes, without a copy
    return h.hexdigest()


# feature dtype -> how it is stored: bfloat16 as its uint16 bits (numpy has no bfloat16)
STORAGE_DTYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


def storage_dtype(dtype: str) -> str:
    """How feature dtype ``dtype`` is stored; an unknown one is a ``ValueError``."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; choose {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast model output to the cache dtype and return the numpy array that gets stored."""
    if dtype == "bfloat16":
        return features.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return features.detach().to(getattr(torch, dtype)).cpu().numpy()


def from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: a tensor of the cache dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SplitLayout:
    """Rows and fields of one split; shards are ``[i * shard_rows, (i + 1) * shard_rows)``."""

    rows: int
    shard_rows: int
    fields: tuple[FieldSpec, ...]

    @property
    def num_shards(self) -> int:
        """Shards of the split (the last one may be short)."""
        return (self.rows + self.shard_rows - 1) // self.shard_rows

    def shard_range(self, index: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``index``."""
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("marnet", "torch", "timm", "transformers", "zarr", "h5py", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _identity(rank: int) -> dict[str, Any]:
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}


def record_path(root: Path, split: str, index: int) -> Path:
    """Where the commit record of shard ``index`` of ``split`` lives."""
    return Path(root) / SHARDS / split / f"{index:05d}.json"


def committed_shards(root: Path | str, split: str) -> set[int]:
    """Indices of the shards of ``split`` that have a commit record (none for a URL)."""
    folder = None if is_url(root) else Path(root) / SHARDS / split
    if folder is None or not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()}


def read_records(root: Path | str, split: str) -> list[dict]:
    """The commit records of ``split``, by shard index."""
    return [json.loads(record_path(root, split, i).read_text())
            for i in sorted(committed_shards(root, split))]


def stale_temp_files(root: Path) -> list[Path]:
    """Temp files that killed writers left behind (never part of the cache's contents)."""
    return sorted({p for pattern in TEMP_PATTERNS for p in Path(root).glob(pattern) if p.is_file()})


def stage_timings(records: Iterable[dict]) -> dict[str, Any]:
    """Seconds per stage summed over shard records, rows, and milliseconds per row."""
    totals: dict[str, float] = {}
    rows = 0
    for record in records:
        rows += record["rows"]
        for stage, seconds in record.get("timing", {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {**{k: round(v, 3) for k, v in totals.items()}, "rows": rows,
            "ms_per_row": {k.removesuffix("_s"): round(1000 * v / max(rows, 1), 3)
                           for k, v in totals.items()}}


def _layout_meta(layout: SplitLayout) -> dict[str, Any]:
    return {"rows": layout.rows, "shard_rows": layout.shard_rows,
            "num_shards": layout.num_shards,
            "fields": {f.name: {"shape": list(f.row_shape), "dtype": f.dtype}
                       for f in layout.fields}}


class CacheWriter:
    """Writes one cache directory shard by shard; resumable; one writer per cache (lock).

    ``rank`` identifies the writer in shard records (distributed extraction); only the writer
    that holds the lock (rank 0) creates the arrays and finalises.
    """

    def __init__(self, root: Path | str, manifest: dict[str, Any],
                 layouts: dict[str, SplitLayout], lock: bool = True, rank: int = 0):
        self.root = require_local(root, "write a cache at")
        self.manifest = manifest
        self.layouts = layouts
        self.rank = rank
        self.backend = open_backend(self.root, manifest["format"])
        self.lock = CacheLock(self.root, rank) if lock else None

    @classmethod
    def open(cls, root: Path | str, manifest: dict[str, Any], layouts: dict[str, SplitLayout],
             lock: bool = True, create: bool = True, rank: int = 0) -> "CacheWriter":
        """Open (creating or resuming) the cache at ``root``.

        ``manifest`` must hold ``key``, ``inputs`` and ``format``; if a manifest exists already
        its inputs must be identical (a different key never shares a directory) and its shard
        geometry equal to ``layouts``. With ``create=False`` (non-zero distributed ranks) the
        manifest and arrays are left to rank 0.
        """
        writer = cls(root, manifest, layouts, lock, rank)
        try:
            if writer.lock:
                writer.lock.acquire()
            existing = read_manifest(writer.root) if (writer.root / MANIFEST).is_file() else None
            if existing is not None:
                writer._check_resumable(existing)
            if create:
                writer._create(existing)
        except OSError as exc:
            writer.close()
            raise writer.failure("opening", exc) from exc
        except BaseException:
            writer.close()
            raise
        return writer

    def _check_resumable(self, existing: dict[str, Any]) -> None:
        if existing.get("inputs") != self.manifest["inputs"]:
            raise CacheError(f"{self.root} holds a cache made from other inputs "
                             f"(key {existing.get('key')}); refusing to mix them")
        for split, layout in self.layouts.items():
            before = existing.get("splits", {}).get(split, {}).get("shard_rows", layout.shard_rows)
            if before != layout.shard_rows:
                raise CacheError(f"{self.root} was started with {before} rows per shard, not "
                                 f"{layout.shard_rows}; resume it with the same geometry")

    def _create(self, existing: dict[str, Any] | None) -> None:
        if existing is None or existing.get("status") != "complete":
            self.manifest["created"] = ((existing or {}).get("created")
                                        or time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.manifest.update(status="incomplete", schema_version=SCHEMA_VERSION,
                                 versions=_versions())
            self.manifest["splits"] = {s: _layout_meta(l) for s, l in self.layouts.items()}
            write_json_atomic(self.root / MANIFEST, self.manifest)
        for split, layout in self.layouts.items():
            self.backend.create(split, layout.rows, layout.shard_rows, list(layout.fields))

    def failure(self, action: str, exc: OSError) -> CacheError:
        """A storage error (disk full, permissions...) as a message that says how to go on."""
        try:
            done = sum(len(self.committed(s)) for s in self.layouts)
        except OSError:
            done = "?"
        total = sum(layout.num_shards for layout in self.layouts.values())
        return CacheError(f"{action} the cache {self.root} failed: {describe_os_error(exc)}. "
                          f"{done} of {total} "
                          "shards are committed and intact; once fixed, run the same command "
                          "again to resume")

    def committed(self, split: str) -> set[int]:
        """Indices of the shards of ``split`` that have a commit record."""
        return committed_shards(self.root, split)

    def pending(self, split: str, owned: Iterable[int] | None = None) -> list[int]:
        """Shards of ``split`` still to write (restricted to ``owned`` for a distributed rank)."""
        todo = set(range(self.layouts[split].num_shards)) - self.committed(split)
        if owned is not None:
            todo &= set(owned)
        return sorted(todo)

    def commit_shard(self, split: str, index: int, arrays: dict[str, np.ndarray],
                     ids: Sequence[str], skipped: list[dict] | None = None,
                     timing: dict[str, float] | None = None) -> None:
        """Write shard ``index`` of ``split`` whole, then record it. Refuses non-finite rows."""
        start, stop = self.layouts[split].shard_range(index)
        self._check_shard(split, index, arrays, stop - start, ids)
        t0 = time.perf_counter()
        try:
            self.backend.write_shard(split, index, start, arrays)
            timing = {**(timing or {}), "write_s": time.perf_counter() - t0}
            write_json_atomic(record_path(self.root, split, index), {
                "split": split, "index": index, "start": start, "rows": stop - start,
                "checksums": {name: field_checksum(v) for name, v in arrays.items()},
                "skipped": skipped or [], "timing": timing, "writer": _identity(self.rank),
            })
        except OSError as exc:
            raise self.failure(f"writing shard {split}/{index} of", exc) from exc

    def _check_shard(self, split: str, index: int, arrays: dict[str, np.ndarray], rows: int,
                     ids: Sequence[str]) -> None:
        expected = {f.name for f in self.layouts[split].fields}
        if set(arrays) != expected:
            raise CacheError(f"shard {split}/{index}: fields {sorted(arrays)} != {sorted(expected)}")
        for name, values in arrays.items():
            if len(values) != rows:
                raise CacheError(f"shard {split}/{index}: {name} has {len(values)} rows, "
                                 f"expected {rows}")
            if is_feature(name):
                _check_finite(name, values, self.manifest.get("dtype", "float16"), ids)

    def shard_records(self, split: str) -> list[dict]:
        """The commit records of ``split``, by shard index."""
        return read_records(self.root, split)

    def finalise(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the cache complete once every shard of every split is committed.

        Gathers the shard records (counts, checksums, skipped rows, timings) into the manifest
        and removes temp files that killed writers left behind.
        """
        missing = {s: m for s in self.layouts if (m := self.pending(s))}
        if missing:
            raise CacheError(f"cannot finalise {self.root}: uncommitted shards {missing}")
        manifest = dict(self.manifest)
        records = {split: self.shard_records(split) for split in self.layouts}
        for split, recs in records.items():
            meta = manifest["splits"][split]
            meta["shards"] = [{"index": r["index"], "rows": r["rows"], "checksums": r["checksums"]}
                              for r in recs]
            meta["valid_rows"] = self.layouts[split].rows - sum(len(r["skipped"]) for r in recs)
        manifest.update(extra or {})
        manifest["skipped"] = [s for recs in records.values() for r in recs for s in r["skipped"]]
        manifest["timings"] = {**manifest.get("timings", {}),
                               **stage_timings(r for recs in records.values() for r in recs)}
        manifest.update(status="complete", completed=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        finalised_by=_identity(self.rank))
        try:
            write_json_atomic(self.root / MANIFEST, manifest)
            for tmp in stale_temp_files(self.root):
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self.failure("finalising", exc) from exc
        self.manifest = manifest
        return manifest

    def close(self) -> None:
        """Release the lock (if held)."""
        if self.lock:
            self.lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_feature(field: str) -> bool:
    """Float feature fields: checked finite on write, cast to the requested dtype on read."""
    return field in FEATURE_FIELDS or field.endswith("_tokens")


def _check_finite(name: str, values: np.ndarray, dtype: str, ids: Sequence[str]) -> None:
    as_float = from_storage(values, dtype).float() if values.dtype == np.uint16 else \
        torch.from_numpy(np.asarray(values, dtype=np.float32))
    bad = ~torch.isfinite(as_float.reshape(len(values), -1)).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise CacheError(f"non-finite {name} features for {len(rows)} record(s), first "
                         f"{ids[rows[0]]!r}; refusing to write them (check the backbone and "
                         "precision settings)")


# --------------------------------------------------------------------------- reading


def read_manifest(root: Path | str) -> dict[str, Any]:
    """The manifest of the cache at ``root`` (a path or an fsspec URL)."""
    try:
        text = read_text(root, MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        below = sorted(Path(root).glob(f"*/*/{MANIFEST}"))[:3] \
            if not is_url(root) and Path(root).is_dir() else []
        hint = ("; it holds caches below it, pass one of them: "
                + ", ".join(str(p.parent) for p in below)) if below else \
            " (run `marnet extract`; `marnet cache ls` lists the caches of a root)"
        raise CacheError(f"no cache at {root}: {MANIFEST} is missing{hint}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{join(root, MANIFEST)} is not valid JSON ({exc}); the cache is "
                         "damaged: remove it with `marnet cache rm` and extract again") from None


class FeatureCache:
    """Read access to a cache directory (or a zarr cache at an fsspec URL)."""

    def __init__(self, root: Path | str):
        self.root = as_location(root)
        self.manifest = read_manifest(self.root)
        self.backend = open_backend(self.root, self.manifest["format"])

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def dim(self, field: str) -> int:
        """Last dimension of ``field`` (e.g. the visual feature size)."""
        return int(self.manifest["splits"][self.splits[0]]["fields"][field]["shape"][-1])

    def has_field(self, field: str, split: str | None = None) -> bool:
        return field in self.manifest["splits"][split or self.splits[0]]["fields"]

    def num_shards(self) -> int:
        return sum(meta["num_shards"] for meta in self.manifest["splits"].values())

    def num_committed(self) -> int:
        """Committed shards: all of them when complete, else those with a commit record."""
        if self.complete:
            return self.num_shards()
        return sum(len(committed_shards(self.root, s)) for s in self.splits)

    def require_complete(self) -> "FeatureCache":
        """This cache, if complete and of this code's schema; else a :class:`CacheError`."""
        if not self.complete:
            raise CacheError(f"the cache at {self.root} is incomplete ({self.num_committed()} of "
                             f"{self.num_shards()} shards committed: an extraction was "
                             "interrupted or is still running); run the same `marnet extract` "
                             "again to resume it")
        version = self.manifest.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise CacheError(f"the cache at {self.root} has schema version {version}; this "
                             f"marnet reads version {SCHEMA_VERSION}. Extract it again")
        return self

    def read_numpy(self, split: str, field: str, check: bool = True) -> np.ndarray:
        """A whole field of ``split`` as stored.

        With ``check`` every committed shard's rows are hashed and compared with the SHA-256
        its commit record holds, so a damaged file is refused (naming the shard file and the
        repair) instead of being trained on; ``marnet bench`` (cache_read_vs_npy) measures the
        cost: about 30 ms per 100 MB on 2 CPU cores, a few times the raw read.
        """
        if split not in self.manifest["splits"]:
            raise CacheError(f"split {split!r} is not in the cache at {self.root} "
                             f"(it has {', '.join(self.splits)})")
        if not self.has_field(field, split):
            raise CacheError(f"field {field!r} is not in the cache at {self.root}")
        values = self._read(split, field, None)
        if check:
            self._check_rows(split, field, values)
        return values

    def read_shard(self, split: str, field: str, shard: dict, check: bool = True) -> np.ndarray:
        """The rows of one committed shard (its record: ``index``, ``rows``, ``checksums``),
        compared with its checksum unless ``check`` is False."""
        values = self._read(split, field, shard)
        if check:
            self._check_shard(split, field, shard, values)
        return values

    def _read(self, split: str, field: str, shard: dict | None) -> np.ndarray:
        """One shard's rows (``shard`` its record) or, for None, the whole field; any read
        failure is a damaged shard, named (for a whole field: the first that fails alone)."""
        start = shard["index"] * self.manifest["splits"][split]["shard_rows"] if shard else 0
        try:
            return self.backend.read(split, field, start,
                                     start + shard["rows"] if shard else None)
        except Exception as exc:  # noqa: BLE001 - any read failure is a damaged shard
            index = shard["index"] if shard else self._unreadable_shard(split, field)
            raise self._damaged(split, field, index, f"cannot be read ({exc})") from None

    def _check_shard(self, split: str, field: str, shard: dict, rows: np.ndarray) -> None:
        expected = shard["checksums"].get(field)
        if len(rows) != shard["rows"]:
            raise self._damaged(split, field, shard["index"],
                                f"holds {len(rows)} rows where its record says {shard['rows']}")
        if expected is None or field_checksum(rows) != expected:
            raise self._damaged(split, field, shard["index"],
                                "does not match the checksum recorded when it was written")

    def _check_rows(self, split: str, field: str, values: np.ndarray) -> None:
        """Compare each shard's slice of a whole field with its recorded checksum."""
        shard_rows = self.manifest["splits"][split]["shard_rows"]

        def check(shard: dict) -> None:
            start = shard["index"] * shard_rows
            self._check_shard(split, field, shard, values[start:start + shard["rows"]])

        shards = self.shard_list(split)
        workers = min(len(shards), os.cpu_count() or 1)
        if workers < 2:
            for shard in shards:
                check(shard)
            return
        with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: shards hash in
            list(pool.map(check, shards))  # parallel; the first damaged one (in order) raises

    def _unreadable_shard(self, split: str, field: str) -> int | None:
        """The first shard of ``field`` that fails to read on its own (None if each reads)."""
        for shard in self.shard_list(split):
            try:
                self._read(split, field, shard)
            except DamagedShard:
                return shard["index"]
        return None

    def discard_shard_data(self, split: str, index: int) -> None:
        """Delete the stored data of shard ``index`` of ``split`` (every field), so that the
        next extraction writes it from scratch: a writer that fills a partial chunk reads the
        old bytes first, and damaged ones fail that read. Only for a shard whose commit record
        is gone (:func:`~marnet.pipeline.store.manage.repair_cache`)."""
        fields = self.manifest["splits"][split]["fields"]
        for field, spec in fields.items():
            Path(self.backend.shard_file(split, field, index, len(spec["shape"]))).unlink(
                missing_ok=True)

    def _damaged(self, split: str, field: str, index: int | None, what: str) -> DamagedShard:
        """The error for a damaged shard: which file, what is wrong, how to repair it."""
        row_ndim = len(self.manifest["splits"][split]["fields"][field]["shape"])
        where = (f"shard {index} of {split}/{field} "
                 f"({self.backend.shard_file(split, field, index, row_ndim)})"
                 if index is not None else f"{split}/{field}")
        return DamagedShard(self.root, where, what)

    def load_split(self, split: str, fields: Sequence[str] = ("visual", "text", "label"),
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   valid_only: bool = True, check: bool = True) -> dict[str, Any]:
        """Load whole fields of ``split`` as tensors on ``device`` (``id`` as a list of str).

        Feature fields are cast to ``dtype``; rows of skipped images are dropped unless
        ``valid_only`` is False. ``check`` compares every shard with its checksum
        (:meth:`read_numpy`).
        """
        self.require_complete()
        keep = self.read_numpy(split, "valid", check).astype(bool) if valid_only else None
        out: dict[str, Any] = {}
        for field in fields:
            values = self.read_numpy(split, field, check)
            if keep is not None and not keep.all():
                values = values[keep]
            if field == "id":
                out[field] = [str(v) for v in values]
            elif is_feature(field):
                out[field] = from_storage(values, self.dtype).to(device=device, dtype=dtype)
            elif field == "label":
                out[field] = torch.from_numpy(values.astype(np.int64)).to(device)
            else:
                out[field] = torch.from_numpy(np.ascontiguousarray(values)).to(device)
        return out

    def shard_list(self, split: str) -> list[dict]:
        """Shards to check: the manifest's list when complete, else the commit records."""
        if self.complete:
            return self.manifest["splits"][split].get("shards", [])
        return read_records(self.root, split)

    def verify(self, on_shard: Callable[[], None] | None = None,
               damaged: list[tuple[str, int]] | None = None) -> list[str]:
        """Re-read every committed shard and check its row count and checksums.

        Returns the problems (empty = ok). An incomplete cache is a problem, but its committed
        shards are still checked. ``on_shard`` is called after each shard (progress);
        ``damaged``, when given, receives ``(split, index)`` of every shard with a problem.
        """
        problems = []
        if not self.complete:
            problems.append(f"incomplete: {self.num_committed()} of {self.num_shards()} shards "
                            "committed (an extraction was interrupted or is running); run the "
                            "same `marnet extract` again to finish it")
        else:  # the manifest's shard lists against its split sizes
            problems += [problem for split, meta in self.manifest["splits"].items()
                         for problem in _count_problems(split, meta, self.shard_list(split))]
        for split in self.manifest["splits"]:
            for shard in self.shard_list(split):
                found = self._shard_problems(split, shard)
                if found and damaged is not None:
                    damaged.append((split, shard["index"]))
                problems += found
                if on_shard:
                    on_shard()
        return problems

    def _shard_problems(self, split: str, shard: dict) -> list[str]:
        """What is wrong with one committed shard (its record: ``index``, ``rows``,
        ``checksums``): missing checksums, unreadable fields, wrong row counts or values."""
        meta = self.manifest["splits"][split]
        missing = sorted(set(meta["fields"]) - set(shard["checksums"]))
        problems = [f"{split} shard {shard['index']}: no checksum for {', '.join(missing)}"] \
            if missing else []
        for field in shard["checksums"]:
            try:
                self.read_shard(split, field, shard)
            except DamagedShard as exc:
                problems.append(exc.problem)
        return problems


def _count_problems(split: str, meta: dict, shards: list[dict]) -> list[str]:
    problems = []
    if sorted(s["index"] for s in shards) != list(range(meta["num_shards"])):
        problems.append(f"{split}: {len(shards)} of {meta['num_shards']} shards recorded")
    rows = sum(s["rows"] for s in shards)
    if rows != meta["rows"]:
        problems.append(f"{split}: recorded rows {rows} != {meta['rows']}")
    return problems


__all__ = ["FORMATS", "MANIFEST", "SCHEMA_VERSION", "STORAGE_DTYPES", "TEXT_TABLE",
           "TEXT_TABLE_META", "CacheError", "CacheLock",
           "CacheWriter", "FeatureCache", "FieldSpec", "SplitLayout", "committed_shards",
           "content_key", "field_checksum", "from_storage", "is_feature", "read_manifest",
           "read_records", "record_path", "stage_timings", "stale_temp_files", "storage_dtype",
           "to_storage", "write_json_atomic"]
