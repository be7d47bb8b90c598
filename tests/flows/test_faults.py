"""16 rows through a sink that fails at least 30 % of its requests (a real fault-injecting proxy
in front of the real S3 server: 5xx answers, dropped connections, truncated responses, corrupted
request bodies, stalls).

Every row ends either uploaded exactly once with its sha256 matching, or failed with its cause;
a re-run finishes the rest without re-uploading; metrics exist after every run.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from tasks.upload import S3Sink, file_sha256, make_s3_client
from tests.faultproxy import CorruptBody, Drop, Stall, Status, Truncate
from tests.s3server import run_s3_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROWS = 16


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with run_s3_server(tmp_path_factory.mktemp("s3faults"), faults=True) as server:
        yield server


def _manifest(path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
        for i in range(ROWS):
            w.writerow([f"f{i:02d}", "t2v", f"fault prompt {i}", "tiny-t2v", 5, 1, i])
    return path


def _direct(s3):
    """A client straight to ministack (no proxy): what is really stored."""
    return make_s3_client(s3.http_endpoint_url, access_key_id=s3.access_key_id,
                          secret_access_key=s3.secret_access_key, region=s3.region)


def _versions(client, bucket: str) -> Counter:
    counts: Counter = Counter()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            counts[v["Key"]] += 1
    return counts


def _latest(client, bucket: str, prefix: str) -> pl.DataFrame:
    from tasks.runs import read_run_metrics
    return read_run_metrics(S3Sink(bucket, prefix, client))


def test_sixteen_rows_through_a_faulty_sink(tmp_path, s3, monkeypatch):
    from flows.batch import batch_flow

    direct = _direct(s3)
    bucket, prefix = s3.create_bucket(), "faulty"
    direct.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for k, v in {"R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                 "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                 "R2_REGION": s3.region, "R2_PRESIGN_EXPIRES": "0"}.items():
        monkeypatch.setenv(k, v)
    manifest = str(_manifest(tmp_path / "m.csv"))
    sink = f"s3://{bucket}/{prefix}"

    s3.faults.clear()
    s3.faults.fault_random(fraction=0.35, seed=11, actions=[
        Status(503), Status(500), Drop(), Truncate(0), CorruptBody(), Stall(0.2)])
    first = batch_flow(manifest=manifest, sink=sink)
    log = s3.faults.requests
    faulted = sum(1 for r in log if r.action is not None)
    assert faulted / len(log) >= 0.3, (faulted, len(log))
    s3.faults.clear()

    df = _latest(direct, bucket, prefix)                 # metrics exist after the faulty run
    assert df.height == ROWS and first["rows"] == ROWS
    versions = _versions(direct, bucket)
    for row in df.iter_rows(named=True):
        if row["status"] == "succeeded":
            key = row["output_uri"].removeprefix(f"s3://{bucket}/")
            assert versions[key] == 1, (key, versions[key])          # uploaded exactly once
            body = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
            local = tmp_path / "check.mp4"
            local.write_bytes(body)
            assert file_sha256(local) == row["sha256"]
        else:
            assert row["status"] == "failed" and row["error"], row   # a cause, never silence
    outputs_before = {k: n for k, n in versions.items() if not k.startswith(f"{prefix}/runs/")
                      and k.endswith((".mp4", ".jpg"))}

    # The re-run, on a healthy sink, finishes the rest and re-uploads nothing.
    second = batch_flow(manifest=manifest, sink=sink)
    again = _latest(direct, bucket, prefix)
    assert set(again["status"]) <= {"succeeded", "skipped"} and second["failed"] == 0
    redone = set(again.filter(pl.col("status") == "succeeded")["id"])
    assert redone == set(df.filter(pl.col("status") != "succeeded")["id"])
    after = _versions(direct, bucket)
    assert all(after[k] == 1 for k in outputs_before)
    mp4s = [k for k in after if k.endswith(".mp4")]
    assert len(mp4s) == ROWS and all(after[k] == 1 for k in mp4s)
    # Both runs kept their own metrics; the pointer names the second.
    runs = {k.split("/")[2] for k in after if k.startswith(f"{prefix}/runs/") and k.endswith("metrics.parquet")}
    assert len(runs) == 2
    pointer = json.loads(direct.get_object(Bucket=bucket, Key=f"{prefix}/runs/latest.json")["Body"].read())
    assert pointer["run"] == second["run"]


def test_a_truncated_record_read_is_retried_inside_its_row(tmp_path, s3, monkeypatch):
    """The skip check reads each row's record; one truncated GET retries that row's check, and
    the other complete rows are still found complete (today it failed the whole shard)."""
    from flows.batch import batch_flow
    from tests.faultproxy import Truncate

    direct = _direct(s3)
    bucket, prefix = s3.create_bucket(), "trunc"
    for k, v in {"R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                 "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                 "R2_REGION": s3.region, "R2_PRESIGN_EXPIRES": "0"}.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "m.csv"
    path.write_text("id,mode,prompt,model,num_frames,num_steps\n"
                    + "".join(f"t{i},t2v,truncated {i},tiny-t2v,5,1\n" for i in range(4)))
    sink = f"s3://{bucket}/{prefix}"
    s3.faults.clear()
    assert batch_flow(manifest=str(path), sink=sink)["succeeded"] == 4
    s3.faults.add_rule(match=lambda r: r.method == "GET" and r.path.split("?")[0].endswith(".json")
                       and "/runs/" not in r.path, action=Truncate(5), times=1)
    again = batch_flow(manifest=str(path), sink=sink)
    truncated = [r for r in s3.faults.requests if r.action and r.action.startswith("Truncate")]
    s3.faults.clear()
    assert len(truncated) == 1                           # the fault really happened
    assert (again["skipped"], again["failed"]) == (4, 0), again
    df = _latest(direct, bucket, prefix)
    assert df["status"].to_list() == ["skipped"] * 4
