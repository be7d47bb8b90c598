"""A batch run's folder in the sink: the one place that knows its layout.

    runs/<UTC yyyymmddThhmmssZ>-<run id[:8]>/manifest.json    the validated rows; shards take
                                                               theirs by position (by reference,
                                                               never inside flow-run parameters)
    runs/<…>/metrics.parquet, metrics.csv                      every row of this run
    runs/latest.json                                           {"run": "<folder>"}: the newest
                                                               run that wrote its metrics

A run never overwrites another run's files, so a re-run keeps the first run's costs and two
concurrent runs keep both. Metrics are written to a local folder first, then uploaded with
retries; if the sink refuses them, they stay in the local folder and the batch still ends.
`read_run_metrics` is what `turbo-batch report` reads: the latest run, or every run merged by
row with the newest status.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_transient
from tasks.manifest import Manifest, ManifestRow
from tasks.metrics import write_metrics
from tasks.upload import LocalSink, Sink

__all__ = ["LATEST", "RunFolder", "load_rows", "read_run_metrics", "save_manifest", "write_run_metrics"]

log = logging.getLogger(__name__)

LATEST = "runs/latest.json"
METRICS_FILES = ("metrics.parquet", "metrics.csv")
COST_COLUMNS = ("gpu", "t_fetch_s", "t_pose_s", "t_text_s", "t_denoise_s", "t_vae_s", "t_postprocess_s",
                "t_validate_s", "t_upload_s", "t_total_s", "peak_vram_gb")


@dataclass(frozen=True)
class RunFolder:
    name: str                                  # <UTC timestamp>-<run id[:8]>

    @classmethod
    def new(cls, run_id: str | None = None, now: datetime | None = None) -> RunFolder:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        ident = (run_id or secrets.token_hex(4)).replace("-", "")[:8]
        return cls(f"{stamp}-{ident}")

    def key(self, file: str) -> str:
        return f"runs/{self.name}/{file}"


# -- the manifest, by reference ---------------------------------------------------------------

def _save_manifest(sink: Sink, run: RunFolder, manifest: Manifest) -> str:
    """Put the validated manifest into the run folder; returns its sink key."""
    with tempfile.TemporaryDirectory(prefix="turbo-manifest-") as tmp:
        path = manifest.save(Path(tmp) / "manifest.json")
        sink.put(path, run.key("manifest.json"), content_type="application/json",
                 cache_control="no-cache", overwrite=True)
    return run.key("manifest.json")


save_manifest = task(name="save-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5],
                     retry_condition_fn=retry_transient)(_save_manifest)


def _load_rows(sink: Sink, key: str, positions: list[int]) -> list[ManifestRow]:
    data = sink.read_bytes(key)
    assert data is not None          # missing_ok=False: a missing key raises
    rows = Manifest.from_bytes(data).rows
    return [rows[i] for i in positions]


# A shard's first read: retried like any other sink read.
load_rows = task(name="load-rows", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5],
                 retry_condition_fn=retry_transient)(_load_rows)


# -- metrics ------------------------------------------------------------------------------------

def _upload_metrics(sink: Sink, run: RunFolder, folder: Path) -> dict[str, str]:
    uris = {}
    for name in METRICS_FILES:
        ctype = "application/vnd.apache.parquet" if name.endswith(".parquet") else "text/csv"
        res = sink.put(folder / name, run.key(name), content_type=ctype, cache_control="no-cache",
                       overwrite=True)
        uris[name.rsplit(".", 1)[1]] = res.uri
    pointer = folder / "latest.json"
    pointer.write_text(json.dumps({"run": run.name}))
    sink.put(pointer, LATEST, content_type="application/json", cache_control="no-cache", overwrite=True)
    return uris


upload_metrics = task(name="upload-metrics", cache_policy=NO_CACHE, retries=2,
                      retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)(_upload_metrics)


def write_run_metrics(df: pl.DataFrame, sink: Sink, run: RunFolder, local_root: Path) -> dict[str, str]:
    """Write the run's metrics under local_root first, then upload them (retried). Returns the
    URIs where they are: the sink's, or the local files' when the sink refused them."""
    folder = local_root / run.name
    folder.mkdir(parents=True, exist_ok=True)
    local = write_metrics(df, LocalSink(folder))
    try:
        uris = upload_metrics(sink, run, folder)
    except Exception as e:    # the batch's results are not lost: they stay on this host
        log.error("metrics could not be uploaded to the sink (%s); they are kept at %s", e, folder)
        return local
    shutil.rmtree(folder, ignore_errors=True)
    return uris


# -- reading them back --------------------------------------------------------------------------

def read_run_metrics(sink: Sink, *, all_runs: bool = False) -> pl.DataFrame:
    """The latest run's metrics; or, with all_runs, every run's merged by row (the newest status,
    with the costs of the run that last generated the row when the newest run skipped it)."""
    if not all_runs:
        pointer = sink.read_bytes(LATEST, missing_ok=True)
        if pointer is None:
            raise FileNotFoundError(f"no runs/latest.json in {sink!r}: no batch has finished there")
        return _read_parquet(sink, f"runs/{json.loads(pointer)['run']}/metrics.parquet")
    names = sorted({k.split("/")[1] for k in sink.list("runs/") if k.endswith("/metrics.parquet")})
    if not names:
        raise FileNotFoundError(f"no runs/*/metrics.parquet in {sink!r}")
    frames = [_read_parquet(sink, f"runs/{n}/metrics.parquet").with_columns(pl.lit(n).alias("run"))
              for n in names]
    return _merge_runs(pl.concat(frames, how="diagonal_relaxed"))


def _read_parquet(sink: Sink, key: str) -> pl.DataFrame:
    data = sink.read_bytes(key)
    assert data is not None
    return pl.read_parquet(io.BytesIO(data))


def _merge_runs(df: pl.DataFrame) -> pl.DataFrame:
    ordered = df.sort("run")
    newest = ordered.group_by("id", maintain_order=True).last()
    generated = (ordered.filter(pl.col("status") == "succeeded")
                 .group_by("id", maintain_order=True).last()
                 .select("id", *[pl.col(c).alias(f"{c}__gen") for c in COST_COLUMNS]))
    merged = newest.join(generated, on="id", how="left")
    fill: list[Any] = [pl.when(pl.col("status") == "skipped").then(pl.col(f"{c}__gen")).otherwise(pl.col(c))
                       .alias(c) for c in COST_COLUMNS]
    return merged.with_columns(fill).drop([f"{c}__gen" for c in COST_COLUMNS]).sort("row", nulls_last=True)
