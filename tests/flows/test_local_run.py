"""The product path, local and in one command: manifest → tiny engine → ffmpeg → sink → metrics.

Runs the real CLI in a subprocess (Prefect's ephemeral API, real ffmpeg) and the batch flow
in-process against a real S3-protocol server behind TLS.
"""

from __future__ import annotations

import csv
import io
import json
import ssl
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from engine.config import TINY_SIZES
from tasks.manifest import read_manifest
from tests.cli import ffprobe, mp4_mtimes, turbo_batch
from tests.shards import latest_metrics

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SECRET_MARKER = "turbo-batch-test-secret"






def expected_shape(row: dict) -> tuple[int, int, int]:
    """(width, height, frames) from the manifest alone: the tiny size table, upscale, interpolation."""
    w, h = TINY_SIZES[row["resolution"] or "480p"][row["aspect_ratio"] or "16:9"]
    scale = float(row["upscale"] or 1)
    frames = int(row["num_frames"])
    if row["interpolate_fps"]:
        frames = 2 * frames - 3 if int(row["interpolate_fps"]) == 2 * int(row["fps"] or 16) else None
    return round(w * scale), round(h * scale), frames




def test_readme_command_then_rerun_then_one_changed_seed(tmp_path):
    out = tmp_path / "out"
    first = turbo_batch("run", str(EXAMPLES / "tiny.csv"), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]

    rows = list(csv.DictReader((EXAMPLES / "tiny.csv").open()))
    df = latest_metrics(out)
    [run_dir] = (out / "runs").glob("*-*/")
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "manifest.json").is_file()
    assert sorted(df["id"]) == sorted(r["id"] for r in rows)
    assert set(df["status"]) == {"succeeded"}
    for row in rows:
        m = df.filter(pl.col("id") == row["id"]).row(0, named=True)
        video = Path(m["output_uri"].removeprefix("file://"))
        assert video.is_file() and Path(m["poster_uri"].removeprefix("file://")).is_file()
        info = ffprobe(video)
        width, height, frames = expected_shape(row)
        assert (info["codec_name"], info["profile"], info["pix_fmt"]) == ("h264", "High", "yuv420p")
        assert (info["width"], info["height"]) == (width, height) == (m["width"], m["height"])
        assert int(info["nb_read_frames"]) == m["frames"]
        if frames is not None:
            assert m["frames"] == frames
        assert (m["preview_uri"] is not None) == (row["preview"] == "true")
        assert m["t_denoise_s"] > 0 and m["t_total_s"] >= m["t_denoise_s"] and m["bytes"] > 0

    # Same run again: nothing is generated or written, every row is skipped.
    before = mp4_mtimes(out)
    again = turbo_batch("run", str(EXAMPLES / "tiny.csv"), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    df2 = latest_metrics(out)
    assert set(df2["status"]) == {"skipped"}
    assert df2.sort("id")["sha256"].to_list() == df.sort("id")["sha256"].to_list()
    assert mp4_mtimes(out) == before

    # One seed changed: exactly that row is regenerated, under a new key.
    changed = tmp_path / "tiny.csv"
    rows[0]["seed"] = str(int(rows[0]["seed"]) + 100)
    with changed.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    third = turbo_batch("run", str(changed), "--out", str(out))
    assert third.returncode == 0, third.stderr[-3000:]
    df3 = latest_metrics(out)
    assert df3.filter(pl.col("status") == "succeeded")["id"].to_list() == [rows[0]["id"]]
    assert df3.filter(pl.col("status") == "skipped").height == len(rows) - 1
    new = set(mp4_mtimes(out)) - set(before)
    assert new and all(n.startswith(rows[0]["id"] + "-") for n in new)
    assert {k: v for k, v in mp4_mtimes(out).items() if k in before} == before

    report = turbo_batch("report", str(out))
    assert report.returncode == 0 and "| 5 | 1 | 4 | 0 | 0 |" in report.stdout


def test_bad_rows_are_reported_exactly_and_good_rows_succeed(tmp_path):
    out = tmp_path / "out"
    manifest = read_manifest(EXAMPLES / "bad_rows.csv")
    assert len(manifest.errors) >= 15 and manifest.rows
    run = turbo_batch("run", str(EXAMPLES / "bad_rows.csv"), "--out", str(out))
    assert run.returncode == 1, run.stderr[-3000:]
    for err in manifest.errors:
        assert f"invalid {err}" in run.stderr
    df = latest_metrics(out)
    good = df.filter(pl.col("status") == "succeeded")
    assert sorted(good["id"]) == sorted(r.id for r in manifest.rows)
    invalid = df.filter(pl.col("status") == "invalid")
    assert invalid.height == len(manifest.errors)
    assert sorted(invalid["error"]) == sorted(str(e) for e in manifest.errors)
    assert set(df["status"]) == {"succeeded", "invalid"}


def test_unreadable_manifest_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_bytes(b"\x00\x01\x02 not a manifest")
    run = turbo_batch("run", str(bad), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and str(bad) in run.stderr
    missing = turbo_batch("validate", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "nope.csv" in missing.stderr
    assert not (tmp_path / "out").exists()


# -- in-process runs ----------------------------------------------------------------------------
def small_manifest(tmp_path: Path, n: int = 2, **extra: str) -> Path:
    path = tmp_path / "m.csv"
    cols = ["id", "mode", "prompt", "model", "num_frames", "seed", *extra]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            w.writerow([f"r{i}", "t2v", f"prompt number {i}", "tiny-t2v", "5", str(i), *extra.values()])
    return path


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.s3server import run_s3_server
    with run_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def test_s3_sink_presigned_links_and_no_secret_anywhere(tmp_path, s3, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.batch import batch_flow
    from tasks.upload import file_sha256

    bucket = s3.create_bucket()
    for k, v in {"R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                 "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                 "R2_REGION": s3.region, "R2_PRESIGN_EXPIRES": "600"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level("DEBUG")
    state = batch_flow(manifest=str(small_manifest(tmp_path)), sink=f"s3://{bucket}/run",
                       return_state=True)
    result = state.result()
    assert (result["succeeded"], result["failed"]) == (2, 0)

    client = s3.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    [run_key] = [k for k in keys if k.startswith("run/runs/") and k.endswith("/metrics.parquet")]
    assert run_key.replace(".parquet", ".csv") in keys and "run/runs/latest.json" in keys
    df = pl.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=run_key)["Body"].read()))
    ctx = ssl.create_default_context(cafile=str(s3.ca_path))
    for m in df.iter_rows(named=True):
        assert m["output_uri"].startswith(f"s3://{bucket}/run/") and m["output_uri"][len(f"s3://{bucket}/"):] in keys
        body = urllib.request.urlopen(m["presigned_url"], context=ctx, timeout=30).read()
        local = tmp_path / "dl.mp4"
        local.write_bytes(body)
        assert file_sha256(local) == m["sha256"] and len(body) == m["bytes"]
        poster = urllib.request.urlopen(m["poster_presigned_url"], context=ctx, timeout=30).read()
        assert poster[:2] == b"\xff\xd8"              # a JPEG the contact sheet can show

    # The secret appears in no log record, metrics cell, Prefect log or artifact.
    secret = s3.secret_access_key
    assert secret not in caplog.text
    csv_key = run_key.replace(".parquet", ".csv")
    assert secret.encode() not in client.get_object(Bucket=bucket, Key=csv_key)["Body"].read()

    async def server_side_text() -> str:
        async with get_client() as c:
            runs = await c.read_flow_runs()
            ids = [r.id for r in runs]
            logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            arts = await c.read_artifacts()
            runs_full = await c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        return "\n".join([*(log.message for log in logs), *(json.dumps(a.data, default=str) for a in arts),
                          *(json.dumps(r.parameters, default=str) for r in runs_full)])

    import asyncio
    text = asyncio.run(server_side_text())
    assert "r0" in text            # the search really sees this run's logs and artifacts
    assert secret not in text and SECRET_MARKER not in text


def test_second_run_hits_text_cache_and_loads_no_text_encoder(tmp_path, monkeypatch):
    from flows.shard import new_engine
    from tasks.manifest import read_manifest
    from tests.shards import run_shard

    monkeypatch.setenv("TURBO_EMBED_CACHE", str(tmp_path / "text-cache"))
    rows = read_manifest(small_manifest(tmp_path, n=3)).rows
    df1 = pl.DataFrame(run_shard(rows, sink=str(tmp_path / "a")))
    assert df1["status"].to_list() == ["succeeded"] * 3
    assert df1["text_cache_hit"].to_list() == [False] * 3

    engine = new_engine()                  # a fresh worker process: nothing warm
    df2 = pl.DataFrame(run_shard(rows, sink=str(tmp_path / "b"), engine=engine))
    assert df2["text_cache_hit"].to_list() == [True] * 3
    [pipe] = engine.cache.values()
    assert pipe.text_encoder_loads == 0
    # Same prompts, same seeds, cached embeddings: the same videos.
    assert df1.sort("id")["sha256"].to_list() == df2.sort("id")["sha256"].to_list()


def test_postprocess_failure_fails_only_that_row(tmp_path):

    from tasks.manifest import ManifestRow
    from tests.shards import run_shard

    good = ManifestRow(row=1, id="good", mode="t2v", prompt="a", model="tiny-t2v", num_frames=5)
    # Validation would refuse a missing watermark file; here it vanished after validation.
    bad = ManifestRow(row=2, id="bad", mode="t2v", prompt="b", model="tiny-t2v", num_frames=5,
                      watermark=str(tmp_path / "gone.png"))
    rows = run_shard([bad, good], sink=str(tmp_path / "out"))
    by_id = {r["id"]: r for r in rows}
    assert by_id["good"]["status"] == "succeeded"
    assert by_id["bad"]["status"] in ("failed", "invalid") and "gone.png" in by_id["bad"]["error"]
    assert [p.name.split("-")[0] for p in (tmp_path / "out").glob("*.mp4")] == ["good"]
