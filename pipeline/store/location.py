"""Where a cache lives: a local (or network-mounted) path, or an fsspec URL for reading.

Writing needs POSIX semantics (atomic rename, exclusive file creation, fsync) and so a local
or mounted filesystem; a complete zarr cache can be *read* from any fsspec URL
(``s3://``, ``gs://``, ``https://``, ``file://``, ``memory://``...).
"""

from __future__ import annotations

from pathlib import Path


def is_url(root: Path | str) -> bool:
    """True for an fsspec URL such as ``s3://bucket/cache`` (a ``Path`` never is one)."""
    return isinstance(root, str) and "://" in root


def join(root: Path | str, *parts: str) -> Path | str:
    """``root / part / ...`` for paths, ``root/part/...`` for URLs."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return Path(root).joinpath(*parts)


def as_location(root: Path | str) -> Path | str:
    """A URL stays a string; anything else becomes a ``Path``."""
    return root if is_url(root) else Path(root)


def canonical(root: Path | str) -> str:
    """A stable reference to a cache: URLs as given, paths made absolute."""
    return root if is_url(root) else str(Path(root).resolve())


def require_local(root: Path | str, action: str) -> Path:
    """``root`` as a ``Path``; a URL is refused with what to do instead."""
    if is_url(root):
        raise ValueError(f"cannot {action} {root}: caches are written and removed on a local or "
                         "mounted POSIX filesystem (atomic renames, lock files); write it there "
                         "and copy the finished folder to the object store")
    return Path(root)


def _filesystem(url: str):
    """``(filesystem, path)`` for an fsspec URL; a missing fsspec or protocol implementation
    (``s3fs``, ``gcsfs``...) is a clear error."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ValueError(f"cannot open {url}: {exc}. Install the missing package (fsspec, and "
                         "for this protocol its implementation, e.g. s3fs or gcsfs), or pass a "
                         "local path") from None


def read_text(root: Path | str, name: str) -> str:
    """The text of ``root/name``, UTF-8 (``FileNotFoundError`` when it does not exist)."""
    return read_bytes(root, name).decode("utf-8")


def read_bytes(root: Path | str, name: str) -> bytes:
    """The bytes of ``root/name`` (``FileNotFoundError`` when it does not exist)."""
    if not is_url(root):
        return Path(root, name).read_bytes()
    fs, path = _filesystem(join(root, name))
    with fs.open(path, "rb") as fh:
        return fh.read()


def find(root: Path | str, name: str) -> list[Path | str]:
    """Folders below ``root`` (at any depth) holding a file called ``name``, sorted."""
    if not is_url(root):
        root = Path(root)
        return sorted(p.parent for p in root.glob("**/" + name)) if root.is_dir() else []
    fs, path = _filesystem(root)
    hits = fs.glob(path.rstrip("/") + "/**/" + name)
    return sorted(fs.unstrip_protocol(h.rsplit("/", 1)[0]) for h in hits)


__all__ = ["as_location", "canonical", "find", "is_url", "join", "read_bytes", "read_text",
           "require_local"]
