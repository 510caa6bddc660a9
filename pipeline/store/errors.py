"""Errors of the feature store, and how an operating-system error is told to a user."""

import errno


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (incomplete, mismatched, locked, corrupt, unwritable)."""


class DamagedShard(CacheError):
    """A committed shard whose file no longer reads or no longer matches its checksum."""

    def __init__(self, root: object, where: str, what: str):
        self.problem = f"{where} {what}"
        super().__init__(
            f"{self.problem}: the file was damaged after it was written (disk error, truncated "
            f"copy, edit). Run `marnet cache verify {root} --repair`, then the `marnet extract` "
            "that made the cache again: it rewrites only the damaged shards")


OS_ERROR_ADVICE = {
    errno.ENOTDIR: "that path, or a folder above it, is a file where a folder is needed: "
                   "choose another path or move the file",
    errno.EISDIR: "a file is needed there, not a folder: give a file path",
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "choose a folder on a writable filesystem",
    errno.ENOSPC: "free space and run the same command again",
    errno.EEXIST: "choose another path",
}


def describe_os_error(exc: OSError) -> str:
    """An operating-system error as one line: what failed, on which path, what to do."""
    what = exc.strerror or str(exc)
    where = f": {exc.filename}" if exc.filename is not None else ""
    advice = OS_ERROR_ADVICE.get(exc.errno)
    return f"{what}{where}" + (f"; {advice}" if advice else "")


__all__ = ["CacheError", "DamagedShard", "describe_os_error"]
