"""GPU shard flow: one warm model, one task run per row.

Rows arrive as plain dicts (flow parameters must be JSON) with their output keys. Generation runs
in this thread, row after row, on the one GPU the worker pins; post-processing, validation and
upload of row N run in a small thread pool while row N+1 generates. The returned metrics rows
are persisted so the parent batch flow can read them, and a table artifact is written per shard.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows import progress
from tasks.deliver import deliver, find_completed, record_summary
from tasks.generate import generate
from tasks.manifest import ManifestRow
from tasks.metrics import metrics_frame, publish_artifacts
from tasks.upload import sink_from_uri


@flow(name="gpu-shard", persist_result=True, log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=2))
def gpu_shard(rows: list[dict], keys: list[str], sink: str, shard: int = 0, attempt: int = 1,
              checkpoints_dir: str | None = None, random_weights: bool = False) -> list[dict]:
    log = get_run_logger()
    out = sink_from_uri(sink)
    work_root = Path(tempfile.mkdtemp(prefix=f"turbo-shard{shard}-"))
    metrics: list[dict] = []
    pending = []
    for i, (raw, key) in enumerate(zip(rows, keys)):
        row = ManifestRow(**raw)
        base = {"id": row.id, "row": row.row, "mode": row.mode, "model": row.model,
                "seed": row.seed, "attempts": attempt}
        record = find_completed(out, key)
        if record is not None:
            metrics.append({**base, "status": "skipped", **record_summary(record)})
            progress.row_done(row.id, "skipped")
            continue
        t0 = time.perf_counter()
        try:
            gen = generate(row, work_root / key, checkpoints_dir=checkpoints_dir,
                           random_weights=random_weights, expected_rows=len(rows) - i)
        except Exception as e:   # this row fails; the shard goes on
            log.error("row %s (%s) failed in generate: %s", row.row, row.id, e)
            metrics.append({**base, "status": "failed", "error": f"generate: {e}",
                            "t_total_s": time.perf_counter() - t0})
            progress.row_done(row.id, "failed")
            continue
        base.update(gpu=gen.gpu, t_generate_s=gen.timings["total_s"], peak_vram_gb=gen.peak_vram_gb, text_cache_hit=gen.text_cache_hit,
                    t_text_s=gen.timings["text_s"], t_denoise_s=gen.timings["denoise_s"],
                    t_vae_s=gen.timings["vae_s"])
        future = deliver.submit(gen.frames_path, row.postprocess_fields(), key, out)
        pending.append((row, base, future))
        # Overlap: keep at most one delivery running behind the next generation (frames are
        # large). When generation itself ran on the CPU, overlapping only oversubscribes the
        # cores both stages need, so wait for each delivery.
        pending = _collect(pending, metrics, keep=0 if gen.gpu.startswith("cpu") else 1)
    _collect(pending, metrics, keep=0)
    publish_artifacts(metrics_frame(metrics), key=f"shard-{shard}-metrics")
    return metrics


def _collect(pending: list, metrics: list[dict], keep: int) -> list:
    while len(pending) > keep:
        row, base, future = pending.pop(0)
        gen_s = base.pop("t_generate_s")
        try:
            res = future.result()
        except Exception as e:
            metrics.append({**base, "status": "failed", "error": f"deliver: {e}", "t_total_s": gen_s})
            progress.row_done(row.id, "failed")
            continue
        stage_s = res.t_postprocess_s + res.t_validate_s + res.t_upload_s
        metrics.append({**base, "status": "succeeded", "width": res.width, "height": res.height,
                        "frames": res.frames, "fps": res.fps, "t_postprocess_s": res.t_postprocess_s,
                        "t_validate_s": res.t_validate_s, "t_upload_s": res.t_upload_s,
                        "t_total_s": gen_s + stage_s, "output_uri": res.output_uri,
                        "poster_uri": res.poster_uri, "preview_uri": res.preview_uri,
                        "presigned_url": res.presigned_url, "sha256": res.sha256, "bytes": res.bytes})
        progress.row_done(row.id, "succeeded")
    return pending
