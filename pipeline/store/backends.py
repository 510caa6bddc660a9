"""Storage backends: zarr v3 with the sharding codec, and HDF5. Same fields, same values.

A backend stores, per split, a set of named fields with a fixed number of rows. Writes happen a
whole shard (a fixed block of rows) at a time, and each write is atomic on its own:

- zarr: each field is an array whose zarr shard equals our shard, so one shard write replaces
  one file per field, and zarr's local store writes every file to a temp name and renames it;
- HDF5: one file per shard holding every field, written under a temp name and renamed (HDF5
  files are not crash-safe while open, so a killed writer must never hold the only copy).

Readers concatenate shards transparently. A zarr cache can also be read from an fsspec URL. bfloat16 has no numpy dtype; it is stored as its raw
uint16 bits and the manifest says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .location import is_url, join

FORMATS = ("zarr", "hdf5")


@dataclass(frozen=True)
class FieldSpec:
    """One stored field: per-row shape and the numpy dtype it is stored with."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8


class Backend(Protocol):
    root: Path | str

    def create(self, split: str, rows: int, shard_rows: int, fields: list[FieldSpec]) -> None: ...

    def write_shard(self, split: str, index: int, start: int,
                    arrays: dict[str, np.ndarray]) -> None: ...

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def shard_file(self, split: str, field: str, index: int, row_ndim: int) -> str:
        """The file that holds shard ``index`` of ``field`` (rows of ``row_ndim`` dims)."""
        ...


def _np_dtype(spec: FieldSpec):
    return str if spec.dtype == "str" else np.dtype(spec.dtype)


class ZarrBackend:
    """``<root>/features.zarr/<split>/<field>``, zarr v3, one zarr shard per cache shard.

    ``root`` may be an fsspec URL for reading (zarr opens it through its ``FsspecStore``).
    """

    def __init__(self, root: Path | str):
        self.root = root
        self.path = join(root, "features.zarr")
        self._reader = None  # the group opened once for reading (verify reads shard by shard)

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
        for name in arrays:  # the data must be durable before its commit record is
            _fsync_tree(Path(self.path) / split / name / "c" / str(index))

    def shard_file(self, split: str, field: str, index: int, row_ndim: int) -> str:
        return str(join(self.path, split, field, "c", str(index), *["0"] * row_ndim))

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        direct = self._direct_read(split, field, start, stop)
        if direct is not None:
            return direct
        if self._reader is None:
            self._reader = self._group("r")
        return np.asarray(self._reader[split][field][start:stop])

    def _direct_read(self, split: str, field: str, start: int,
                     stop: int | None) -> np.ndarray | None:
        """Read rows of an uncompressed sharded numeric array straight from its shard files.

        The layout this backend writes (sharding codec, raw little-endian inner chunks, index
        at the end) is read with one ``readinto`` per inner chunk into the output array,
        skipping zarr's decode pipeline (about 3x slower for whole-split reads). Anything else
        (a URL, strings, another codec chain) returns None and is read through zarr.
        """
        if is_url(self.root):
            return None
        array_dir = Path(self.path) / split / field
        layout = _raw_shard_layout(array_dir)
        if layout is None:
            return None
        rows, shard_rows, chunk_rows, row_shape, dtype = layout
        stop = rows if stop is None else min(stop, rows)
        out = page_aligned_empty((max(stop - start, 0), *row_shape), dtype)
        row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        chunks_per_shard = shard_rows // chunk_rows
        for shard in range(start // shard_rows, (stop + shard_rows - 1) // shard_rows):
            key = "/".join(["c", str(shard)] + ["0"] * len(row_shape))
            path = array_dir / key
            if not path.is_file():
                return None  # not written: let zarr apply its fill value
            with open(path, "rb") as fh:
                fh.seek(-(16 * chunks_per_shard + 4), os.SEEK_END)  # index + its crc32c
                index = np.frombuffer(fh.read(16 * chunks_per_shard), "<u8").reshape(-1, 2)
                runs: list[list[int]] = []  # [first row, last row, file offset] to read
                for k, (offset, nbytes) in enumerate(index.tolist()):
                    first = shard * shard_rows + k * chunk_rows
                    lo, hi = max(first, start), min(first + chunk_rows, stop)
                    if lo >= hi:
                        continue
                    if offset == _EMPTY_CHUNK or nbytes != chunk_rows * row_bytes:
                        return None
                    at = offset + (lo - first) * row_bytes
                    if runs and runs[-1][1] == lo and runs[-1][2] + (lo - runs[-1][0]) * row_bytes == at:
                        runs[-1][1] = hi  # the chunk follows the previous one on disk: merge
                    else:
                        runs.append([lo, hi, at])
                for lo, hi, at in runs:
                    fh.seek(at)
                    view = memoryview(out[lo - start:hi - start].reshape(-1)).cast("B")
                    if fh.readinto(view) != len(view):
                        return None
        return out


def page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on a 4 KiB boundary.

    The kernel copies page-cache pages into a read buffer about 3x slower when the buffer sits
    16 bytes past a 64-byte boundary, which is where glibc puts numpy's large allocations
    (measured with ``marnet bench``'s cache read: 109 ms vs 38 ms for the same 146 MiB of
    page-aligned shard data). ``np.load`` escapes it by luck: its 128-byte header shifts the
    file side instead.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % _PAGE
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


_PAGE = 4096
_EMPTY_CHUNK = 2 ** 64 - 1
_RAW_SHARD_CODECS = [{
    "name": "sharding_indexed",
    "configuration": {
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                         {"name": "crc32c"}],
        "index_location": "end",
    },
}]


def _raw_shard_layout(array_dir: Path) -> tuple[int, int, int, tuple[int, ...], np.dtype] | None:
    """``(rows, shard_rows, chunk_rows, row_shape, dtype)`` of an array in the raw sharded
    layout this backend writes (numeric, one shard across each row), else None."""
    import json

    meta_path = array_dir / "zarr.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    codecs = meta.get("codecs", [])
    if len(codecs) != 1:
        return None
    config = dict(codecs[0].get("configuration", {}))
    chunk_shape = config.pop("chunk_shape", None)
    if [{**codecs[0], "configuration": config}] != _RAW_SHARD_CODECS or chunk_shape is None:
        return None
    try:
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except TypeError:
        return None  # strings and other non-numeric types
    shape = meta["shape"]
    shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if shard_shape[1:] != shape[1:] or chunk_shape[1:] != shape[1:] \
            or shard_shape[0] % chunk_shape[0]:
        return None
    return shape[0], shard_shape[0], chunk_shape[0], tuple(shape[1:]), dtype


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file below a folder (a zarr shard of a 2-d field is a folder)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


@dataclass(frozen=True)
class _ShardFile:
    start: int
    stop: int
    path: Path


class HDF5Backend:
    """``<root>/features.hdf5/<split>/shard-00000.h5``: one HDF5 file per shard, all fields.

    Local or mounted paths only: reading HDF5 through fsspec would fetch every shard file
    through Python file objects, which is slow and untested here.
    """

    def __init__(self, root: Path | str):
        if is_url(root):
            raise ValueError(f"{root}: HDF5 caches are read from a local or mounted path; copy "
                             "the cache to a local folder, or extract it with --format zarr")
        self.root = Path(root)
        self.path = self.root / "features.hdf5"
        self._index: dict[str, list[_ShardFile]] = {}

    def _shard_path(self, split: str, index: int) -> Path:
        return self.path / split / f"shard-{index:05d}.h5"

    def shard_file(self, split: str, field: str, index: int, row_ndim: int) -> str:
        return str(self._shard_path(split, index))

    def create(self, split: str, rows: int, shard_rows: int, fields: list[FieldSpec]) -> None:
        (self.path / split).mkdir(parents=True, exist_ok=True)

    def write_shard(self, split: str, index: int, start: int,
                    arrays: dict[str, np.ndarray]) -> None:
        """Write every field of the shard to a temp file, fsync it, rename it into place."""
        final = self._shard_path(split, index)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        try:
            _write_h5(tmp, start, arrays)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (disk full...) leaves nothing behind
        self._index.pop(split, None)

    def _shards(self, split: str) -> list[_ShardFile]:
        """Row ranges of the shard files of ``split``, sorted (each file opened once)."""
        import h5py

        if split not in self._index:
            files = []
            for path in sorted((self.path / split).glob("shard-*.h5")):
                with h5py.File(path, "r") as f:
                    start = int(f.attrs["start"])
                    rows = int(f.attrs["rows"]) if "rows" in f.attrs else len(f[next(iter(f))])
                    files.append(_ShardFile(start, start + rows, path))
            self._index[split] = sorted(files, key=lambda s: s.start)
        return self._index[split]

    def read(self, split: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        import h5py

        shards = self._shards(split)
        stop = (shards[-1].stop if shards else 0) if stop is None else stop
        out: np.ndarray | None = None
        strings: list[str] = []
        pos = start
        for shard in shards:
            lo, hi = max(pos, shard.start), min(stop, shard.stop)
            if lo >= hi:
                continue
            if lo != pos:
                break
            with h5py.File(shard.path, "r") as f:
                ds = f[field]
                if ds.dtype.kind == "O":
                    strings += [v.decode() if isinstance(v, bytes) else v
                                for v in ds[lo - shard.start:hi - shard.start]]
                else:  # numeric: straight into the output array, no per-shard copies
                    if out is None:
                        out = page_aligned_empty((stop - start, *ds.shape[1:]), ds.dtype)
                    ds.read_direct(out, np.s_[lo - shard.start:hi - shard.start],
                                   np.s_[lo - start:hi - start])
            pos = hi
        if pos < stop or pos == start:
            raise FileNotFoundError(f"rows {pos}-{stop} of {split}/{field} are missing in "
                                    f"{self.path}")
        return np.array(strings) if out is None else out


def _write_h5(path: Path, start: int, arrays: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["start"] = start
        f.attrs["rows"] = len(next(iter(arrays.values())))
        for name, values in arrays.items():
            if values.dtype.kind in "UOT":  # str, object, numpy StringDType
                f.create_dataset(name, data=values.astype(object),
                                 dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(name, data=values)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def open_backend(root: Path | str, fmt: str) -> Backend:
    """The backend for ``fmt`` (``zarr`` or ``hdf5``) rooted at a cache directory."""
    if fmt == "zarr":
        return ZarrBackend(root)
    if fmt == "hdf5":
        return HDF5Backend(root)
    raise ValueError(f"unknown cache format {fmt!r}; choose one of {', '.join(FORMATS)}")
