"""Metrics stage: one row per manifest row, whatever happened to it.

Written as metrics.parquet and metrics.csv beside the outputs, as a Prefect table artifact and a
markdown summary artifact (counts, totals, GPU-seconds per video); `turbo-batch report DIR`
prints the same summary.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

COLUMNS: dict[str, pl.DataType] = {
    # row
    "id": pl.String(), "row": pl.Int64(), "status": pl.String(), "error": pl.String(),
    "attempts": pl.Int64(),
    # setup
    "mode": pl.String(), "model": pl.String(), "gpu": pl.String(), "seed": pl.Int64(),
    # output shape
    "width": pl.Int64(), "height": pl.Int64(), "frames": pl.Int64(), "fps": pl.Int64(),
    # stage seconds
    "t_pose_s": pl.Float64(), "t_text_s": pl.Float64(), "t_denoise_s": pl.Float64(),
    "t_vae_s": pl.Float64(), "t_postprocess_s": pl.Float64(), "t_validate_s": pl.Float64(),
    "t_upload_s": pl.Float64(), "t_total_s": pl.Float64(),
    # resources
    "peak_vram_gb": pl.Float64(), "text_cache_hit": pl.Boolean(),
    # outputs
    "output_uri": pl.String(), "poster_uri": pl.String(), "preview_uri": pl.String(),
    "presigned_url": pl.String(), "sha256": pl.String(), "bytes": pl.Int64(),
}
STATUSES = ("succeeded", "failed", "invalid", "skipped")
GPU_STAGES = ("t_pose_s", "t_text_s", "t_denoise_s", "t_vae_s")


def metrics_frame(rows: Iterable[Mapping[str, object]]) -> pl.DataFrame:
    """Rows → a frame with exactly COLUMNS, in order, missing values null; sorted by row number."""
    records = [{c: r.get(c) for c in COLUMNS} for r in rows]
    unknown = {s for r in records if (s := r["status"]) not in STATUSES}
    if unknown:
        raise ValueError(f"unknown metrics status {sorted(map(str, unknown))}; expected {STATUSES}")
    return pl.DataFrame(records, schema=COLUMNS, orient="row").sort("row", nulls_last=True)


def write_metrics(df: pl.DataFrame, sink, prefix: str = "metrics") -> dict[str, str]:
    """Write metrics.parquet and metrics.csv through the sink; returns their URIs."""
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext, write in (("parquet", df.write_parquet), ("csv", df.write_csv)):
            path = Path(tmp) / f"{prefix}.{ext}"
            write(path)
            ctype = "application/vnd.apache.parquet" if ext == "parquet" else "text/csv"
            res = sink.put(path, f"{prefix}.{ext}", content_type=ctype, cache_control="no-cache",
                           overwrite=True)
            uris[ext] = res.uri
    return uris


def summary(df: pl.DataFrame) -> dict[str, float]:
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    done = df.filter(pl.col("status") == "succeeded")
    gpu_s = float(done.select(sum(pl.col(c).fill_null(0) for c in GPU_STAGES)).to_series().sum()) \
        if done.height else 0.0
    return {
        "rows": df.height, **counts,
        "gpu_seconds": gpu_s,
        "gpu_seconds_per_video": gpu_s / done.height if done.height else 0.0,
        "total_seconds": float(done["t_total_s"].fill_null(0).sum()) if done.height else 0.0,
        "bytes": int(done["bytes"].fill_null(0).sum()) if done.height else 0,
    }


def summary_markdown(df: pl.DataFrame, title: str = "turbo-batch run") -> str:
    s = summary(df)
    lines = [
        f"# {title}", "",
        "| rows | succeeded | skipped | failed | invalid | GPU-s total | GPU-s per video | output MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['rows']} | {s['succeeded']} | {s['skipped']} | {s['failed']} | {s['invalid']} | "
        f"{s['gpu_seconds']:.1f} | {s['gpu_seconds_per_video']:.2f} | {s['bytes'] / 1e6:.1f} |",
    ]
    bad = df.filter(pl.col("status").is_in(["failed", "invalid"]))
    if bad.height:
        lines += ["", "## Rows that did not succeed", ""]
        lines += [f"- row {r['row']} `{r['id']}` ({r['status']}): {r['error']}"
                  for r in bad.iter_rows(named=True)]
    return "\n".join(lines) + "\n"


def publish_artifacts(df: pl.DataFrame, key: str = "turbo-batch-metrics") -> None:
    """Table + markdown artifacts on the current Prefect run (no-op outside a run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import get_run_context
    try:
        get_run_context()
    except Exception:
        return
    table = [{k: v for k, v in r.items() if v is not None} for r in df.iter_rows(named=True)]
    create_table_artifact(table=table, key=key, description="per-row metrics")
    create_markdown_artifact(markdown=summary_markdown(df), key=f"{key}-summary",
                             description="batch summary")


def read_metrics(location: str | Path) -> pl.DataFrame:
    """metrics.parquet from a folder, a file path or an s3:// prefix."""
    loc = str(location)
    if loc.startswith("s3://"):
        from tasks.upload import sink_from_uri
        data = sink_from_uri(loc).read_bytes("metrics.parquet")
        return pl.read_parquet(io.BytesIO(data))
    p = Path(loc)
    return pl.read_parquet(p / "metrics.parquet" if p.is_dir() else p)
