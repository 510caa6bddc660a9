"""The feature store: zarr v3 (sharded) and HDF5 backends behind one writer/reader API."""

from .backends import FORMATS, FieldSpec
from .cache import (
    CacheError,
    CacheLock,
    CacheWriter,
    FeatureCache,
    SplitLayout,
    content_key,
    field_checksum,
    from_storage,
    list_caches,
    read_manifest,
    remove_cache,
    storage_dtype,
    to_storage,
    write_json_atomic,
)

__all__ = ["FORMATS", "CacheError", "CacheLock", "CacheWriter", "FeatureCache", "FieldSpec",
           "SplitLayout", "content_key", "field_checksum", "from_storage", "list_caches",
           "read_manifest", "remove_cache", "storage_dtype", "to_storage", "write_json_atomic"]
