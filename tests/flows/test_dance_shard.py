"""Dance rows through the shard the pools run (in-process, real Prefect tasks, ffmpeg, a local
sink): fetch → pose (rtmlib on ONNX stand-ins of DWPose) → generate (tiny SteadyDancer) → deliver,
the pose outputs uploaded beside the video, a re-run skipping pose and generation, and bad inputs
answered as the row's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from flows.shard import new_engine
from tasks.manifest import ManifestRow
from tests.pose.graphs import person_image, write_driving_video, write_dwpose_stand_ins
from tests.shards import run_shard

FRAMES = 9


@pytest.fixture(scope="module")
def dance_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dance")
    Image.fromarray(person_image(120, 160, (40, 20, 80, 140))).save(root / "ref.png")
    write_dwpose_stand_ins(root / "dwpose")
    return {"root": root, "image": root / "ref.png", "video": write_driving_video(root / "drive.mp4"),
            "short": write_driving_video(root / "short.mp4", seconds=0.25),
            "empty": write_driving_video(root / "empty.mp4", hidden=range(60))}


def _row(n: int, inputs: dict[str, Path], video: str = "video", **fields) -> dict:
    base = dict(row=n, id=f"d{n}", mode="dance", prompt=f"dance {n}", model="tiny-dance", num_frames=FRAMES,
                num_steps=3, seed=n, image=str(inputs["image"]), driving_video=str(inputs[video]),
                resolution="576p", attention_type="original")
    return dataclasses.asdict(ManifestRow(**{**base, **fields}))


@pytest.mark.timeout(600)
def test_dance_rows_pose_generate_upload_and_skip_on_rerun(tmp_path, dance_inputs, monkeypatch):
    monkeypatch.setenv("TURBO_POSE_DIR", str(dance_inputs["root"] / "dwpose"))
    sink = tmp_path / "out"
    rows = [_row(1, dance_inputs), _row(2, dance_inputs, guidance="fast", num_steps=4, fill="loop")]
    first = run_shard(rows, sink=str(sink), engine=new_engine())
    assert [m["status"] for m in first] == ["succeeded", "succeeded"], [m["error"] for m in first]
    for m in first:
        assert m["pose_frames"] == FRAMES and m["pose_fps"] == 16 and m["t_pose_s"] > 0
        key = Path(m["output_uri"].removeprefix("file://")).name.removesuffix(".mp4")
        record = json.loads((sink / f"{key}.json").read_text())
        assert {".mp4", ".jpg", ".pose.mp4", ".pose.json", ".pose.npz"} <= set(record["outputs"])
        assert (sink / f"{key}.pose.mp4").stat().st_size > 0
    assert first[0]["sampler"].startswith("unipc-3-official") and first[1]["sampler"].startswith("unipc-4-fast")

    again = run_shard(rows, sink=str(sink), engine=new_engine())
    assert [m["status"] for m in again] == ["skipped", "skipped"]
    assert all(m["t_pose_s"] is None and m["t_denoise_s"] is None for m in again)

    changed = run_shard([_row(1, dance_inputs, align_frame=3)], sink=str(sink), engine=new_engine())
    assert changed[0]["status"] == "succeeded"       # a pose setting is part of the row's identity


@pytest.mark.timeout(600)
def test_bad_dance_inputs_are_the_rows_and_the_shard_goes_on(tmp_path, dance_inputs, monkeypatch):
    monkeypatch.setenv("TURBO_POSE_DIR", str(dance_inputs["root"] / "dwpose"))
    black = dance_inputs["root"] / "black.png"
    Image.new("RGB", (120, 160)).save(black)
    rows = [_row(1, dance_inputs, video="short"), _row(2, dance_inputs, video="empty"),
            _row(3, dance_inputs, image=str(black)), _row(4, dance_inputs)]
    out = run_shard(rows, sink=str(tmp_path / "out"), engine=new_engine())
    by_id = {m["id"]: m for m in out}
    assert [by_id[f"d{i}"]["status"] for i in (1, 2, 3)] == ["invalid"] * 3
    assert "fill" in by_id["d1"]["error"] and "driving_video" in by_id["d1"]["error"]
    assert "frames" in by_id["d2"]["error"]
    assert "no person" in by_id["d3"]["error"] and "image" in by_id["d3"]["error"]
    assert all(by_id[f"d{i}"]["t_denoise_s"] is None for i in (1, 2, 3))     # no GPU time on them
    assert by_id["d4"]["status"] == "succeeded"

    monkeypatch.setenv("TURBO_POSE_DIR", str(tmp_path / "nowhere"))
    missing = run_shard([_row(5, dance_inputs)], sink=str(tmp_path / "out2"), engine=new_engine())
    assert missing[0]["status"] == "failed" and "yolox_l.onnx" in missing[0]["error"]


@pytest.mark.timeout(600)
def test_stored_poses_are_reused_and_a_damaged_store_is_extracted_again(tmp_path, dance_inputs, monkeypatch):
    monkeypatch.setenv("TURBO_POSE_DIR", str(dance_inputs["root"] / "dwpose"))
    sink = tmp_path / "out"
    [made] = run_shard([_row(1, dance_inputs)], sink=str(sink), engine=new_engine())
    assert made["status"] == "succeeded" and made["pose_reused"] is False
    # Same inputs and pose settings, another sampler setting: a new row key, the same poses.
    [reused] = run_shard([_row(1, dance_inputs, num_steps=2)], sink=str(sink), engine=new_engine())
    assert reused["status"] == "succeeded" and reused["pose_reused"] is True
    [stored] = list((sink / "poses").glob("*/poses.npz"))
    stored.write_bytes(b"damaged")
    [again] = run_shard([_row(1, dance_inputs, num_steps=1)], sink=str(sink), engine=new_engine())
    assert again["status"] == "succeeded" and again["pose_reused"] is False
