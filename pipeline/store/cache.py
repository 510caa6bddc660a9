"""The feature cache: content key, manifest, shard-by-shard writes with resume, reads, verify.

Write protocol (DESIGN.md "The cache"): the shard, a fixed block of rows, is the unit of work.
A shard is written whole through the backend (atomic per file), then its commit record
(row count, per-field SHA-256) is written atomically to ``shards/<split>/<index>.json``. A
shard without a record does not exist: resume rewrites it. Because batches never straddle
shard boundaries, a killed and resumed run computes every shard exactly as an uninterrupted run
would. A lock file stops two writers; the manifest's ``status`` turns ``complete`` only after
every shard of every split is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .backends import FORMATS, FieldSpec, open_backend

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
FEATURE_FIELDS = ("visual", "text")  # float fields, checked finite and cast on read


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (incomplete, mismatched, locked, corrupt)."""


def content_key(inputs: dict[str, Any]) -> str:
    """A short stable hash of everything that determines a cache's contents."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync it, and rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def field_checksum(values: np.ndarray) -> str:
    """SHA-256 of a field's rows: dtype, shape and raw bytes (strings as a JSON list)."""
    h = hashlib.sha256()
    if values.dtype.kind in "UOT":  # str, object, numpy StringDType
        h.update(json.dumps([str(v) for v in values]).encode())
    else:
        arr = np.ascontiguousarray(values)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def storage_dtype(dtype: str) -> str:
    """How a feature dtype is stored: bfloat16 as its uint16 bits (numpy has no bfloat16)."""
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[dtype]


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


# --------------------------------------------------------------------------- locking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """An exclusive lock file; a lock left by a dead process on this host is taken over."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self.held = False

    def acquire(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise CacheError(
                    f"another extraction is writing {self.path.parent} (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))})"
                    f". Wait for it to finish; if that process is gone, delete {self.path}."
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise CacheError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SplitLayout:
    """Rows and fields of one split; shards are ``[i * shard_rows, (i + 1) * shard_rows)``."""

    rows: int
    shard_rows: int
    fields: tuple[FieldSpec, ...]

    @property
    def num_shards(self) -> int:
        return (self.rows + self.shard_rows - 1) // self.shard_rows

    def shard_range(self, index: int) -> tuple[int, int]:
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


class CacheWriter:
    """Writes one cache directory shard by shard; resumable; one writer per cache (lock)."""

    def __init__(self, root: Path, manifest: dict[str, Any], layouts: dict[str, SplitLayout],
                 lock: bool = True):
        self.root = Path(root)
        self.manifest = manifest
        self.layouts = layouts
        self.backend = open_backend(self.root, manifest["format"])
        self.lock = CacheLock(self.root) if lock else None

    @classmethod
    def open(cls, root: Path, manifest: dict[str, Any], layouts: dict[str, SplitLayout],
             lock: bool = True, create: bool = True) -> "CacheWriter":
        """Open (creating or resuming) the cache at ``root``.

        ``manifest`` must hold ``key``, ``inputs`` and ``format``; if a manifest exists already
        its inputs must be identical (a different key never shares a directory). With
        ``create=False`` (non-zero distributed ranks) the arrays are expected to exist.
        """
        writer = cls(root, manifest, layouts, lock)
        if writer.lock:
            writer.lock.acquire()
        try:
            existing = read_manifest(root) if (Path(root) / MANIFEST).is_file() else None
            if existing is not None and existing.get("inputs") != manifest["inputs"]:
                raise CacheError(f"{root} holds a cache made from other inputs "
                                 f"(key {existing.get('key')}); refusing to mix them")
            if create:
                if existing is None or existing.get("status") != "complete":
                    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
                    manifest.update(status="incomplete", schema_version=SCHEMA_VERSION,
                                    versions=_versions())
                    manifest["splits"] = {s: {"rows": l.rows, "shard_rows": l.shard_rows,
                                              "num_shards": l.num_shards,
                                              "fields": {f.name: {"shape": list(f.row_shape),
                                                                  "dtype": f.dtype}
                                                         for f in l.fields}}
                                          for s, l in layouts.items()}
                    write_json_atomic(writer.root / MANIFEST, manifest)
                for split, layout in layouts.items():
                    writer.backend.create(split, layout.rows, layout.shard_rows,
                                          list(layout.fields))
        except BaseException:
            writer.close()
            raise
        return writer

    def _record_path(self, split: str, index: int) -> Path:
        return self.root / "shards" / split / f"{index:05d}.json"

    def committed(self, split: str) -> set[int]:
        """Indices of the shards of ``split`` that have a commit record."""
        folder = self.root / "shards" / split
        return {int(p.stem) for p in folder.glob("*.json")} if folder.is_dir() else set()

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
        layout = self.layouts[split]
        start, stop = layout.shard_range(index)
        expected = {f.name for f in layout.fields}
        if set(arrays) != expected:
            raise CacheError(f"shard {split}/{index}: fields {sorted(arrays)} != {sorted(expected)}")
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise CacheError(f"shard {split}/{index}: {name} has {len(values)} rows, "
                                 f"expected {stop - start}")
            if name in FEATURE_FIELDS or name.endswith("_tokens"):
                _check_finite(name, values, self.manifest.get("dtype", "float16"), ids)
        t0 = time.perf_counter()
        self.backend.write_shard(split, index, start, arrays)
        timing = {**(timing or {}), "write_s": time.perf_counter() - t0}
        write_json_atomic(self._record_path(split, index), {
            "split": split, "index": index, "start": start, "rows": stop - start,
            "checksums": {name: field_checksum(v) for name, v in arrays.items()},
            "skipped": skipped or [], "timing": timing,
        })

    def shard_records(self, split: str) -> list[dict]:
        return [json.loads(self._record_path(split, i).read_text())
                for i in sorted(self.committed(split))]

    def finalise(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the cache complete once every shard of every split is committed."""
        missing = {s: self.pending(s) for s in self.layouts}
        missing = {s: m for s, m in missing.items() if m}
        if missing:
            raise CacheError(f"cannot finalise {self.root}: uncommitted shards {missing}")
        manifest = dict(self.manifest)
        skipped: list[dict] = []
        timing: dict[str, float] = {}
        for split in self.layouts:
            records = self.shard_records(split)
            manifest["splits"][split]["shards"] = [
                {"index": r["index"], "rows": r["rows"], "checksums": r["checksums"]}
                for r in records]
            split_skipped = [s for r in records for s in r["skipped"]]
            manifest["splits"][split]["valid_rows"] = self.layouts[split].rows - len(split_skipped)
            skipped += split_skipped
            for r in records:
                for k, v in r["timing"].items():
                    timing[k] = timing.get(k, 0.0) + v
        manifest.update(extra or {})
        manifest["skipped"] = skipped
        manifest.setdefault("timings", {}).update({k: round(v, 3) for k, v in timing.items()})
        manifest["status"] = "complete"
        manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(self.root / MANIFEST, manifest)
        self.manifest = manifest
        return manifest

    def close(self) -> None:
        if self.lock:
            self.lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"no cache at {root}: {MANIFEST} is missing (run `marnet extract`)")
    return json.loads(path.read_text())


class FeatureCache:
    """Read access to a cache directory: manifest, splits as tensors, verification."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
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
        return int(self.manifest["splits"][self.splits[0]]["fields"][field]["shape"][-1])

    def has_field(self, field: str, split: str | None = None) -> bool:
        return field in self.manifest["splits"][split or self.splits[0]]["fields"]

    def require_complete(self) -> "FeatureCache":
        if not self.complete:
            raise CacheError(f"the cache at {self.root} is incomplete (an extraction was "
                             "interrupted); run the same `marnet extract` again to resume it")
        return self

    def read_numpy(self, split: str, field: str) -> np.ndarray:
        if split not in self.manifest["splits"]:
            raise CacheError(f"split {split!r} is not in the cache at {self.root} "
                             f"(it has {', '.join(self.splits)})")
        if not self.has_field(field, split):
            raise CacheError(f"field {field!r} is not in the cache at {self.root}")
        return self.backend.read(split, field)

    def load_split(self, split: str, fields: Sequence[str] = ("visual", "text", "label"),
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   valid_only: bool = True) -> dict[str, Any]:
        """Load whole fields of ``split`` as tensors on ``device`` (``id`` as a list of str).

        Feature fields are cast to ``dtype``; rows of skipped images are dropped unless
        ``valid_only`` is False.
        """
        self.require_complete()
        keep = self.read_numpy(split, "valid").astype(bool) if valid_only else None
        out: dict[str, Any] = {}
        for field in fields:
            values = self.read_numpy(split, field)
            if keep is not None and not keep.all():
                values = values[keep]
            if field == "id":
                out[field] = [str(v) for v in values]
            elif field in FEATURE_FIELDS or field.endswith("_tokens"):
                out[field] = from_storage(values, self.dtype).to(device=device, dtype=dtype)
            elif field == "label":
                out[field] = torch.from_numpy(values.astype(np.int64)).to(device)
            else:
                out[field] = torch.from_numpy(np.ascontiguousarray(values)).to(device)
        return out

    def verify(self) -> list[str]:
        """Re-check every shard's row count and checksum; return the problems (empty = ok)."""
        problems = []
        if not self.complete:
            problems.append("status is not 'complete' (interrupted extraction)")
        for split, meta in self.manifest["splits"].items():
            shards = meta.get("shards", [])
            if len(shards) != meta["num_shards"]:
                problems.append(f"{split}: {len(shards)} of {meta['num_shards']} shards recorded")
            if sum(s["rows"] for s in shards) != meta["rows"]:
                problems.append(f"{split}: recorded rows {sum(s['rows'] for s in shards)} != "
                                f"{meta['rows']}")
            for shard in shards:
                start = shard["index"] * meta["shard_rows"]
                for field, expected in shard["checksums"].items():
                    try:
                        values = self.backend.read(split, field, start, start + shard["rows"])
                    except Exception as exc:  # noqa: BLE001 - report any read failure
                        problems.append(f"{split}/{field} shard {shard['index']}: unreadable ({exc})")
                        continue
                    if len(values) != shard["rows"]:
                        problems.append(f"{split}/{field} shard {shard['index']}: {len(values)} "
                                        f"rows, expected {shard['rows']}")
                    elif field_checksum(values) != expected:
                        problems.append(f"{split}/{field} shard {shard['index']}: checksum mismatch")
        return problems


def list_caches(root: Path | str) -> list[Path]:
    """Every cache directory (one holding a manifest) below ``root``."""
    root = Path(root)
    return sorted(p.parent for p in root.glob("**/" + MANIFEST)) if root.is_dir() else []


def remove_cache(path: Path | str) -> None:
    """Delete a cache directory, refusing while an extraction holds its lock."""
    path = Path(path)
    read_manifest(path)
    lock = CacheLock(path)
    with lock:
        pass
    shutil.rmtree(path)


__all__ = ["FORMATS", "CacheError", "CacheLock", "CacheWriter", "FeatureCache", "FieldSpec",
           "SplitLayout", "content_key", "field_checksum", "from_storage", "list_caches",
           "read_manifest", "remove_cache", "storage_dtype", "to_storage", "write_json_atomic"]
