"""Batch flow: read and validate the manifest, plan shards, fan them out, merge the metrics.

`launch="local"` runs each shard as a subflow in this process (the CLI's `turbo-batch run`);
`launch="deployments"` starts each shard as a flow run of the `gpu-shard` deployment on the GPU
pool and waits for all of them, resubmitting shards that crash (see tasks/fanout.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import fanout
from tasks.identity import model_identity, output_key, row_hash
from tasks.manifest import Manifest, read_manifest
from tasks.metrics import metrics_frame, publish_artifacts, summary, summary_markdown, write_metrics
from tasks.planning import plan_shards
from tasks.upload import sink_from_uri


@task(name="read-manifest", cache_policy=NO_CACHE)
def load_manifest(manifest: str, run_params: dict[str, Any], strict: bool,
                  allow_https: bool) -> Manifest:
    return read_manifest(manifest, run_params=run_params, strict=strict, allow_https=allow_https)


@flow(name="batch", log_prints=True)
def batch_flow(
    manifest: str,
    sink: str = "out",
    run_params: dict[str, Any] | None = None,
    strict: bool = False,
    allow_https: bool = False,
    launch: str = "local",
    shard_deployment: str = "gpu-shard/gpu-shard",
    max_rows_per_shard: int = 25,
    gpus: int | None = None,
    max_shard_attempts: int = 3,
    checkpoints_dir: str | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    log = get_run_logger()
    m = load_manifest(manifest, run_params or {}, strict, allow_https)
    for w in m.warnings:
        log.warning("%s", w)
    for e in m.errors:
        log.error("invalid %s", e)

    keys = {r.id: output_key(r, row_hash(r, model_identity(r.model, checkpoints_dir)))
            for r in m.rows}
    if gpus is not None:
        n_gpus = gpus
    elif launch == "deployments":   # one online worker per GPU on the shard deployment's pool
        n_gpus = fanout.pool_worker_count(shard_deployment)
    else:
        n_gpus = fanout.local_gpu_count()
    shards = plan_shards(m.rows, gpus=max(n_gpus, 1), max_rows=max_rows_per_shard)
    log.info("%d valid rows, %d invalid, %d shards", len(m.rows), len(m.errors), len(shards))
    specs = [fanout.ShardSpec(index=s.index, rows=s.rows, keys=[keys[r.id] for r in s.rows])
             for s in shards]
    common = {"sink": sink, "checkpoints_dir": checkpoints_dir, "random_weights": random_weights}
    if launch == "local":
        from flows.shard import gpu_shard   # here, not at import: a CPU-pool batch needs no torch
        results = fanout.run_local(gpu_shard, specs, common, n_gpus)
    elif launch == "deployments":
        results = fanout.run_deployments(shard_deployment, specs, common,
                                         max_attempts=max_shard_attempts)
    else:
        raise ValueError(f"launch={launch!r}: expected 'local' or 'deployments'")

    invalid = [{"id": e.id, "row": e.row, "status": "invalid", "error": str(e), "attempts": 0}
               for e in m.errors]
    df = metrics_frame(invalid + results)
    uris = write_metrics(df, sink_from_uri(sink))
    publish_artifacts(df)
    print(summary_markdown(df))
    return {**summary(df), "metrics": uris}
