"""The feature store: zarr v3 (sharded) and HDF5 backends behind one writer/reader API."""

from .backends import FORMATS, FieldSpec
from .cache import (
    STORAGE_DTYPES,
    CacheWriter,
    FeatureCache,
    SplitLayout,
    content_key,
    field_checksum,
    from_storage,
    is_feature,
    read_manifest,
    stale_temp_files,
    storage_dtype,
    to_storage,
    write_json_atomic,
)
from .errors import CacheError
from .location import canonical, is_url
from .lock import CacheLock, LockError
from .manage import cache_info, export_npy, list_caches, remove_cache, repair_cache
from .match import diff_inputs, parse_expectations, require_expected, require_same_inputs
from .parquet import export_parquet

__all__ = ["FORMATS", "STORAGE_DTYPES", "CacheError", "CacheLock", "CacheWriter", "FeatureCache",
           "FieldSpec", "LockError", "SplitLayout", "cache_info", "canonical", "content_key",
           "diff_inputs", "export_npy", "export_parquet", "field_checksum", "from_storage",
           "is_feature", "is_url", "list_caches", "parse_expectations", "read_manifest",
           "remove_cache", "repair_cache", "require_expected", "require_same_inputs",
           "stale_temp_files", "storage_dtype", "to_storage", "write_json_atomic"]
