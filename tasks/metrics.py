"""Metrics stage: one row per manifest row, whatever happened to it.

`MetricsRow` is built from the stage outputs in one place. A run's rows are written as
metrics.parquet and metrics.csv (CSV cells neutralised against formula injection) in the run's
folder (tasks/runs.py), as a Prefect table artifact and a markdown summary artifact (counts,
totals, engine seconds per video, a contact sheet of posters); `turbo-batch report` prints the
same summary.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from tasks.deliver import DeliverOutput
    from tasks.fetch import FetchedInputs
    from tasks.generate import GenerateOutput
    from tasks.manifest import ManifestRow, RowError
    from tasks.pose import PoseOutput

__all__ = ["COLUMNS", "STATUSES", "MetricsRow", "gpu_usage", "metrics_frame", "publish_artifacts",
           "summary", "summary_markdown", "write_metrics"]

COLUMNS: dict[str, pl.DataType] = {
    # row
    "id": pl.String(), "row": pl.Int64(), "status": pl.String(), "error": pl.String(),
    "attempts": pl.Int64(),
    # setup
    "mode": pl.String(), "model": pl.String(), "gpu": pl.String(), "seed": pl.Int64(),
    # output shape
    "width": pl.Int64(), "height": pl.Int64(), "frames": pl.Int64(), "fps": pl.Int64(),
    # stage seconds
    "t_fetch_s": pl.Float64(), "t_pose_s": pl.Float64(), "t_text_s": pl.Float64(), "t_denoise_s": pl.Float64(),
    "t_image_s": pl.Float64(), "t_switch_s": pl.Float64(),
    "t_vae_s": pl.Float64(), "t_postprocess_s": pl.Float64(), "t_validate_s": pl.Float64(),
    "t_upload_s": pl.Float64(), "t_total_s": pl.Float64(),
    # the engine's side of the row: waiting for the GPU's service, time in it, model loading (0: warm)
    "queue_wait_s": pl.Float64(), "service_s": pl.Float64(), "model_load_s": pl.Float64(),
    # resources
    "peak_vram_gb": pl.Float64(), "text_cache_hit": pl.Boolean(),
    # two-expert models (i2v): memory policy, experts moved onto the GPU, rows sharing those moves
    "expert_policy": pl.String(), "expert_loads": pl.Int64(), "expert_group": pl.Int64(),
    # dance: the pose stage's frames and rate, and the sampler that ran
    "pose_frames": pl.Int64(), "pose_fps": pl.Float64(), "pose_reused": pl.Boolean(), "sampler": pl.String(),
    # outputs
    "output_uri": pl.String(), "poster_uri": pl.String(), "preview_uri": pl.String(),
    "presigned_url": pl.String(), "poster_presigned_url": pl.String(), "sha256": pl.String(),
    "bytes": pl.Int64(),
}
STATUSES = ("succeeded", "failed", "invalid", "skipped")
GPU_STAGES = ("t_pose_s", "t_text_s", "t_image_s", "t_switch_s", "t_denoise_s", "t_vae_s")


@dataclass
class MetricsRow:
    """One metrics row, built from the stage outputs in one place (the only place that does)."""
    id: str | None
    row: int | None
    status: str
    attempts: int
    mode: str | None = None
    model: str | None = None
    seed: int | None = None
    error: str | None = None
    gpu: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    t_fetch_s: float | None = None
    t_pose_s: float | None = None
    t_text_s: float | None = None
    t_denoise_s: float | None = None
    t_image_s: float | None = None                 # i2v: the image's VAE encode
    t_switch_s: float | None = None                # i2v: moving experts (the switch, and back in)
    t_vae_s: float | None = None
    t_postprocess_s: float | None = None
    t_validate_s: float | None = None
    t_upload_s: float | None = None
    t_total_s: float | None = None
    queue_wait_s: float | None = None            # waiting for the engine service's GPU
    service_s: float | None = None               # in the engine: model load, text, denoise, decode
    model_load_s: float | None = None            # 0 when the model was warm
    peak_vram_gb: float | None = None
    text_cache_hit: bool | None = None
    expert_policy: str | None = None
    expert_loads: int | None = None
    expert_group: int | None = None
    pose_frames: int | None = None
    pose_fps: float | None = None
    pose_reused: bool | None = None          # taken from the sink's pose store (made ahead, or by a past run)
    sampler: str | None = None
    output_uri: str | None = None
    poster_uri: str | None = None
    preview_uri: str | None = None
    presigned_url: str | None = None
    poster_presigned_url: str | None = None      # so the contact sheet shows S3/R2 posters
    sha256: str | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown metrics status {self.status!r}; expected {STATUSES}")

    @classmethod
    def start(cls, row: ManifestRow, attempt: int) -> MetricsRow:
        return cls(id=row.id, row=row.row, status="failed", attempts=attempt, mode=row.mode,
                   model=row.model, seed=row.seed)

    @classmethod
    def invalid(cls, error: RowError) -> MetricsRow:
        return cls(id=error.id, row=error.row, status="invalid", attempts=0, error=str(error))

    def fetched(self, out: FetchedInputs) -> MetricsRow:
        self.t_fetch_s = out.t_fetch_s
        return self

    def posed(self, out: PoseOutput) -> MetricsRow:
        self.t_pose_s, self.pose_frames, self.pose_fps = out.t_pose_s, out.pose_frames, out.pose_fps
        self.pose_reused = out.reused
        return self

    def generated(self, out: GenerateOutput) -> MetricsRow:
        t = out.timings
        self.gpu, self.peak_vram_gb, self.text_cache_hit = out.gpu, out.peak_vram_gb, out.text_cache_hit
        self.t_text_s, self.t_denoise_s, self.t_vae_s = t["text_s"], t["denoise_s"], t["vae_s"]
        self.sampler = out.sampler or None
        self.queue_wait_s, self.service_s, self.model_load_s = out.queue_wait_s, out.service_s, out.model_load_s
        if out.expert_policy:
            self.t_image_s = t.get("image_s")
            self.t_switch_s = t.get("switch_s", 0.0) + t.get("expert_in_s", 0.0)
            self.expert_policy, self.expert_loads, self.expert_group = (
                out.expert_policy, out.expert_loads, out.expert_group)
        self.t_total_s = (self.t_fetch_s or 0.0) + t["total_s"]
        return self

    def delivered(self, out: DeliverOutput) -> MetricsRow:
        self.status = "succeeded"
        self.width, self.height, self.frames, self.fps = out.width, out.height, out.frames, out.fps
        self.t_postprocess_s, self.t_validate_s, self.t_upload_s = (
            out.t_postprocess_s, out.t_validate_s, out.t_upload_s)
        self.t_total_s = (self.t_total_s or 0.0) + out.t_postprocess_s + out.t_validate_s + out.t_upload_s
        self.output_uri, self.poster_uri, self.preview_uri = out.output_uri, out.poster_uri, out.preview_uri
        self.presigned_url, self.sha256, self.bytes = out.presigned_url, out.sha256, out.bytes
        self.poster_presigned_url = out.poster_presigned_url
        return self

    def skipped(self, record: Mapping[str, Any]) -> MetricsRow:
        """The row's outputs are already in the sink, as its record lists them."""
        video = record["outputs"][".mp4"]
        self.status = "skipped"
        self.width, self.height = record["width"], record["height"]
        self.frames, self.fps = record["frames"], record["fps"]
        self.output_uri, self.poster_uri = video["uri"], record["outputs"][".jpg"]["uri"]
        self.preview_uri = record["outputs"].get(".webp", {}).get("uri")
        self.sha256, self.bytes = video["sha256"], video["bytes"]
        return self

    def failed(self, stage: str, error: BaseException | str, *, status: str = "failed") -> MetricsRow:
        self.status, self.error = status, f"{stage}: {error}"
        return self

    @property
    def gpu_is_cpu(self) -> bool:
        """Generation ran on the CPU (tests, the tiny preset): overlapping would only oversubscribe it."""
        return bool(self.gpu and self.gpu.startswith("cpu"))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def metrics_frame(rows: Iterable[Mapping[str, object] | MetricsRow]) -> pl.DataFrame:
    """Rows → a frame with exactly COLUMNS, in order, missing values null; sorted by row number."""
    dicts = [r.as_dict() if isinstance(r, MetricsRow) else r for r in rows]
    records = [{c: r.get(c) for c in COLUMNS} for r in dicts]
    unknown = {s for r in records if (s := r["status"]) not in STATUSES}
    if unknown:
        raise ValueError(f"unknown metrics status {sorted(map(str, unknown))}; expected {STATUSES}")
    return pl.DataFrame(records, schema=COLUMNS, orient="row").sort("row", nulls_last=True)


def write_metrics(df: pl.DataFrame, sink, prefix: str = "metrics") -> dict[str, str]:
    """Write metrics.parquet and metrics.csv through the sink; returns their URIs.

    Parquet keeps the raw values; in the CSV a text cell a spreadsheet would run as a formula
    (`=…`, `+…`, `-…`, `@…`) is written as text (`tasks.text.csv_cell`)."""
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext, write in (("parquet", df.write_parquet), ("csv", _csv_safe(df).write_csv)):
            path = Path(tmp) / f"{prefix}.{ext}"
            write(path)
            ctype = "application/vnd.apache.parquet" if ext == "parquet" else "text/csv"
            res = sink.put(path, f"{prefix}.{ext}", content_type=ctype, cache_control="no-cache",
                           overwrite=True)
            uris[ext] = res.uri
    return uris


def _csv_safe(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with every text cell passed through `csv_cell` (for metrics.csv only)."""
    from tasks.text import csv_cell
    text_columns = [name for name, dtype in df.schema.items() if dtype == pl.String]
    return df.with_columns(pl.Series(name, [csv_cell(v) for v in df[name].to_list()], dtype=pl.String)
                           for name in text_columns)


def engine_label(df: pl.DataFrame) -> str:
    """The unit of engine time: "GPU-s", or "engine-s" when every row that reports where it
    generated (`gpu`) ran on the CPU (tests, the tiny presets)."""
    devices = df["gpu"].drop_nulls() if "gpu" in df.columns else pl.Series([], dtype=pl.String)
    return "engine-s" if devices.len() and bool(devices.str.starts_with("cpu").all()) else "GPU-s"


def summary(df: pl.DataFrame) -> dict[str, Any]:
    """Counts per status, engine time (`gpu_seconds`, in `engine_label` units), output bytes."""
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
        "engine_label": engine_label(df),
    }


def gpu_usage(df: pl.DataFrame, wall_s: float) -> list[dict[str, Any]]:
    """Per GPU (the `gpu` label) over a batch of `wall_s` seconds: rows it generated, its busy
    fraction (seconds inside the engine / wall time) and rows per GPU-hour of that wall time."""
    if wall_s <= 0 or "gpu" not in df.columns:
        return []
    ran = df.filter(pl.col("gpu").is_not_null() & pl.col("service_s").is_not_null())
    out = []
    for (gpu,), part in sorted(ran.group_by("gpu"), key=lambda g: str(g[0][0])):
        busy = float(part["service_s"].sum())
        out.append({"gpu": gpu, "rows": part.height, "busy_s": round(busy, 1),
                    "busy_fraction": round(min(busy / wall_s, 1.0), 3),
                    "rows_per_gpu_hour": round(part.height * 3600.0 / wall_s, 1),
                    "model_load_s": round(float(part["model_load_s"].fill_null(0).sum()), 1)})
    return out


CONTACT_SHEET_COLUMNS = 4      # poster thumbnails per row of the contact sheet


def summary_markdown(df: pl.DataFrame, title: str = "turbo-batch run", *, contact_sheet: bool = False,
                     wall_s: float | None = None) -> str:
    """The summary table; with `contact_sheet`, a grid of posters linked to their videos; then
    the rows that did not succeed, each with its error. Every user value goes through `shown`."""
    from tasks.text import shown
    s = summary(df)
    unit = s["engine_label"]
    lines = [
        f"# {shown(title)}", "",
        f"| rows | succeeded | skipped | failed | invalid | {unit} total | {unit} per video | output MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['rows']} | {s['succeeded']} | {s['skipped']} | {s['failed']} | {s['invalid']} | "
        f"{s['gpu_seconds']:.1f} | {s['gpu_seconds_per_video']:.2f} | {s['bytes'] / 1e6:.1f} |",
    ]
    usage = gpu_usage(df, wall_s) if wall_s else []
    if usage:
        lines += ["", f"Per GPU over {wall_s:.0f} s of batch wall time:", "",
                  "| GPU | rows | busy | busy fraction | rows per GPU-hour | model loading |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {shown(u['gpu'])} | {u['rows']} | {u['busy_s']} s | {u['busy_fraction']:.2f} | "
                  f"{u['rows_per_gpu_hour']} | {u['model_load_s']} s |" for u in usage]
    if contact_sheet:
        lines += contact_sheet_lines(df)
    bad = df.filter(pl.col("status").is_in(["failed", "invalid"]))
    if bad.height:
        lines += ["", "## Rows that did not succeed", ""]
        lines += [f"- row {r['row']} {_md_code(shown(r['id']))} ({r['status']}): {_md_code(shown(r['error']))}"
                  for r in bad.iter_rows(named=True)]
    return "\n".join(lines) + "\n"


def contact_sheet_lines(df: pl.DataFrame, columns: int = CONTACT_SHEET_COLUMNS) -> list[str]:
    """Markdown table of the succeeded and skipped rows' posters, `columns` to a table row; each
    poster links to its video (the presigned URL when there is one, else the output URI)."""
    done = df.filter(pl.col("status").is_in(["succeeded", "skipped"]))
    if not done.height:
        return []
    cells = [_contact_cell(r) for r in done.iter_rows(named=True)]
    width = min(columns, len(cells))
    cells += [""] * (-len(cells) % width)
    lines = ["", "## Contact sheet", "", "|" + " |" * width, "|" + "---|" * width]
    lines += ["| " + " | ".join(cells[i:i + width]) + " |" for i in range(0, len(cells), width)]
    return lines


def _contact_cell(r: Mapping[str, Any]) -> str:
    from tasks.text import shown
    label = _md_text(shown(r["id"]))
    if r["status"] == "skipped":
        label += " (skipped)"
    video = r["presigned_url"] or _as_uri(r["output_uri"])
    poster = r.get("poster_presigned_url") or _as_uri(r["poster_uri"])
    picture = f"![{label}]({_md_url(poster)})" if poster else label
    return (f"[{picture}]({_md_url(video)})" if video else picture) + f"<br>{label}"


def _as_uri(location: str | None) -> str | None:
    """A URI as is; a bare local path as file://."""
    if not location or "://" in location:
        return location
    return Path(location).resolve().as_uri()


def _md_url(url: str) -> str:
    """A link destination markdown keeps whole: spaces, parentheses, pipes, brackets encoded."""
    from urllib.parse import quote
    return quote(url, safe="/:?#@!$&'*+,;=%~")


def _md_text(text: str) -> str:
    """Text shown literally in markdown (also inside a table cell or a link's brackets)."""
    import re
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _md_code(text: str) -> str:
    """`text` as an inline code span, shown literally whatever backticks it holds."""
    import re
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def publish_artifacts(df: pl.DataFrame, key: str = "turbo-batch-metrics", *, wall_s: float | None = None) -> None:
    """Table + markdown artifacts on the current Prefect run (no-op outside a run); the markdown
    one is the summary with a contact sheet of the posters."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import get_run_context
    try:
        get_run_context()
    except Exception:
        return
    table = [{k: v for k, v in r.items() if v is not None} for r in df.iter_rows(named=True)]
    create_table_artifact(table=table, key=key, description="per-row metrics")
    create_markdown_artifact(markdown=summary_markdown(df, contact_sheet=True, wall_s=wall_s), key=f"{key}-summary",
                             description="batch summary")

