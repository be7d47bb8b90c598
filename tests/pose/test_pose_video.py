"""read_driving_video: resampling to 16 fps, rotation, VFR, fill modes and refused inputs (real ffmpeg)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.errors import RequestError
from pose.errors import PoseInputError
from pose.video import read_driving_video
from tests.pose.graphs import write_driving_video, write_rotated_video


def test_30_fps_is_resampled_to_16(driving_video: Path) -> None:
    video = read_driving_video(driving_video, num_frames=32)
    assert video.frames.shape == (32, 240, 320, 3) and video.frames.dtype == np.uint8
    assert (video.fps, video.source_fps, video.source_frames) == (16.0, 30.0, 60)
    assert (video.source_size, video.rotation, video.filled) == ((320, 240), 0, 0)
    # 2 s at 16 fps is 32 frames: one more needs one filled frame
    assert read_driving_video(driving_video, num_frames=33, fill="pad").filled == 1


def test_only_the_first_frames_are_decoded(driving_video: Path) -> None:
    first = read_driving_video(driving_video, num_frames=5).frames
    np.testing.assert_array_equal(first, read_driving_video(driving_video, num_frames=32).frames[:5])


def test_a_short_video_is_refused_naming_the_frame_counts_and_fill(driving_video: Path) -> None:
    with pytest.raises(PoseInputError) as caught:
        read_driving_video(driving_video)
    assert caught.value.column == "driving_video"
    assert "has 32 frames at 16 fps, needs 81; set fill=loop or fill=pad" in str(caught.value)


def test_loop_repeats_from_the_start_and_pad_repeats_the_last_frame(driving_video: Path) -> None:
    loop = read_driving_video(driving_video, fill="loop")
    pad = read_driving_video(driving_video, fill="pad")
    assert loop.frames.shape[0] == pad.frames.shape[0] == 81
    assert loop.filled == pad.filled == 81 - 32
    np.testing.assert_array_equal(loop.frames[32:64], loop.frames[:32])
    np.testing.assert_array_equal(loop.frames[80], loop.frames[80 - 64])
    np.testing.assert_array_equal(pad.frames[31:], np.broadcast_to(pad.frames[31], pad.frames[31:].shape))
    np.testing.assert_array_equal(pad.frames[:32], loop.frames[:32])


def test_the_long_side_is_scaled_to_max_side(driving_video: Path) -> None:
    assert read_driving_video(driving_video, num_frames=2, max_side=160).frames.shape == (2, 120, 160, 3)


def test_rotation_metadata_is_applied(driving_video: Path, tmp_path: Path) -> None:
    rotated = write_rotated_video(driving_video, tmp_path / "rotated.mp4", 90)
    video = read_driving_video(rotated, num_frames=4)
    assert video.rotation in (90, 270)
    assert video.source_size == (320, 240)
    assert video.frames.shape == (4, 320, 240, 3)     # portrait, as displayed
    upright = read_driving_video(driving_video, num_frames=4).frames[0]
    # the box (40 wide × 100 tall) is 100 wide × 40 tall once turned a quarter
    mask = video.frames[0].max(axis=2) > 200
    assert mask.any(axis=0).sum() == pytest.approx(100, abs=2) and mask.any(axis=1).sum() == pytest.approx(40, abs=2)
    assert (upright.max(axis=2) > 200).any(axis=0).sum() == pytest.approx(40, abs=2)


def test_variable_frame_rate_is_resampled_by_timestamp(tmp_path: Path) -> None:
    # 30 frames in the first second, then 30 frames at 10 fps: the last at 3.9 s, so 63 frames at 16 fps
    # (64 where ffmpeg counts the last frame's duration); a constant 30 fps reading of its 60 frames gives 32
    path = tmp_path / "vfr.mkv"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "color=c=black:s=64x48:r=30:d=2", "-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'",
                    "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    decoded = 70 - read_driving_video(path, num_frames=70, fill="pad").filled
    assert 62 <= decoded <= 64


def test_an_audio_only_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "silence.m4a"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "anullsrc=r=16000:cl=mono", "-t", "1", "-c:a", "aac", str(path)], check=True, timeout=60)
    with pytest.raises(PoseInputError, match=r"driving_video: silence\.m4a has no video stream \(audio only\)"):
        read_driving_video(path)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(PoseInputError, match="notes.mp4: not a readable media file") as caught:
        read_driving_video(path)
    assert caught.value.column == "driving_video"
    with pytest.raises(PoseInputError, match="file not found"):
        read_driving_video(tmp_path / "missing.mp4")


def test_a_source_over_max_source_seconds_is_refused_before_decoding(driving_video: Path) -> None:
    with pytest.raises(PoseInputError, match=r"is 2\.0 s long, over the limit of 1\.5 s .*max_source_seconds"):
        read_driving_video(driving_video, num_frames=8, max_source_seconds=1.5)


def test_bad_arguments_are_request_errors(driving_video: Path) -> None:
    with pytest.raises(RequestError, match="invalid fill='repeat'"):
        read_driving_video(driving_video, fill="repeat")
    with pytest.raises(RequestError, match="num_frames"):
        read_driving_video(driving_video, num_frames=0)


def test_hidden_frames_are_black(tmp_path: Path) -> None:
    path = write_driving_video(tmp_path / "gap.mp4", seconds=1.0, hidden=range(30))
    assert read_driving_video(path, num_frames=16).frames.max() < 40
