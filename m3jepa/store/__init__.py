"""Feature stores: self-describing Zarr/HDF5 shards joined to stage 2 by files."""

from __future__ import annotations

from m3jepa.store.lock import StoreLockedError
from m3jepa.store.manifest import (
    IncompleteStoreError,
    Manifest,
    RowMeta,
    ShardInfo,
    StoreError,
    StoreMismatchError,
    assign_shards,
    encoder_slug,
    plan_shards,
    rows_from_records,
    store_path,
)
from m3jepa.store.reader import FeatureStore, RowTable, list_stores, open_store
from m3jepa.store.verify import VerifyReport, verify_store
from m3jepa.store.writer import StoreWriter, is_complete

__all__ = [
    "FeatureStore",
    "IncompleteStoreError",
    "Manifest",
    "RowMeta",
    "RowTable",
    "ShardInfo",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "VerifyReport",
    "assign_shards",
    "encoder_slug",
    "is_complete",
    "list_stores",
    "open_store",
    "plan_shards",
    "rows_from_records",
    "store_path",
    "verify_store",
]
