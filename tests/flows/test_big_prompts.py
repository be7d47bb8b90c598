"""Rows travel to shards by reference: prompts that together exceed Prefect's 512 KiB limit on
flow-run parameters still run, and a cell over the 64 KiB limit fails only its row."""

from __future__ import annotations

import csv

import pytest

from tests.shards import latest_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_twenty_30kb_prompts_run_and_a_1mb_prompt_fails_only_its_row(tmp_path):
    from flows.batch import batch_flow

    path = tmp_path / "big.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
        for i in range(20):                       # 20 × 30 KB = 600 KB > 524,288 bytes
            w.writerow([f"big-{i}", "t2v", f"{i} " + "a long prompt " * 2200, "tiny-t2v", 1, 1, i])
        w.writerow(["huge", "t2v", "x" * (1 << 20), "tiny-t2v", 1, 1, 0])
    result = batch_flow(manifest=str(path), sink=str(tmp_path / "out"), max_rows_per_shard=25)
    df = latest_metrics(tmp_path / "out")
    by_id = dict(zip(df["id"].to_list(), df["status"].to_list()))
    assert result["succeeded"] == 20 and by_id["huge"] == "invalid"
    [error] = df.filter(df["id"] == "huge")["error"].to_list()
    assert "64 KiB" in error and len(error) < 1000          # the 1 MB cell is not echoed
    csv_bytes = next((tmp_path / "out" / "runs").glob("*/metrics.csv")).stat().st_size
    assert csv_bytes < 200_000
