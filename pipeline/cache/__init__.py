"""The feature cache, the contract between stage one and stage two: fingerprint, HDF5 shards, views."""
