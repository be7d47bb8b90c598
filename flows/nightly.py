"""Nightly flow: run every manifest queued in the bucket, then file it under done/ with its metrics.

    s3://bucket/manifests/pending/a.csv   ->  batch_flow(a.csv)  ->  s3://bucket/manifests/done/a.csv
                                                                     s3://bucket/manifests/done/a.metrics.parquet
                                                                     s3://bucket/manifests/done/a.metrics.csv
A manifest that cannot be run at all (unreadable, --strict refusal) goes to failed/ so it is not
retried every night; row failures inside a batch are recorded in its metrics and count as done.
Queued manifests are downloaded first, so local input paths in them are not supported: use
s3:// (or https://) URIs for images, driving videos and audio.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.batch import batch_flow
from tasks import manifests_queue as queue
from tasks.errors import NoLiveWorkersError
from tasks.upload import make_s3_client_from_env


@flow(name="nightly", log_prints=True)
def nightly_flow(bucket_prefix: str = "s3://turbo-batch/manifests/",
                 sink: str = "s3://turbo-batch/videos",
                 shard_deployment: str = "gpu-shard/gpu-shard",
                 max_rows_per_shard: int = 25,
                 max_shard_attempts: int = 3) -> list[dict[str, Any]]:
    log = get_run_logger()
    client = make_s3_client_from_env()
    bucket, prefix = queue.split_prefix(bucket_prefix)
    keys = queue.list_pending(client, bucket, prefix)
    log.info("%d manifest(s) pending under s3://%s/%spending/", len(keys), bucket, prefix)
    done: list[dict[str, Any]] = []
    for key in keys:
        with tempfile.TemporaryDirectory(prefix="turbo-nightly-") as tmp:
            local = queue.download(client, bucket, key, Path(tmp))
            try:
                result = batch_flow(manifest=str(local), sink=sink, launch="deployments",
                                    shard_deployment=shard_deployment,
                                    max_rows_per_shard=max_rows_per_shard,
                                    max_shard_attempts=max_shard_attempts)
            except NoLiveWorkersError:   # nothing can run tonight: leave every manifest pending
                raise
            except Exception as e:   # this manifest cannot run; the others still do
                log.error("manifest s3://%s/%s failed: %s", bucket, key, e)
                moved = queue.move(client, bucket, key, prefix, "failed")
                done.append({"manifest": f"s3://{bucket}/{moved}", "error": str(e)})
                continue
        moved = queue.move(client, bucket, key, prefix, "done")
        for ext, uri in result["metrics"].items():
            queue.store_beside(client, bucket, moved, uri, f".metrics.{ext}")
        log.info("s3://%s/%s: %d succeeded, %d skipped, %d failed, %d invalid", bucket, moved,
                 result["succeeded"], result["skipped"], result["failed"], result["invalid"])
        done.append({"manifest": f"s3://{bucket}/{moved}",
                     **{k: v for k, v in result.items() if k != "metrics"}})
    return done
