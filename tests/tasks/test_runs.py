"""A run's folder in the sink (tasks/runs.py): runs never erase each other, `report` reads the
latest or merges them all, and metrics the sink refuses stay on this host."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from tasks.manifest import Manifest, ManifestRow
from tasks.metrics import MetricsRow, metrics_frame
from tasks.runs import RunFolder, read_run_metrics, save_manifest, write_run_metrics
from tasks.upload import LocalSink, UploadResult


def _write(df, sink, run, local):
    """As the batch flow calls it: inside a flow run (its upload is a retrying task)."""
    from prefect import flow

    @flow(name="write-run-metrics")
    def write(df, sink, run, local):  # untyped: Prefect builds no schema for a Protocol
        return write_run_metrics(df, sink, run, local)

    return write(df, sink, run, local)


def _frame(statuses: dict[str, str], denoise: float) -> pl.DataFrame:
    rows = []
    for n, (rid, status) in enumerate(statuses.items(), start=1):
        m = MetricsRow(id=rid, row=n, status=status, attempts=1)
        if status == "succeeded":
            m.t_denoise_s, m.gpu = denoise, "cuda:0 H200"
        rows.append(m)
    return metrics_frame(rows)


def test_runs_keep_their_own_metrics_and_report_reads_latest_or_merges(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "sink")
    first = RunFolder.new("aaaaaaaa-1", now=datetime(2026, 12, 1, 10, 0, tzinfo=UTC))
    second = RunFolder.new("bbbbbbbb-2", now=datetime(2026, 12, 1, 11, 0, tzinfo=UTC))
    _write(_frame({"a": "succeeded", "b": "failed"}, 3.0), sink, first, tmp_path / "local")
    _write(_frame({"a": "skipped", "b": "succeeded"}, 5.0), sink, second, tmp_path / "local")

    assert first.name == "20261201T100000Z-aaaaaaaa"
    assert (tmp_path / "sink" / "runs" / first.name / "metrics.parquet").is_file()   # not erased
    assert json.loads((tmp_path / "sink" / "runs" / "latest.json").read_text()) == {"run": second.name}
    latest = read_run_metrics(sink)
    assert latest["status"].to_list() == ["skipped", "succeeded"]
    merged = read_run_metrics(sink, all_runs=True).sort("id")
    assert merged["status"].to_list() == ["skipped", "succeeded"]        # the newest status
    # a skipped row keeps the costs of the run that generated it; a re-run never zeroes them
    assert merged["t_denoise_s"].to_list() == [3.0, 5.0]
    assert merged["run"].to_list() == [second.name, second.name]
    assert not list((tmp_path / "local").glob("*/metrics.parquet"))       # uploaded, then removed


def test_metrics_the_sink_refuses_stay_local_and_the_batch_goes_on(tmp_path: Path) -> None:
    class RefusingSink(LocalSink):
        def put(self, local_path: Path, key: str, *args, **kwargs) -> UploadResult:  # type: ignore[override]
            from tasks.errors import UploadAuthError
            raise UploadAuthError("refused")

    run = RunFolder.new("cccccccc")
    uris = _write(_frame({"a": "succeeded"}, 1.0), RefusingSink(tmp_path / "sink"), run, tmp_path / "local")
    local = Path(uris["parquet"].removeprefix("file://"))
    assert local.is_file() and local.parent == tmp_path / "local" / run.name
    assert pl.read_parquet(local)["id"].to_list() == ["a"]


def test_manifest_is_saved_in_the_run_folder_and_read_back_by_position(tmp_path: Path) -> None:
    from tasks.runs import load_rows
    sink = LocalSink(tmp_path / "sink")
    rows = [ManifestRow(row=i + 1, id=f"r{i}", mode="t2v", prompt="p" * 40_000) for i in range(3)]
    key = save_manifest.fn(sink, RunFolder.new("dddddddd"), Manifest(rows, [], [], "m.csv"))
    assert key.startswith("runs/") and key.endswith("/manifest.json")
    assert [r.id for r in load_rows.fn(sink, key, [2, 0])] == ["r2", "r0"]


def test_report_without_runs_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="latest.json"):
        read_run_metrics(LocalSink(tmp_path / "empty"))
