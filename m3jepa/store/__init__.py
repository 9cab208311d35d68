"""Feature stores: self-describing Zarr/HDF5 shards joined to stage 2 by files."""
