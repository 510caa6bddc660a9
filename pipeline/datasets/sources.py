"""Where a record's image bytes are: a file, a member of a tar shard, or a cell of a table.

Most adapters point :attr:`Record.image` at an image **file** (a :class:`~pathlib.Path`), and
everything that reads images (decoding in the DataLoader workers or on the device, ``datasets
check``, the dataset digest) opens that file as it always has. The ``webdataset`` and ``hf``
adapters keep images inside containers, which are not files; their records point at a
:class:`StoredImage` instead:

- :class:`TarMember`: a member of an uncompressed tar shard, read by seeking to its data offset
  (the shard is never unpacked);
- :class:`TableCell`: the ``bytes`` of an image struct (``{bytes, path}``, the Hugging Face
  ``Image`` feature) in one row of an Arrow file written by ``save_to_disk`` (memory-mapped) or
  of a Parquet file (its row group read once per worker and kept while the next rows are read).

A stored image can be read (:meth:`StoredImage.read`), fingerprinted for the dataset digest by
the same rule as a file (:func:`window_fingerprint`: size and the first and last 4 KiB, not the
whole image) and named portably (:meth:`StoredImage.portable_name`). Its ``str`` names it in
error messages (``shards/00001.tar:sample_7.jpg``, ``train.parquet row 12 (image)``). Values
are plain frozen dataclasses, so they pickle to DataLoader workers; the open tables live in
per-process caches, never in the values.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

FINGERPRINT_BYTES = 4096


def window_fingerprint(size: int, head: bytes, tail: bytes) -> str:
    """``<size>:<BLAKE2b>`` of an image's first 4 KiB (``head``) and of the bytes from
    ``max(4 KiB, size - 4 KiB)`` to its end (``tail``; empty when ``size`` <= 4 KiB): the rule
    of :func:`pipeline.datasets.base.image_fingerprint`, for bytes that are not a file."""
    h = hashlib.blake2b(head, digest_size=16)
    if size > FINGERPRINT_BYTES:
        h.update(tail)
    return f"{size}:{h.hexdigest()}"


def tail_start(size: int) -> int:
    """Where the fingerprint's tail window starts in an image of ``size`` bytes."""
    return max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES)


def buffer_fingerprint(data: bytes | memoryview) -> str:
    """:func:`window_fingerprint` of an image held in memory."""
    return window_fingerprint(len(data), bytes(data[:FINGERPRINT_BYTES]),
                              bytes(data[tail_start(len(data)):]))


class StoredImage:
    """An image inside a container (see the module docstring); subclasses say where."""

    @property
    def container(self) -> Path:
        """The file that holds the image (a tar shard, an Arrow or Parquet file)."""
        raise NotImplementedError

    def read(self) -> bytes:
        """The encoded image; ``OSError`` naming the image when it cannot be read."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """The digest's content fingerprint (:func:`window_fingerprint`) or ``missing``."""
        raise NotImplementedError

    def portable_name(self, root: str) -> str:
        """How the dataset digest names this image: its container relative to ``root`` when
        inside it (moving the whole dataset keeps the name), plus its place in the container."""
        raise NotImplementedError


ImageRef = Union[Path, StoredImage]
"""What :attr:`Record.image` holds: an image file, or an image inside a container."""


def pattern_base(root: str) -> str:
    """The folder a dataset root names: the folder part of a shard pattern before any brace
    or wildcard (``/data/shards/{00000..00099}.tar`` -> ``/data/shards``), a file's folder, or
    the folder itself."""
    cut = min([i for i in (root.find(c) for c in "{*?[") if i >= 0], default=-1)
    if cut >= 0:
        return os.path.dirname(root[:cut])
    return root if os.path.isdir(root) or not os.path.exists(root) else os.path.dirname(root)


def _relative(path: Path, root: str) -> str:
    """``path`` relative to ``root`` (``/``-separated) when inside it, else absolute."""
    absolute, base = os.path.abspath(path), pattern_base(os.path.abspath(root)).rstrip(os.sep)
    if absolute.startswith(base + os.sep):
        return absolute[len(base) + 1:].replace(os.sep, "/")
    return absolute


@dataclass(frozen=True)
class TarMember(StoredImage):
    """A tar shard's member ``member`` whose data is ``size`` bytes at byte ``offset``."""

    shard: Path
    member: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"

    @property
    def container(self) -> Path:
        return self.shard

    def read(self) -> bytes:
        with open(self.shard, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the shard ends {self.size - len(data)} bytes into this "
                          "member (truncated shard)")
        return data

    def fingerprint(self) -> str:
        try:
            with open(self.shard, "rb") as fh:
                fh.seek(self.offset)
                head = fh.read(min(self.size, FINGERPRINT_BYTES))
                fh.seek(self.offset + tail_start(self.size))
                tail = fh.read(max(0, self.size - tail_start(self.size)))
        except OSError:
            return "missing"
        return window_fingerprint(self.size, head, tail)

    def portable_name(self, root: str) -> str:
        return f"{_relative(self.shard, root)}:{self.member}"


@dataclass(frozen=True)
class TableCell(StoredImage):
    """The image bytes in row ``row`` (0-based, within the file) of column ``column`` of the
    Arrow (``.arrow``, as ``save_to_disk`` writes) or Parquet (``.parquet``) file ``table``.

    ``known_fingerprint`` is the fingerprint the adapter computed while it read the table (one
    pass over each file: :func:`binary_fingerprints`); it is returned as is."""

    table: Path
    row: int
    column: str
    known_fingerprint: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.table} row {self.row} ({self.column})"

    @property
    def container(self) -> Path:
        return self.table

    def buffer(self) -> memoryview:
        """The image bytes without a copy where the format allows (memory-mapped Arrow)."""
        value = image_bytes_at(str(self.table), self.column, self.row)
        if value is None:
            raise OSError(f"{self}: no image bytes in this row")
        return value

    def read(self) -> bytes:
        return bytes(self.buffer())

    def fingerprint(self) -> str:
        if self.known_fingerprint:
            return self.known_fingerprint
        try:
            return buffer_fingerprint(self.buffer())
        except OSError:
            return "missing"

    def portable_name(self, root: str) -> str:
        return f"{_relative(self.table, root)}#{self.row}:{self.column}"


def struct_child(chunk: Any, name: str) -> Any:
    """Field ``name`` of an Arrow struct array, null where the struct itself is null."""
    return chunk.flatten()[chunk.type.get_field_index(name)]


def binary_fingerprints(array: Any) -> list[str | None]:
    """:func:`buffer_fingerprint` of each value of an Arrow binary array (None where null),
    each read in place (a memory-mapped file is touched only at the 8 KiB it hashes)."""
    return [buffer_fingerprint(memoryview(v.as_buffer())) if v.is_valid else None
            for v in array]


def image_bytes_at(table: str, column: str, row: int) -> memoryview | None:
    """Row ``row``'s image bytes in ``table`` (None when the cell holds no bytes)."""
    starts, arrays = _bytes_column(table, column, *_row_group(table, row))
    chunk = bisect.bisect_right(starts, row) - 1
    scalar = arrays[chunk][row - starts[chunk]]
    if not scalar.is_valid:
        return None
    return memoryview(scalar.as_buffer())


def _row_group(table: str, row: int) -> tuple[int, int]:
    """``(group, first row)``: the Parquet row group holding ``row``; ``(-1, 0)`` for Arrow
    files, which are read (memory-mapped) whole."""
    if not table.endswith(".parquet"):
        return -1, 0
    starts = parquet_group_starts(table)
    group = bisect.bisect_right(starts, row) - 1
    return group, starts[group]


@lru_cache(maxsize=64)
def parquet_group_starts(table: str) -> list[int]:
    """The first row of each row group of a Parquet file."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(table).metadata
    starts, total = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(total)
        total += metadata.row_group(group).num_rows
    return starts


@lru_cache(maxsize=4)
def _bytes_column(table: str, column: str, group: int, first_row: int
                  ) -> tuple[list[int], list[Any]]:
    """``(chunk start rows, binary arrays)`` of ``column.bytes``: a whole memory-mapped Arrow
    file (``group`` -1), or one Parquet row group starting at ``first_row``."""
    if group < 0:
        chunks = read_arrow(table).column(column).chunks
    else:
        import pyarrow.parquet as pq

        chunks = pq.ParquetFile(table).read_row_group(group, columns=[column]).column(0).chunks
    starts, arrays, row = [], [], first_row
    for chunk in chunks:
        starts.append(row)
        arrays.append(struct_child(chunk, "bytes"))
        row += len(chunk)
    return starts, arrays


@lru_cache(maxsize=16)
def read_arrow(table: str) -> Any:
    """An Arrow file as ``save_to_disk`` writes it (the IPC stream format; the file format is
    read too), memory-mapped: nothing is copied until a value is used."""
    import pyarrow as pa

    source = pa.memory_map(table)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(table)).read_all()


def as_image_ref(image: ImageRef | str) -> ImageRef:
    """A stored image as it is; anything else as the :class:`~pathlib.Path` of a file."""
    return image if isinstance(image, StoredImage) else Path(image)
