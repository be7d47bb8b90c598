"""Checks on the files a manifest row points at, run before any GPU time is spent.

Each check opens the file the way the later stage will (Pillow for images, ffprobe for video and
audio) and raises `InputError` with a one-line reason when it cannot.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image

FFPROBE_TIMEOUT_S = 30


class InputError(ValueError):
    """A referenced input file is missing or cannot be decoded."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def check_image(path: str | Path) -> tuple[int, int]:
    """Decode the whole image; return (width, height)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # open() only reads the header; load() decodes the pixels
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image ({type(exc).__name__}: {_one_line(exc)})") from None


def probe(path: str | Path) -> dict[str, Any]:
    """ffprobe's JSON description (streams and format) of a media file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise InputError("ffprobe is not installed (apt-get install ffmpeg)")
    argv = [ffprobe, "-v", "error", "-print_format", "json", "-show_streams", "-show_format",
            str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=FFPROBE_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise InputError(f"ffprobe took more than {FFPROBE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise InputError(f"not a readable media file (ffprobe: {_one_line(done.stderr) or 'failed'})")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise InputError("ffprobe printed no JSON") from None


def check_video(path: str | Path) -> dict[str, Any]:
    """ffprobe's description of a file that must hold a video stream."""
    info = probe(path)
    streams = _streams_of(info, "video")
    if not streams:
        raise InputError("has no video stream")
    if not any(s.get("width", 0) > 0 and s.get("height", 0) > 0 for s in streams):
        raise InputError("its video stream has no frames ffprobe can size (not a readable video)")
    # ffprobe opens still images as one-frame "video" through its image demuxers
    format_name = str(info.get("format", {}).get("format_name", ""))
    if format_name == "image2" or format_name.endswith("_pipe"):
        raise InputError(f"is a still image ({format_name}), not a video")
    return info


def check_audio(path: str | Path) -> dict[str, Any]:
    """ffprobe's description of a file that must hold an audio stream."""
    info = probe(path)
    if not _streams_of(info, "audio"):
        raise InputError("has no audio stream")
    return info


def _streams_of(info: dict[str, Any], codec_type: str) -> list[dict[str, Any]]:
    # Cover art in audio files shows up as a video stream with attached_pic set: not a video.
    return [s for s in info.get("streams", [])
            if s.get("codec_type") == codec_type
            and not s.get("disposition", {}).get("attached_pic")]


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
