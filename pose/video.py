"""Decode a driving video as SteadyDancer's pose stage needs it: RGB frames resampled to 16 fps.

SteadyDancer's own `pose_align.py` keeps the driving video's frame rate and the model then plays
the first 81 pose frames at 16 fps, which slows a 30 fps dance down (the ComfyUI workflows
resample with `force_rate=16`). Here ffmpeg's `fps` filter resamples by timestamp (so variable
frame rate sources come out right), ffmpeg's autorotation applies the rotation metadata, the long
side is scaled down to `max_side`, and only the first `num_frames` output frames are decoded.

ffmpeg/ffprobe run as argv lists on `file:<absolute path>` with `-protocol_whitelist file` and a
timeout, through the same helpers as the post-processing stage (`tasks.inputs.probe`,
`tasks.postprocess.run_media_command`), which import neither Prefect nor torch.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import RequestError
from pose.errors import PoseInputError
from tasks.errors import InputError
from tasks.inputs import probe
from tasks.postprocess import file_url, run_media_command

__all__ = ["DECODE_TIMEOUT_BASE_S", "DECODE_TIMEOUT_PER_MEGAPIXEL_FRAME_S", "FILL_MODES", "DrivingVideo",
           "read_driving_video"]

FILL_MODES = ("error", "loop", "pad")
# Decode timeout (read at call time): base + this much per source frame decoded, per megapixel over 1.
# A 4K60 source needs ~300 frames decoded for 81 frames at 16 fps: 60 + 0.25 × 304 × 8.3 ≈ 690 s.
DECODE_TIMEOUT_BASE_S = 60.0
DECODE_TIMEOUT_PER_MEGAPIXEL_FRAME_S = 0.25
_COLUMN = "driving_video"


@dataclass(frozen=True, eq=False)
class DrivingVideo:
    """`frames`: uint8 [N, H, W, 3] RGB at `fps`, already rotated and scaled (read-only unless filled);
    `filled` of them are repeats (fill="loop" or "pad"). `source_size` is the stored (width, height)
    before rotation; `rotation` the display rotation in degrees as ffprobe reports it (0 when none)."""

    frames: np.ndarray
    fps: float
    source_fps: float
    source_frames: int
    source_size: tuple[int, int]
    rotation: int
    filled: int


def read_driving_video(path: str | Path, *, fps: float = 16, num_frames: int = 81, fill: str = "error",
                       max_side: int = 1024, max_source_seconds: float = 600.0) -> DrivingVideo:
    """The first `num_frames` frames of `path` at `fps`; a shorter video is an error unless `fill` is
    "loop" (repeat from the start) or "pad" (repeat the last frame). Raises PoseInputError."""
    _check_arguments(fps, num_frames, fill, max_side, max_source_seconds)
    path = Path(path)
    stream, duration = _video_stream(path)
    if duration is not None and duration > max_source_seconds:
        # Only the first num_frames / fps seconds would be decoded, but a file this long is refused early.
        raise PoseInputError(_COLUMN, f"{path.name} is {duration:.1f} s long, over the limit of "
                                      f"{max_source_seconds:g} s for a driving video (max_source_seconds); only "
                                      f"its first {num_frames / fps:.2f} s are used, so trim it first")
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width <= 0 or height <= 0:
        raise PoseInputError(_COLUMN, f"{path.name}: its video stream has no frame size (not a readable video)")
    rotation = _rotation(stream)
    source_fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    out_w, out_h = _output_size(width, height, rotation, max_side)
    frames = _decode(path, int(stream["index"]), fps, num_frames, (out_w, out_h),
                     _timeout_s(num_frames / fps, source_fps, width, height))
    if len(frames) == 0:
        raise PoseInputError(_COLUMN, f"{path.name}: no video frames could be decoded")
    decoded = len(frames)
    if decoded < num_frames:
        if fill == "error":
            raise PoseInputError(_COLUMN, f"{path.name} has {decoded} frames at {fps:g} fps, needs {num_frames}; "
                                          f"set fill=loop or fill=pad")
        wanted = np.arange(num_frames)
        frames = frames[wanted % decoded if fill == "loop" else np.minimum(wanted, decoded - 1)]
    return DrivingVideo(frames=frames, fps=float(fps), source_fps=source_fps,
                        source_frames=_source_frames(stream, duration, source_fps), source_size=(width, height),
                        rotation=rotation, filled=num_frames - decoded if decoded < num_frames else 0)


def _check_arguments(fps: float, num_frames: int, fill: str, max_side: int, max_source_seconds: float) -> None:
    if fill not in FILL_MODES:
        raise RequestError("fill", fill, " or ".join(FILL_MODES))
    if not fps > 0:
        raise RequestError("fps", fps, "a frame rate > 0")
    if num_frames < 1:
        raise RequestError("num_frames", num_frames, "an integer ≥ 1")
    if max_side < 2:
        raise RequestError("max_side", max_side, "an integer ≥ 2")
    if not max_source_seconds > 0:
        raise RequestError("max_source_seconds", max_source_seconds, "a duration > 0")


def _video_stream(path: Path) -> tuple[dict[str, Any], float | None]:
    """The first real video stream (cover art is not one) and the file's duration in seconds, if known."""
    try:
        info = probe(path)
    except InputError as exc:
        raise PoseInputError(_COLUMN, f"{path.name}: {exc.reason}") from None
    streams = info.get("streams", [])
    videos = [s for s in streams
              if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not videos:
        audio_only = any(s.get("codec_type") == "audio" for s in streams)
        raise PoseInputError(_COLUMN, f"{path.name} has no video stream" + (" (audio only)" if audio_only else ""))
    stream = videos[0]
    duration = _float(info.get("format", {}).get("duration")) or _float(stream.get("duration"))
    return stream, duration


def _rotation(stream: dict[str, Any]) -> int:
    """Display rotation: the display matrix side data (ffmpeg ≥ 5), else the legacy `rotate` tag."""
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(round(float(side["rotation"]))) % 360
    return int(_float(stream.get("tags", {}).get("rotate")) or 0) % 360


def _output_size(width: int, height: int, rotation: int, max_side: int) -> tuple[int, int]:
    """Size after autorotation (a quarter turn swaps the sides) and scaling the long side to ≤ max_side."""
    if rotation % 180 == 90:
        width, height = height, width
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _timeout_s(seconds: float, source_fps: float, width: int, height: int) -> float:
    source_frames = seconds * max(source_fps, 1.0) + 2
    megapixels = max(1.0, width * height / 1e6)
    return float(math.ceil(DECODE_TIMEOUT_BASE_S + DECODE_TIMEOUT_PER_MEGAPIXEL_FRAME_S * source_frames * megapixels))


def _decode(path: Path, stream_index: int, fps: float, num_frames: int, size: tuple[int, int],
            timeout_s: float) -> np.ndarray:
    """Raw RGB frames from ffmpeg's stdout: [N, H, W, 3] uint8, N ≤ num_frames."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise PoseInputError(_COLUMN, "ffmpeg is not installed (apt-get install ffmpeg)")
    width, height = size
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-protocol_whitelist", "file",
            "-i", file_url(path), "-map", f"0:{stream_index}", "-an", "-sn", "-dn",
            # fps first, so frames that are dropped are never scaled; autorotation runs before -vf.
            "-vf", f"fps={fps},scale={width}:{height}:flags=area", "-frames:v", str(num_frames),
            "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
    try:
        done = run_media_command(argv, timeout_s)
    except subprocess.TimeoutExpired:
        raise PoseInputError(_COLUMN, f"{path.name}: decoding timed out after {timeout_s:g} s (killed)") from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.decode(errors="replace").split())[:300] or f"exit code {done.returncode}"
        raise PoseInputError(_COLUMN, f"{path.name}: ffmpeg could not decode the video ({reason})")
    frame_bytes = width * height * 3
    count = len(done.stdout) // frame_bytes
    return np.frombuffer(done.stdout, np.uint8, count * frame_bytes).reshape(count, height, width, 3)


def _source_frames(stream: dict[str, Any], duration: float | None, source_fps: float) -> int:
    """ffprobe's frame count, or duration × frame rate where the container stores none (Matroska, WebM)."""
    counted = stream.get("nb_frames")
    if counted is not None and str(counted).isdigit():
        return int(counted)
    return round(duration * source_fps) if duration and source_fps else 0


def _rate(text: object) -> float:
    """ "30000/1001" → 29.97; "0/0" or nothing → 0.0."""
    num, _, den = str(text or "0/0").partition("/")
    try:
        return float(num) / float(den or 1) if float(den or 1) else 0.0
    except ValueError:
        return 0.0


def _float(value: object) -> float | None:
    try:
        return float(value) if value is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
