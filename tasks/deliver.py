"""Deliver stage: post-process a row's frames, validate the mp4, upload everything, then the record.

The record (`<key>.json`) is uploaded last and names every output with its size and sha256, so
its presence means the row is complete. A re-run looks for it first (`find_completed`) and skips
the row, GPU work included, when every output it lists still exists with that size and sha256.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_transient
from tasks.postprocess import PostprocessRecipe, run_postprocess
from tasks.upload import Sink
from tasks.validate_video import validate_video

CONTENT_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg", ".webp": "image/webp",
                 ".json": "application/json",
                 # a dance row's pose stage outputs, uploaded beside its video
                 ".pose.mp4": "video/mp4", ".pose.npz": "application/octet-stream",
                 ".pose-negative.npz": "application/octet-stream", ".pose.json": "application/json"}


@dataclass
class DeliverOutput:
    width: int
    height: int
    frames: int
    fps: int
    t_postprocess_s: float
    t_validate_s: float
    t_upload_s: float
    output_uri: str
    poster_uri: str
    preview_uri: str | None
    presigned_url: str | None
    poster_presigned_url: str | None
    sha256: str
    bytes: int
    uploaded: int          # objects actually written (0 when everything already existed)


def recipe_for(fields: dict) -> PostprocessRecipe:
    known: dict[str, Any] = {k: fields.get(k) for k in
                             ("fps", "interpolate_fps", "upscale", "watermark", "preview", "audio")}
    return PostprocessRecipe(**{k: v for k, v in known.items() if v is not None})


def run_deliver(frames_path: Path, fields: dict, key: str, sink: Sink,
                upload: Callable[..., tuple[dict, int]] | None = None) -> DeliverOutput:
    """Post-process, validate, upload. `upload` defaults to the plain function; the Prefect task
    passes the retrying `upload_outputs` task."""
    work = frames_path.parent
    t0 = time.perf_counter()
    out = run_postprocess(frames_path, recipe_for(fields), work, key)
    t1 = time.perf_counter()
    validate_video(out.video_path, out.width, out.height, out.frames,
                   expect_audio=bool(fields.get("audio")))
    t2 = time.perf_counter()
    files = {".mp4": Path(out.video_path), ".jpg": Path(out.poster_path)}
    if out.preview_path:
        files[".webp"] = Path(out.preview_path)
    # Other stages' outputs for the sink (the pose stage's), by extension: `<key><ext>`.
    files.update({ext: Path(p) for ext, p in (fields.get("extras") or {}).items()})
    meta = {"key": key, "width": out.width, "height": out.height, "frames": out.frames, "fps": out.fps}
    results, written = (upload or run_upload_outputs)(files, key, sink, meta)
    t3 = time.perf_counter()
    video = results[".mp4"]
    return DeliverOutput(
        width=out.width, height=out.height, frames=out.frames, fps=out.fps,
        t_postprocess_s=t1 - t0, t_validate_s=t2 - t1, t_upload_s=t3 - t2,
        output_uri=video.uri, poster_uri=results[".jpg"].uri,
        preview_uri=results[".webp"].uri if ".webp" in results else None,
        presigned_url=video.presigned_url, poster_presigned_url=results[".jpg"].presigned_url,
        sha256=video.sha256, bytes=video.bytes, uploaded=written)


def run_upload_outputs(files: Mapping[str, Path], key: str, sink: Sink, meta: dict) -> tuple[dict, int]:
    """Upload each output as `<key><ext>`, then the record naming them all (the commit marker)."""
    results = {ext: sink.put(f, f"{key}{ext}", content_type=CONTENT_TYPES[ext]) for ext, f in files.items()}
    record = {**meta, "outputs": {ext: {"key": r.key, "uri": r.uri, "sha256": r.sha256,
                                        "bytes": r.bytes} for ext, r in results.items()}}
    record_path = files[".mp4"].parent / f"{key}.json"
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
    rec = sink.put(record_path, f"{key}.json", content_type=CONTENT_TYPES[".json"],
                   cache_control="no-cache", overwrite=True)
    return results, sum(not r.skipped for r in (*results.values(), rec))


def find_completed(sink: Sink, key: str) -> dict | None:
    """The row's record if it and every output it names exist with the recorded size and sha256."""
    raw = sink.read_bytes(f"{key}.json", missing_ok=True)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        # Verify by the sink-relative key `<key><ext>`: the recorded "key" of an S3 output
        # already includes the sink's prefix, which verify() would add a second time.
        for ext, out in record["outputs"].items():
            if not sink.verify(f"{key}{ext}", out["bytes"], out["sha256"]):
                return None
    except (ValueError, KeyError, TypeError):
        return None       # a damaged record: redo the row
    return record


# Only the upload retries: transient errors (5xx, timeouts, after botocore's own retries) get two
# more tries with backoff; auth errors, conflicts and bad inputs do not. Post-processing is never
# redone by an upload retry. A failure fails only this row.
upload_outputs = task(name="upload", task_run_name="upload-{key}",
                      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
                      retry_condition_fn=retry_transient)(run_upload_outputs)


def _deliver_with_retrying_upload(frames_path: Path, fields: dict, key: str, sink: Sink) -> DeliverOutput:
    return run_deliver(frames_path, fields, key, sink, upload=upload_outputs)


deliver = task(name="deliver", task_run_name="deliver-{key}",
               cache_policy=NO_CACHE)(_deliver_with_retrying_upload)


__all__ = ["DeliverOutput", "deliver", "find_completed", "run_deliver",
           "upload_outputs"]
