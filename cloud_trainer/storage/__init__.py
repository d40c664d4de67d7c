"""Blob stores: ``local`` (a directory) and ``gcs`` (Google Cloud Storage)."""

from cloud_trainer.storage.base import (
    BlobNotFound,
    BlobStore,
    create_blob_store,
    validate_key,
    validate_prefix,
)

__all__ = ["BlobNotFound", "BlobStore", "create_blob_store", "validate_key", "validate_prefix"]
