"""Dance through the real CLI, in a subprocess (Prefect's ephemeral API, real ffmpeg, rtmlib on
ONNX stand-ins of DWPose): the batch flow extracts each dance row's poses ahead of the shard and
stores them in the sink, the shard takes them from there, and a rerun skips every row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
from PIL import Image

from tests.cli import turbo_batch
from tests.pose.graphs import person_image, write_driving_video, write_dwpose_stand_ins
from tests.shards import latest_metrics


def test_dance_manifest_end_to_end_then_rerun_skips(tmp_path):
    Image.fromarray(person_image(120, 160, (40, 20, 80, 140))).save(tmp_path / "dancer.png")
    write_driving_video(tmp_path / "moves.mp4")
    write_driving_video(tmp_path / "short.mp4", seconds=0.25)
    manifest = tmp_path / "dance.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "image", "driving_video", "num_frames", "num_steps",
                    "fill", "seed"])
        w.writerow(["swing", "dance", "a dancer", "tiny-dance", "dancer.png", "moves.mp4", 9, 3, "", 1])
        w.writerow(["loop", "dance", "a dancer", "tiny-dance", "dancer.png", "short.mp4", 9, 3, "loop", 2])
        w.writerow(["short", "dance", "a dancer", "tiny-dance", "dancer.png", "short.mp4", 9, 3, "", 3])
    env = {"TURBO_POSE_DIR": str(write_dwpose_stand_ins(tmp_path / "dwpose")),
           "TURBO_EMBED_CACHE": str(tmp_path / "text")}
    out = tmp_path / "out"

    first = turbo_batch("run", str(manifest), "--out", str(out), env=env)
    assert first.returncode == 1, first.stderr[-3000:]        # one row is bad
    df = latest_metrics(out)
    by_id = {m["id"]: m for m in df.iter_rows(named=True)}
    assert by_id["swing"]["status"] == by_id["loop"]["status"] == "succeeded", df.select("id", "status", "error")
    assert by_id["short"]["status"] == "invalid" and "fill" in by_id["short"]["error"]
    assert by_id["short"]["t_denoise_s"] is None
    for row_id in ("swing", "loop"):
        m = by_id[row_id]
        assert m["pose_reused"] is True and m["pose_frames"] == 9 and m["sampler"].startswith("unipc-3-official")
        video = Path(m["output_uri"].removeprefix("file://"))
        record = json.loads(video.with_suffix(".json").read_text())
        assert {".pose.mp4", ".pose.json", ".pose.npz"} <= set(record["outputs"])
    assert len(list((out / "poses").glob("*/record.json"))) == 2     # made ahead by the batch flow

    again = turbo_batch("run", str(manifest), "--out", str(out), env=env)
    assert again.returncode == 1
    df2 = latest_metrics(out).filter(pl.col("id") != "short")
    assert df2["status"].to_list() == ["skipped", "skipped"]
