"""Batch flow: read and validate the manifest, plan shards, fan them out, merge the metrics.

`launch="local"` runs each shard as a subflow in this process (the CLI's `turbo-batch run`);
`launch="deployments"` starts each shard as a flow run of the `gpu-shard` deployment on the GPU
pool and waits for all of them, resubmitting shards that crash (see flows/fanout.py).

Each run has a folder in the sink (tasks/runs.py): the validated manifest the shards read their
rows from, and the run's metrics; `runs/latest.json` points at the newest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import fanout
from tasks.manifest import Manifest, read_manifest
from tasks.metrics import MetricsRow, gpu_usage, metrics_frame, publish_artifacts, summary, summary_markdown
from tasks.planning import plan_shards
from tasks.runs import RunFolder, save_manifest, write_run_metrics
from tasks.upload import sink_from_uri

# Where a run's metrics are written first, and stay when the sink refuses them.
LOCAL_RUNS = Path.home() / ".cache" / "turbo-batch" / "runs"


@task(name="read-manifest", cache_policy=NO_CACHE)
def load_manifest(manifest: str, run_params: dict[str, Any], strict: bool,
                  allow_https: bool, validated: str | None = None, ignore_unknown: bool = False) -> Manifest:
    """Read and validate the manifest, or take the caller's validated copy (the CLI's) unread.

    Local inputs are decoded here, once; remote ones by the fetch stage on the GPU host."""
    if validated is not None:
        return Manifest.load(validated)
    return read_manifest(manifest, run_params=run_params, strict=strict, allow_https=allow_https,
                         ignore_unknown=ignore_unknown)


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
    shards_per_gpu: int | None = None,
    max_shard_attempts: int = 3,
    checkpoints_dir: str | None = None,
    random_weights: bool = False,
    validated: str | None = None,
    ignore_unknown: bool = False,
    pose_ahead: bool = True,
) -> dict[str, Any]:
    """`validated`: a file written by `Manifest.save` (the CLI validates before it starts a server);
    the manifest is then not read a second time. `pose_ahead`: dance rows' poses are extracted
    here (the CPU pool), before the shards start, and stored in the sink for them."""
    log = get_run_logger()
    started = time.monotonic()
    if launch == "deployments":   # a pool over several hosts: nothing on this host's disk (before reading)
        fanout.require_shared_storage(fanout.live_worker_hosts(shard_deployment), manifest, sink, os.environ)
    m = load_manifest(manifest, run_params or {}, strict, allow_https, validated, ignore_unknown)
    for w in m.warnings:
        log.warning("%s", w)
    for e in m.errors:
        log.error("invalid %s", e)

    if launch == "deployments":   # one live worker per GPU on the shard deployment's pool; none: fail now
        pickup_timeout_s = fanout.pickup_timeout_from_env(os.environ)
        start_timeout_s = fanout.start_timeout_from_env(os.environ)
        live_workers = fanout.require_live_workers(shard_deployment)
        n_gpus = gpus if gpus is not None else live_workers
        per_gpu = shards_per_gpu if shards_per_gpu is not None else fanout.shards_per_gpu_from_env(os.environ)
    elif gpus is not None:
        n_gpus, per_gpu = gpus, 1
    else:
        n_gpus, per_gpu = fanout.local_gpu_count(), 1
    # Deployed shards on engine services: per_gpu shards per GPU at once, their rows interleaved
    # at the service (start-workers.sh); local shards run one per GPU.
    shards = plan_shards(m.rows, gpus=max(n_gpus, 1) * per_gpu, max_rows=max_rows_per_shard)
    log.info("%d valid rows, %d invalid, %d shards", len(m.rows), len(m.errors), len(shards))
    out = sink_from_uri(sink)
    if pose_ahead:
        _poses_ahead([r for r in m.rows if r.mode == "dance"], out, checkpoints_dir)
    run = RunFolder.new(_run_id())
    position = {id(r): i for i, r in enumerate(m.rows)}
    specs = [fanout.ShardSpec(index=s.index, rows=s.rows, positions=[position[id(r)] for r in s.rows])
             for s in shards]
    common = {"sink": sink, "manifest": save_manifest(out, run, m), "checkpoints_dir": checkpoints_dir,
              "random_weights": random_weights}
    if launch == "local":
        from flows import interrupt
        from flows.shard import gpu_shard, new_engine  # here: a CPU-pool batch needs no torch
        with interrupt.rows_scope():   # the CLI's Ctrl-C/SIGTERM, between shards too
            results = fanout.run_local(gpu_shard, specs, common, n_gpus,
                                       engine=new_engine(checkpoints_dir, random_weights) if n_gpus <= 1 else None)
    elif launch == "deployments":
        results = fanout.run_deployments(shard_deployment, specs, common, max_attempts=max_shard_attempts,
                                         pickup_timeout_s=pickup_timeout_s, start_timeout_s=start_timeout_s)
    else:
        raise ValueError(f"launch={launch!r}: expected 'local' or 'deployments'")

    invalid = [MetricsRow.invalid(e).as_dict() for e in m.errors]
    df = metrics_frame(invalid + results)
    uris = write_run_metrics(df, out, run, LOCAL_RUNS)
    wall_s = time.monotonic() - started
    publish_artifacts(df, wall_s=wall_s)
    print(summary_markdown(df, wall_s=wall_s))
    problems = [f"row {r['row']} ({r['id']}): {r['error']}" for r in results if r["status"] in ("failed", "invalid")]
    return {**summary(df), "metrics": uris, "run": run.name, "problems": problems, "wall_s": wall_s,
            "gpus": gpu_usage(df, wall_s)}


def _poses_ahead(rows: list, out: Any, checkpoints_dir: str | None) -> None:
    """Each dance row's pose stage as its own task run, a few at a time; a failure only means the
    shard extracts that row's poses itself."""
    if not rows:
        return
    from tasks.fetch import FetchSettings
    from tasks.pose import PoseSettings, PoseStage, pose_ahead
    log = get_run_logger()
    stage = PoseStage(PoseSettings.from_env(os.environ, checkpoints_dir=checkpoints_dir))
    fetch_settings = FetchSettings.from_env(os.environ)
    futures = [pose_ahead.submit(r, stage, out, fetch_settings) for r in rows]
    for r, f in zip(rows, futures):
        try:
            log.info("poses of row %s (%s): %s", r.row, r.id, f.result())
        except Exception as e:       # e.g. no DWPose files on this host: the shard tries again
            log.warning("poses of row %s (%s) not made ahead: %s", r.row, r.id, e)


def _run_id() -> str | None:
    from prefect.context import FlowRunContext
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
