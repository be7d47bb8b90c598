"""A manifest queue in a bucket: `<prefix>pending/` holds manifests to run, `<prefix>done/` the
finished ones with their metrics, `<prefix>failed/` those whose batch could not run at all.

Everything goes through the R2-configured client of tasks/upload.py (`make_s3_client_from_env`),
so the same R2_* variables (and R2_CA_BUNDLE) apply. A move is a copy then a delete: S3 has no
rename, and a crash between the two leaves the manifest in both places, never in neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


def split_prefix(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b/"); the prefix always ends with "/" (or is empty)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"manifest queue {uri!r}: expected s3://bucket/prefix/")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"manifest queue {uri!r} names no bucket (expected s3://bucket/prefix/)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def list_pending(client: Any, bucket: str, prefix: str) -> list[str]:
    """Keys of the manifests directly under `<prefix>pending/`, oldest name first (sorted)."""
    pending = f"{prefix}pending/"
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pending):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(pending):]
            if "/" not in name and name.lower().endswith(MANIFEST_SUFFIXES):
                keys.append(obj["Key"])
    return sorted(keys)


def download(client: Any, bucket: str, key: str, dest_dir: Path) -> Path:
    path = Path(dest_dir) / Path(key).name
    client.download_file(bucket, key, str(path))
    return path


def move(client: Any, bucket: str, key: str, prefix: str, folder: str) -> str:
    """Copy `key` to `<prefix><folder>/<name>` and delete the original; returns the new key."""
    target = f"{prefix}{folder}/{Path(key).name}"
    client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": key})
    client.delete_object(Bucket=bucket, Key=key)
    return target


def store_beside(client: Any, bucket: str, key: str, source_uri: str, suffix: str) -> str:
    """Put a copy of `source_uri` (s3:// or a local path/file:// URI) at `<key stem><suffix>`."""
    target = f"{key.rsplit('.', 1)[0]}{suffix}"
    if source_uri.startswith("s3://"):
        src_bucket, _, src_key = source_uri[len("s3://"):].partition("/")
        client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": src_bucket, "Key": src_key})
    else:
        local = source_uri[len("file://"):] if source_uri.startswith("file://") else source_uri
        client.upload_file(local, bucket, target)
    return target
