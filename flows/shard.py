"""GPU shard flow: one Engine (warm models) on one GPU, one task run per row stage.

Rows arrive by reference: `manifest` is the sink key of the batch's validated manifest
(tasks/runs.py) and `rows` their positions in it, so flow-run parameters stay small whatever the
prompts hold. Each row runs its mode's stages (`MODE_STAGES` below: fetch → identify → [pose] →
generate → deliver); the row's output key is computed here, on the host that
generates, from the checkpoint files it actually loads. The returned metrics rows are persisted
so the parent batch flow can read them, and a table artifact is written per shard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import interrupt, progress
from tasks.fetch import FetchSettings
from tasks.metrics import metrics_frame, publish_artifacts
from tasks.pose import PoseSettings, PoseStage
from tasks.rows import RowRunner
from tasks.runs import load_rows
from tasks.upload import sink_from_uri

if TYPE_CHECKING:
    from engine.family import Engine
    from service.client import EngineClient

__all__ = ["MODE_STAGES", "gpu_shard", "new_engine"]

# What a row of each mode goes through, in order. "deliver" is postprocess → validate → upload
# (+ the record), overlapped with the next row's generation.
MODE_STAGES: dict[str, tuple[str, ...]] = {
    "t2v": ("fetch", "identify", "generate", "deliver"),
    "i2v": ("fetch", "identify", "generate", "deliver"),
    # identify before pose: the row's key comes from its inputs and settings, so a finished row
    # skips pose extraction too
    "dance": ("fetch", "identify", "pose", "generate", "deliver"),
}


def new_engine(checkpoints_dir: str | None = None, random_weights: bool = False) -> Engine | EngineClient:
    """The worker's engine, from this process's environment, read once, here: the GPU's engine
    service when TURBO_ENGINE_SOCKET names one (warm across shards and batches; a service that
    does not answer within TURBO_ENGINE_WAIT_S, default 120 s, fails the shard, which the batch
    resubmits), else an in-process Engine."""
    socket = os.environ.get("TURBO_ENGINE_SOCKET")
    if socket:
        from service.client import EngineClient
        client = EngineClient(socket, checkpoints_dir=checkpoints_dir, random_weights=random_weights,
                              wait_s=float(os.environ.get("TURBO_ENGINE_WAIT_S") or 120))
        health = client.wait_ready()
        print(f"engine service pid {health['pid']} on {health['gpu']}: loaded {health['loaded'] or 'nothing yet'}, "
              f"VRAM {health['vram_allocated_gb']} GB allocated of budget {health['vram_budget_gb']}, "
              f"{health['rows_done']} rows done")
        return client
    from engine.family import Engine
    from engine.settings import EngineSettings
    from prompts.embedding_cache import EmbeddingCache
    settings = EngineSettings.from_env(os.environ, checkpoints_dir=checkpoints_dir)
    return Engine(settings, embedding_cache=EmbeddingCache(settings.embed_cache_dir),
                  random_weights=random_weights)


@flow(name="gpu-shard", persist_result=True, log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]  # Prefect's own hints
def gpu_shard(manifest: str, rows: list[int], sink: str, shard: int = 0, attempt: int = 1,
              checkpoints_dir: str | None = None, random_weights: bool = False,
              engine: Any = None) -> list[dict]:
    """`engine`: a warm Engine or EngineClient the caller keeps across shards (local runs; typed
    Any because Prefect builds a model of the parameters and the shard must not import torch);
    a deployed shard process makes its own. TURBO_KEEP_WORK=1 keeps the rows' work folders."""
    out = sink_from_uri(sink)
    items = load_rows(out, manifest, rows)
    engine = engine or new_engine(checkpoints_dir, random_weights)
    work_root = Path(tempfile.mkdtemp(prefix=f"turbo-shard{shard}-"))
    keep = os.environ.get("TURBO_KEEP_WORK") == "1"
    runner = RowRunner(engine, out, work_root, FetchSettings.from_env(os.environ), MODE_STAGES, attempt=attempt,
                       on_done=progress.row_done, keep_work=keep,
                       pose_stage=PoseStage(PoseSettings.from_env(os.environ, checkpoints_dir=checkpoints_dir)))
    try:
        with interrupt.rows_scope():
            for i, row in enumerate(items):
                if interrupt.requested():
                    runner.not_started(row)
                else:
                    runner.run(row, expected_rows=len(items) - i)
            metrics = [m.as_dict() for m in runner.finish()]
    finally:
        if not keep:
            shutil.rmtree(work_root, ignore_errors=True)
    publish_artifacts(metrics_frame(metrics), key=f"shard-{shard}-metrics")
    return metrics
