"""Image-to-video through the real CLI, in a subprocess (Prefect's ephemeral API, real ffmpeg):
examples/tiny-i2v.csv on the tiny two-expert preset, then a rerun that skips, then bad images.

The expected output size is computed here from the image file and the row alone, not taken from
the pipeline: the i2v default is 720p, the preset size comes from the tiny size table, and with
adaptive_resolution (the default) the output keeps that area, follows the image's aspect and
rounds each side to the nearest multiple of 16.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import polars as pl
from PIL import Image

from engine.config import TINY_SIZES
from tests.cli import ffprobe, mp4_mtimes, turbo_batch
from tests.shards import latest_metrics

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MANIFEST = EXAMPLES / "tiny-i2v.csv"








def expected_size(row: dict, manifest_dir: Path) -> tuple[int, int]:
    """(width, height) from the manifest row and its image file alone."""
    if row["mode"] == "t2v":
        return TINY_SIZES[row.get("resolution") or "480p"][row.get("aspect_ratio") or "16:9"]
    preset_w, preset_h = TINY_SIZES[row.get("resolution") or "720p"][row.get("aspect_ratio") or "16:9"]
    if (row.get("adaptive_resolution") or "true") == "false":
        return preset_w, preset_h
    with Image.open(manifest_dir / row["image"]) as im:
        img_w, img_h = im.size
    area = preset_w * preset_h
    w, h = math.sqrt(area * img_w / img_h), math.sqrt(area * img_h / img_w)
    return round(w / 16) * 16, round(h / 16) * 16


def test_expected_size_rule_matches_the_documented_examples():
    rows = {r["id"]: r for r in csv.DictReader(MANIFEST.open())}
    assert expected_size(rows["sunset-01"], EXAMPLES) == (144, 96)     # 300×200 image, adaptive
    assert expected_size(rows["forest-01"], EXAMPLES) == (160, 96)     # 200×300, adaptive_resolution=false
    assert expected_size(rows["orb-01"], EXAMPLES) == (128, 128)       # square image, adaptive
    assert expected_size({**rows["forest-01"], "adaptive_resolution": ""}, EXAMPLES) == (96, 144)
    for image in (EXAMPLES / "images").iterdir():
        assert image.stat().st_size < 20_000, image


def test_example_i2v_manifest_end_to_end_then_rerun_skips(tmp_path):
    out = tmp_path / "out"
    first = turbo_batch("run", str(MANIFEST), "--out", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    rows = list(csv.DictReader(MANIFEST.open()))
    assert sum(r["mode"] == "i2v" for r in rows) == 3
    df = latest_metrics(out)
    assert sorted(df["id"]) == sorted(r["id"] for r in rows)
    assert set(df["status"]) == {"succeeded"}, df.select("id", "status", "error")
    for row in rows:
        m = df.filter(pl.col("id") == row["id"]).row(0, named=True)
        video = Path(m["output_uri"].removeprefix("file://"))
        assert video.is_file() and Path(m["poster_uri"].removeprefix("file://")).is_file()
        info = ffprobe(video)
        assert (info["codec_name"], info["profile"], info["pix_fmt"]) == ("h264", "High", "yuv420p")
        assert (info["width"], info["height"]) == expected_size(row, EXAMPLES) == (m["width"], m["height"]), row["id"]
        assert int(info["nb_read_frames"]) == m["frames"] == int(row["num_frames"])
        assert (m["mode"], m["model"]) == (row["mode"], row["model"])
        assert m["t_denoise_s"] > 0 and m["bytes"] > 0
        if row["mode"] == "i2v":
            assert m["expert_policy"] == "resident", m
            assert m["t_switch_s"] is not None and m["t_switch_s"] >= 0
            assert m["t_image_s"] is not None and m["t_image_s"] > 0
            assert m["expert_loads"] is not None and m["expert_group"] is not None
        else:
            assert m["expert_policy"] is None and m["t_image_s"] is None

    # Same manifest again: nothing is generated or written, every row is skipped.
    before = mp4_mtimes(out)
    again = turbo_batch("run", str(MANIFEST), "--out", str(out))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    df2 = latest_metrics(out)
    assert sorted(df2["id"]) == sorted(df["id"])
    assert set(df2["status"]) == {"skipped"}, df2.select("id", "status", "error")
    assert df2.sort("id")["sha256"].to_list() == df.sort("id")["sha256"].to_list()
    assert df2["t_denoise_s"].is_null().all()
    assert mp4_mtimes(out) == before


def test_bad_images_are_invalid_and_cost_no_gpu_time(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "one-pixel.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "words.png").write_text("this is a text file, not a PNG\n")
    manifest = tmp_path / "bad-images.csv"
    manifest.write_text("id,mode,prompt,model,image,num_frames,num_steps,seed\n"
                        "good-01,i2v,a green field,tiny-i2v,good.png,5,4,1\n"
                        "empty-01,i2v,an empty file,tiny-i2v,empty.png,5,4,2\n"
                        "pixel-01,i2v,one pixel,tiny-i2v,one-pixel.png,5,4,3\n"
                        "text-01,i2v,a text file,tiny-i2v,words.png,5,4,4\n")
    bad = {  # id: (row, file, what the reason says)
        "empty-01": (2, "empty.png", "empty file"),
        "pixel-01": (3, "one-pixel.png", "1×1 pixels"),
        "text-01": (4, "words.png", "not a readable image"),
    }

    out = tmp_path / "out"
    run = turbo_batch("run", str(manifest), "--out", str(out))
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    said = run.stdout + run.stderr
    for row_id, (row, name, reason) in bad.items():
        line = next((ln for ln in said.splitlines() if f'row {row} (id "{row_id}"), column image' in ln), None)
        assert line is not None, said[-3000:]
        assert name in line and reason in line, line

    df = latest_metrics(out)
    assert sorted(df["id"]) == sorted(["good-01", *bad])
    good = df.filter(pl.col("id") == "good-01").row(0, named=True)
    assert good["status"] == "succeeded" and good["t_denoise_s"] > 0 and good["expert_policy"] == "resident"
    assert ffprobe(Path(good["output_uri"].removeprefix("file://")))["width"] > 0
    for row_id, (row, name, reason) in bad.items():
        m = df.filter(pl.col("id") == row_id).row(0, named=True)
        assert (m["status"], m["row"]) == ("invalid", row), m
        assert "column image" in m["error"] and name in m["error"] and reason in m["error"], m["error"]
        # Refused at validation: never reached the engine.
        assert m["t_denoise_s"] is None and m["t_text_s"] is None and m["t_image_s"] is None
        assert m["output_uri"] is None and m["gpu"] is None
    assert not [p for p in out.glob("*.mp4") if not p.name.startswith("good-01")]
