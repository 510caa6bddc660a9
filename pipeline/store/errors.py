"""Errors of the feature store."""


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (incomplete, mismatched, locked, corrupt, unwritable)."""


__all__ = ["CacheError"]
