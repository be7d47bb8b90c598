"""Validate an encoded MP4 before it is uploaded.

Checks run in order of cost, and the first failure raises `VideoValidationError` naming it:

1. "boxes"  - walk the top-level MP4 boxes: their sizes must add up exactly to the file size
              (catches every truncation) and `moov` must come before `mdat` (faststart).
2. "stream" - ffprobe with -count_packets: h264, High profile, yuv420p, expected size and frame
              count (and an AAC-or-other audio stream when expected).
3. "decode" - full decode `ffmpeg -xerror ... -f null -`: return code 0 AND an empty stderr.
              Garbage in the middle of `mdat` passes 1 and 2 and can still exit 0, but it always
              prints "error while decoding" lines.

Before them, "path": a reference with a URL scheme (`https:`, `s3:`, `concat:`...) is refused; the
file reaches ffprobe/ffmpeg as `file:<absolute path>` with the mp4 demuxer forced and
`-protocol_whitelist file`. Both commands run under a timeout that grows with the expected frame
count (VALIDATE_TIMEOUT_*_S); at the timeout the process group is killed and the check fails.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import VideoValidationError
from tasks.postprocess import file_url, media_timeout_s, run_media_command, url_scheme

CHECK_PATH, CHECK_BOXES, CHECK_STREAM, CHECK_DECODE = "path", "boxes", "stream", "decode"
# Timeout of each ffprobe/ffmpeg check (read at call time; tests lower them): base + per expected
# frame (x megapixels above 1). A full decode costs ~0.005 s per 832x480 frame (r2_ffmpeg.md §5).
VALIDATE_TIMEOUT_BASE_S = 30.0
VALIDATE_TIMEOUT_PER_FRAME_S = 0.25


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    size_bytes: int
    width: int
    height: int
    frames: int
    fps: str             # exact rational, e.g. "16/1"
    seconds: float
    codec: str
    profile: str
    pix_fmt: str
    has_audio: bool
    boxes: tuple[str, ...]


def validate_video(path: Path | str, expect_width: int, expect_height: int, expect_frames: int,
                   expect_audio: bool = False) -> VideoInfo:
    scheme = url_scheme(path)
    if scheme is not None:
        raise VideoValidationError(path, CHECK_PATH, f"is a URL ({scheme}:...), not a local file: validation "
                                                     f"opens local files only")
    path = Path(path)
    timeout_s = media_timeout_s(expect_frames, expect_width, expect_height,
                                VALIDATE_TIMEOUT_BASE_S, VALIDATE_TIMEOUT_PER_FRAME_S)
    boxes = check_boxes(path)
    info = _check_streams(path, boxes, expect_width, expect_height, expect_frames, expect_audio, timeout_s)
    _check_decode(path, timeout_s)
    return info


def check_boxes(path: Path) -> tuple[str, ...]:
    """Walk the top-level boxes; return their types in file order."""
    if not path.is_file():
        raise VideoValidationError(path, CHECK_BOXES, "file does not exist")
    file_size = path.stat().st_size
    if file_size == 0:
        raise VideoValidationError(path, CHECK_BOXES, "file is empty (0 bytes)")
    types: list[str] = []
    offset = 0
    with path.open("rb") as f:
        while offset < file_size:
            f.seek(offset)
            header = f.read(16)
            if len(header) < 8:
                raise VideoValidationError(path, CHECK_BOXES, f"truncated box header at offset {offset}")
            size, raw_type = struct.unpack(">I4s", header[:8])
            box_type = raw_type.decode("latin-1")
            if size == 1:  # 64-bit "largesize" follows the type
                if len(header) < 16:
                    raise VideoValidationError(path, CHECK_BOXES, f"truncated largesize header at offset {offset}")
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:  # box runs to the end of the file
                size = file_size - offset
            if size < 8:
                raise VideoValidationError(path, CHECK_BOXES, f"box {box_type!r} at offset {offset} has size {size}")
            if offset + size > file_size:
                raise VideoValidationError(
                    path, CHECK_BOXES, f"box {box_type!r} at offset {offset} needs {size} bytes but only "
                                       f"{file_size - offset} remain (file truncated?)")
            types.append(box_type)
            offset += size
    for required in ("ftyp", "moov", "mdat"):
        if required not in types:
            raise VideoValidationError(path, CHECK_BOXES, f"no '{required}' box (boxes: {types})")
    if types.index("moov") > types.index("mdat"):
        raise VideoValidationError(path, CHECK_BOXES, f"'moov' comes after 'mdat': not faststart (boxes: {types})")
    return tuple(types)


def _run_check(path: Path, check: str, command: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return run_media_command(command, timeout_s)
    except subprocess.TimeoutExpired:
        raise VideoValidationError(path, check, f"{command[0]} timed out after {timeout_s:g} s (killed)") from None
    except FileNotFoundError:
        raise VideoValidationError(path, check, f"{command[0]} is not on PATH (apt-get install ffmpeg)") from None


def _check_streams(path: Path, boxes: tuple[str, ...], expect_width: int, expect_height: int,
                   expect_frames: int, expect_audio: bool, timeout_s: float) -> VideoInfo:
    command = ["ffprobe", "-v", "error", "-protocol_whitelist", "file", "-f", "mp4", "-count_packets",
               "-show_streams", "-show_format", "-of", "json", file_url(path)]
    result = _run_check(path, CHECK_STREAM, command, timeout_s)
    # Only the return code counts here: ffprobe decodes a frame or two to fill in stream fields, and
    # decoder errors it prints are payload damage, which the "decode" check reports with full context.
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise VideoValidationError(path, CHECK_STREAM, f"ffprobe rc={result.returncode}: {stderr[-500:]}")
    probe = json.loads(result.stdout)
    streams = probe.get("streams", [])
    videos = [s for s in streams if s.get("codec_type") == "video"]
    if not videos:
        raise VideoValidationError(path, CHECK_STREAM, "no video stream")
    video = videos[0]
    has_audio = any(s.get("codec_type") == "audio" for s in streams)

    expected = {"codec_name": "h264", "profile": "High", "pix_fmt": "yuv420p",
                "width": expect_width, "height": expect_height, "nb_read_packets": expect_frames}
    found = {"codec_name": video.get("codec_name"), "profile": video.get("profile"),
             "pix_fmt": video.get("pix_fmt"), "width": video.get("width"), "height": video.get("height"),
             "nb_read_packets": int(video.get("nb_read_packets", -1))}
    wrong = [f"{key}={found[key]!r} (expected {value!r})" for key, value in expected.items() if found[key] != value]
    if has_audio != expect_audio:
        wrong.append(f"audio stream {'present' if has_audio else 'missing'} (expected "
                     f"{'one' if expect_audio else 'none'})")
    if wrong:
        raise VideoValidationError(path, CHECK_STREAM, "; ".join(wrong))
    return VideoInfo(path=path, size_bytes=path.stat().st_size, width=found["width"], height=found["height"],
                     frames=found["nb_read_packets"], fps=video.get("avg_frame_rate", ""),
                     seconds=float(probe.get("format", {}).get("duration") or 0.0),
                     codec=found["codec_name"], profile=found["profile"], pix_fmt=found["pix_fmt"],
                     has_audio=has_audio, boxes=boxes)


def _check_decode(path: Path, timeout_s: float) -> None:
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-xerror", "-protocol_whitelist", "file",
               "-f", "mp4", "-i", file_url(path), "-map", "0:v:0", "-f", "null", "-"]
    result = _run_check(path, CHECK_DECODE, command, timeout_s)
    stderr = result.stderr.decode(errors="replace").strip()
    if result.returncode != 0 or stderr:
        lines = stderr.splitlines()
        raise VideoValidationError(path, CHECK_DECODE, f"ffmpeg rc={result.returncode}, "
                                                       f"{len(lines)} error line(s): {' | '.join(lines[-5:])}")
