"""Storage backends: zarr v3 with the sharding codec, and HDF5. Same fields, same values.

A backend stores, per split, a set of named fields with a fixed number of rows. Writes happen a
whole shard (a fixed block of rows) at a time, and each write is atomic on its own:

- zarr: each field is an array whose zarr shard equals our shard, so one shard write replaces
  one file per field, and zarr's local store writes every file to a temp name and renames it;
- HDF5: one file per shard holding every field, written under a temp name and renamed (HDF5
  files are not crash-safe while open, so a killed writer must never hold the only copy).

Readers concatenate shards transparently. bfloat16 has no numpy dtype; it is stored as its raw
uint16 bits and the manifest says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

FORMATS = ("zarr", "hdf5")


@dataclass(frozen=True)
class FieldSpec:
    """One stored field: per-row shape and the numpy dtype it is stored with."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8


class Backend(Protocol):
    root: Path

    def create(self, split: str, rows: int, shard_rows: int, fields: list[FieldSpec]) -> None: ...

    def write_shard(self, split: str, index: int, start: int,
                    arrays: dict[str, np.ndarray]) -> None: ...

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...


def _np_dtype(spec: FieldSpec):
    return str if spec.dtype == "str" else np.dtype(spec.dtype)


class ZarrBackend:
    """``<root>/features.zarr/<split>/<field>``, zarr v3, one zarr shard per cache shard."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "features.zarr"

    def _group(self, mode: str = "r"):
        import zarr

        return zarr.open_group(str(self.path), mode=mode, zarr_format=3)

    def create(self, split: str, rows: int, shard_rows: int, fields: list[FieldSpec]) -> None:
        group = self._group("a").require_group(split)
        for spec in fields:
            if spec.name in group:
                continue
            inner = _inner_chunk_rows(shard_rows, spec)
            group.create_array(
                spec.name, shape=(rows, *spec.row_shape), dtype=_np_dtype(spec),
                shards=(shard_rows, *spec.row_shape), chunks=(inner, *spec.row_shape),
                compressors=None, fill_value="" if spec.dtype == "str" else 0,
            )

    def write_shard(self, split: str, index: int, start: int,
                    arrays: dict[str, np.ndarray]) -> None:
        group = self._group("r+")[split]
        for name, values in arrays.items():
            group[name][start:start + len(values)] = values

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self._group("r")[split][field][start:stop])


def _inner_chunk_rows(shard_rows: int, spec: FieldSpec) -> int:
    """Inner chunk rows: about 1 MiB per chunk, dividing the shard evenly (zarr requires it)."""
    if spec.dtype == "str":
        return shard_rows
    row_bytes = max(1, int(np.prod(spec.row_shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize)
    target = max(1, (1 << 20) // row_bytes)
    for rows in range(min(target, shard_rows), 0, -1):
        if shard_rows % rows == 0:
            return rows
    return shard_rows


class HDF5Backend:
    """``<root>/features.hdf5/<split>/shard-00000.h5``: one HDF5 file per shard, all fields."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "features.hdf5"
        self._layout: dict[str, tuple[int, int]] = {}

    def _shard_path(self, split: str, index: int) -> Path:
        return self.path / split / f"shard-{index:05d}.h5"

    def create(self, split: str, rows: int, shard_rows: int, fields: list[FieldSpec]) -> None:
        (self.path / split).mkdir(parents=True, exist_ok=True)
        self._layout[split] = (rows, shard_rows)

    def write_shard(self, split: str, index: int, start: int,
                    arrays: dict[str, np.ndarray]) -> None:
        import h5py

        final = self._shard_path(split, index)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        with h5py.File(tmp, "w") as f:
            f.attrs["start"] = start
            for name, values in arrays.items():
                if values.dtype.kind in "UOT":  # str, object, numpy StringDType
                    f.create_dataset(name, data=values.astype(object),
                                     dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(name, data=values)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        import h5py

        parts = []
        for path in sorted((self.path / split).glob("shard-*.h5")):
            with h5py.File(path, "r") as f:
                first = int(f.attrs["start"])
                n = f[field].shape[0]
                lo, hi = max(start, first), n + first if stop is None else min(stop, n + first)
                if lo >= hi:
                    continue
                data = f[field][lo - first:hi - first]
                if data.dtype.kind == "O":
                    data = np.array([v.decode() if isinstance(v, bytes) else v for v in data])
                parts.append(data)
        if not parts:
            raise FileNotFoundError(f"no rows of {split}/{field} in {self.path}")
        return np.concatenate(parts)


def open_backend(root: Path, fmt: str) -> Backend:
    """The backend for ``fmt`` (``zarr`` or ``hdf5``) rooted at a cache directory."""
    if fmt == "zarr":
        return ZarrBackend(root)
    if fmt == "hdf5":
        return HDF5Backend(root)
    raise ValueError(f"unknown cache format {fmt!r}; choose one of {', '.join(FORMATS)}")
