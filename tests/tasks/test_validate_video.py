"""Output validation: a good encode passes; each kind of damage fails with the right check named."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tasks.postprocess import PostprocessRecipe, run_postprocess
from tasks.validate_video import VideoValidationError, validate_video

FRAMES, HEIGHT, WIDTH = 17, 96, 128


@pytest.fixture(scope="module")
def good_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A textured clip (noise keeps mdat large enough that mid-file garbage hits coded slices)."""
    workdir = tmp_path_factory.mktemp("validate")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (HEIGHT, WIDTH + FRAMES * 2, 3), dtype=np.uint8)
    frames = np.stack([base[:, 2 * t: 2 * t + WIDTH] for t in range(FRAMES)])  # texture panning 2 px/frame
    np.save(workdir / "frames.npy", frames)
    return run_postprocess(workdir / "frames.npy", PostprocessRecipe(), workdir, "good").video_path


@pytest.fixture
def copy_of(good_video: Path, tmp_path: Path):
    def make(name: str) -> Path:
        return Path(shutil.copy(good_video, tmp_path / name))
    return make


def top_level_boxes(path: Path) -> dict[str, tuple[int, int]]:
    """Independent box reader for the tests: type -> (offset, size), 32-bit sizes only."""
    data, boxes, offset = path.read_bytes(), {}, 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset: offset + 8])
        boxes[kind.decode()] = (offset, size)
        offset += size
    return boxes


def expect_failure(path: Path, check: str, frames: int = FRAMES) -> VideoValidationError:
    with pytest.raises(VideoValidationError) as info:
        validate_video(path, WIDTH, HEIGHT, frames)
    assert info.value.check == check, str(info.value)
    assert f"'{check}'" in str(info.value) and str(path) in str(info.value)
    return info.value


def test_good_video_passes(good_video):
    info = validate_video(good_video, WIDTH, HEIGHT, FRAMES)
    assert (info.width, info.height, info.frames, info.fps) == (WIDTH, HEIGHT, FRAMES, "16/1")
    assert (info.codec, info.profile, info.pix_fmt, info.has_audio) == ("h264", "High", "yuv420p", False)
    assert info.boxes.index("moov") < info.boxes.index("mdat")
    assert info.size_bytes == good_video.stat().st_size


def test_truncated_half_fails_box_walk(copy_of):
    path = copy_of("half.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in expect_failure(path, "boxes").reason


def test_zero_byte_file_fails_box_walk(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert "empty" in expect_failure(path, "boxes").reason


def test_missing_file_fails_box_walk(tmp_path):
    expect_failure(tmp_path / "nope.mp4", "boxes")


def test_moov_at_end_fails_box_walk(copy_of, tmp_path):
    source = copy_of("source.mp4")
    path = tmp_path / "moov_last.mp4"
    # Remux without faststart: the mp4 muxer writes moov after mdat.
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c", "copy", str(path)], check=True)
    boxes = top_level_boxes(path)
    assert boxes["moov"][0] > boxes["mdat"][0]
    assert "faststart" in expect_failure(path, "boxes").reason


def test_wrong_frame_count_fails_stream_check(good_video):
    error = expect_failure(good_video, "stream", frames=FRAMES + 4)
    assert f"nb_read_packets={FRAMES}" in error.reason


def test_wrong_size_or_missing_audio_fails_stream_check(good_video):
    with pytest.raises(VideoValidationError, match="width=128"):
        validate_video(good_video, 256, HEIGHT, FRAMES)
    with pytest.raises(VideoValidationError, match="audio stream missing"):
        validate_video(good_video, WIDTH, HEIGHT, FRAMES, expect_audio=True)


def test_garbage_mid_file_fails_decode(copy_of):
    path = copy_of("garbage.mp4")
    mdat_offset, mdat_size = top_level_boxes(path)["mdat"]
    data = bytearray(path.read_bytes())
    start = mdat_offset + mdat_size // 2
    length = min(4096, mdat_size // 4)
    data[start: start + length] = np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))  # same size, same boxes, same packet table: only decoding can tell
    error = expect_failure(path, "decode")
    assert "error line" in error.reason
