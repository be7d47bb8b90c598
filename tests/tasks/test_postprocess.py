"""Post-processing with real ffmpeg on tiny clips, outputs checked independently with ffprobe/Pillow."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.postprocess import (
    PostprocessError,
    PostprocessRecipe,
    run_postprocess,
)

FRAMES, HEIGHT, WIDTH = 13, 48, 64


def moving_gradient(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(T, H, W, 3) uint8: gradients that shift a few pixels per frame (smooth motion for minterpolate)."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red, green, blue = np.broadcast_arrays((x * 4 + t * 8) % 256, (y * 5 + t * 3) % 256, (x + y) * 2 + 0 * t)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


@pytest.fixture
def frames_path(tmp_path: Path) -> Path:
    path = tmp_path / "frames.npy"
    np.save(path, moving_gradient())
    return path


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format",
                          "-of", "json", str(path)], capture_output=True, check=True).stdout
    return json.loads(out)


def video_stream(path: Path) -> dict:
    return next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")


def assert_h264_high_bt709(stream: dict, width: int, height: int, frames: int) -> None:
    assert (stream["codec_name"], stream["profile"], stream["pix_fmt"]) == ("h264", "High", "yuv420p")
    assert (stream["width"], stream["height"]) == (width, height)
    assert int(stream["nb_read_frames"]) == frames
    assert (stream["color_space"], stream["color_primaries"], stream["color_transfer"]) == ("bt709",) * 3
    assert stream["color_range"] == "tv"


def test_default_recipe_encodes_h264_high_bt709_with_poster(frames_path, tmp_path):
    out = run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "out", "clip")

    assert out.video_path == tmp_path / "out" / "clip.mp4"
    stream = video_stream(out.video_path)
    assert_h264_high_bt709(stream, WIDTH, HEIGHT, FRAMES)
    assert stream["avg_frame_rate"] == "16/1"
    assert (out.width, out.height, out.frames, out.fps) == (WIDTH, HEIGHT, FRAMES, 16)
    assert out.seconds == pytest.approx(FRAMES / 16)
    assert out.preview_path is None
    assert sorted(p.name for p in out.video_path.parent.iterdir()) == ["clip.jpg", "clip.mp4"]  # no partials
    # faststart: moov before mdat
    data = out.video_path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    with Image.open(out.poster_path) as poster:
        assert poster.format == "JPEG" and poster.size == (WIDTH, HEIGHT)


def test_encoded_colours_match_the_source(frames_path, tmp_path):
    """Decode back to RGB with ffmpeg and compare to the source frames (CRF 18: small error only)."""
    out = run_postprocess(frames_path, PostprocessRecipe(), tmp_path, "clip")
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out.video_path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    decoded = np.frombuffer(raw, np.uint8).reshape(FRAMES, HEIGHT, WIDTH, 3).astype(np.float64)
    source = np.load(frames_path).astype(np.float64)
    # A wrong matrix/range (e.g. BT.601 or full range) shifts the mean error well past this.
    assert np.abs(decoded - source).mean() < 6.0


def test_interpolation_raises_fps_and_frame_count(frames_path, tmp_path):
    out = run_postprocess(frames_path, PostprocessRecipe(interpolate_fps=32), tmp_path, "clip")
    stream = video_stream(out.video_path)
    assert stream["avg_frame_rate"] == "32/1"
    # minterpolate drops the last partial interval: 2*T - 3 frames for a 2x rate (13 -> 23).
    assert int(stream["nb_read_frames"]) == out.frames == 2 * FRAMES - 3
    assert out.fps == 32 and out.seconds == pytest.approx(out.frames / 32)


def test_upscale_doubles_the_size(frames_path, tmp_path):
    out = run_postprocess(frames_path, PostprocessRecipe(upscale=2), tmp_path, "clip")
    assert_h264_high_bt709(video_stream(out.video_path), 2 * WIDTH, 2 * HEIGHT, FRAMES)
    assert (out.width, out.height) == (2 * WIDTH, 2 * HEIGHT)
    with Image.open(out.poster_path) as poster:
        assert poster.size == (2 * WIDTH, 2 * HEIGHT)


def _poster_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_text_watermark_changes_the_bottom_right_corner(frames_path, tmp_path):
    plain = run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "plain", "clip")
    marked = run_postprocess(frames_path, PostprocessRecipe(watermark="AI: 100% it's"), tmp_path / "mark", "clip")
    assert_h264_high_bt709(video_stream(marked.video_path), WIDTH, HEIGHT, FRAMES)
    diff = np.abs(_poster_pixels(marked.poster_path) - _poster_pixels(plain.poster_path)).mean(axis=-1)
    assert diff[HEIGHT // 2:, WIDTH // 2:].mean() > 5 * max(diff[: HEIGHT // 4, : WIDTH // 4].mean(), 1.0)


def test_png_watermark_is_overlaid(frames_path, tmp_path):
    mark_path = tmp_path / "mark.png"
    Image.new("RGBA", (16, 12), (255, 0, 255, 255)).save(mark_path)
    out = run_postprocess(frames_path, PostprocessRecipe(watermark=str(mark_path)), tmp_path / "o", "clip")
    poster = _poster_pixels(out.poster_path)
    # overlay at W-w-16, H-h-16 with alpha 0.8: the box is strongly magenta-ish (R and B high, G low).
    box = poster[HEIGHT - 12 - 16 + 3: HEIGHT - 16 - 3, WIDTH - 16 - 16 + 3: WIDTH - 16 - 3]
    assert box[..., 0].mean() > 150 and box[..., 2].mean() > 150 and box[..., 1].mean() < 110


def test_preview_is_an_animated_webp(frames_path, tmp_path):
    out = run_postprocess(frames_path, PostprocessRecipe(preview=True), tmp_path, "clip")
    assert out.preview_path == tmp_path / "clip.webp"
    with Image.open(out.preview_path) as preview:
        assert preview.format == "WEBP" and preview.is_animated
        assert preview.size == (WIDTH, HEIGHT)  # 480 px cap, never upscaled
        # 13 frames at 16 fps resampled to 12 fps -> about 10 frames
        assert 8 <= preview.n_frames <= 11


def test_audio_is_muxed_as_aac(frames_path, tmp_path):
    audio_path = tmp_path / "tone.wav"
    with wave.open(str(audio_path), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(16000 * 3) / 16000)).astype("<i2")
        wav.writeframes(tone.tobytes())
    out = run_postprocess(frames_path, PostprocessRecipe(audio=str(audio_path)), tmp_path, "clip")
    info = ffprobe(out.video_path)
    kinds = {s["codec_type"]: s for s in info["streams"]}
    assert kinds["audio"]["codec_name"] == "aac"
    assert_h264_high_bt709(kinds["video"], WIDTH, HEIGHT, FRAMES)
    # -shortest cuts the 3 s tone to about the 0.81 s clip (AAC frame granularity)
    assert float(info["format"]["duration"]) < 1.2
    data = out.video_path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")


def test_missing_png_watermark_raises_postprocess_error_naming_it(frames_path, tmp_path):
    missing = tmp_path / "no-such-mark.png"
    with pytest.raises(PostprocessError) as info:
        run_postprocess(frames_path, PostprocessRecipe(watermark=str(missing)), tmp_path / "o", "clip")
    assert str(missing) in str(info.value)                 # in the command
    assert "No such file" in info.value.stderr_tail        # and in ffmpeg's stderr
    assert info.value.command[0] == "ffmpeg"
    assert not (tmp_path / "o" / "clip.mp4").exists()


def test_bad_frames_file_is_rejected(tmp_path):
    path = tmp_path / "frames.npy"
    np.save(path, np.zeros((4, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        run_postprocess(path, PostprocessRecipe(), tmp_path, "clip")
    np.save(path, np.zeros((4, 47, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="even"):
        run_postprocess(path, PostprocessRecipe(), tmp_path, "clip")


def test_recipe_validation():
    recipe = PostprocessRecipe(fps=16, interpolate_fps=32, upscale=2.0, watermark="x", preview=True)
    assert recipe.output_fps == 32
    with pytest.raises(ValueError, match="interpolate_fps"):
        PostprocessRecipe(fps=16, interpolate_fps=8)
    with pytest.raises(ValueError, match="upscale"):
        PostprocessRecipe(upscale=0)


