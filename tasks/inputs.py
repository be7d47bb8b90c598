"""Checks on the files a manifest row points at, run before any GPU time is spent.

Each check opens the file the way the later stage will (Pillow for images, ffprobe for video and
audio) and raises `InputError` with a one-line reason when it cannot. `sniff_format` reads the
magic bytes first (cheap, before any decoder sees the file); `host_allowed` is the https host
allowlist (`TURBO_FETCH_ALLOW`) shared by the manifest check and the fetch stage.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.errors import InputError
from tasks.postprocess import file_url, run_media_command, url_scheme

# ffprobe's timeout (read at call time; tests lower it). It reads headers, not every frame, and the
# clip's length is what it is asked for, so the allowance grows with the file's size instead.
FFPROBE_TIMEOUT_S = 30
FFPROBE_TIMEOUT_PER_GIB_S = 30


# What the i2v pipeline can use (engine/conditioning.py `load_rgb`): the same rules for every image
# column, local or fetched, so a file is refused here rather than on the GPU host.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")   # Pillow names; as KIND_FORMATS["image"]
MIN_IMAGE_SIDE = 2


def check_image(path: str | Path) -> tuple[int, int]:
    """Decode the whole image; return (width, height).

    Refused before decoding: an empty file, a side under MIN_IMAGE_SIDE px, or more pixels than
    engine.conditioning.MAX_IMAGE_PIXELS (read at call time) by the header's width × height, so a
    decompression bomb is never decoded. One plain signature: the fetch stage's `_CHECKS` table
    calls every check alike."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    from engine import conditioning  # deferred: it imports torch, which a t2v batch never needs
    max_pixels, min_side = conditioning.MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
    limit = f"the limit of {max_pixels:,} pixels ({max_pixels / 1e6:g} MP)"
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size          # open() only reads the header
            if width * height > max_pixels:
                raise InputError(f"image is {width}×{height} pixels ({width * height / 1e6:.1f} MP), "
                                 f"over {limit}; not decoded")
            if width < min_side or height < min_side:
                raise InputError(f"image is {width}×{height} pixels, under the minimum of "
                                 f"{min_side}×{min_side}")
            image.load()  # load() decodes the pixels
            return image.size
    except InputError:   # a ValueError too: not to be taken for an unreadable file below
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (twice its MAX_IMAGE_PIXELS) fires inside open(), before we see the size
        raise InputError(f"image is over {limit}; not decoded ({_one_line(exc)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"not a readable image ({type(exc).__name__}: {_one_line(exc)}; "
                         f"expected {KIND_FORMATS['image']})") from None


def probe(path: str | Path) -> dict[str, Any]:
    """ffprobe's JSON description (streams and format) of a media file.

    A reference with a URL scheme is refused; the file reaches ffprobe as `file:<absolute path>`
    with `-protocol_whitelist file`, so ffprobe never opens anything but this local file."""
    scheme = url_scheme(path)
    if scheme is not None:
        raise InputError(f"is a URL ({scheme}:...), not a local file: ffprobe opens local files only")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise InputError("ffprobe is not installed (apt-get install ffmpeg)")
    argv = [ffprobe, "-v", "error", "-protocol_whitelist", "file", "-print_format", "json",
            "-show_streams", "-show_format", file_url(path)]
    timeout_s = math.ceil(FFPROBE_TIMEOUT_S + FFPROBE_TIMEOUT_PER_GIB_S * path.stat().st_size / 2**30)
    try:
        done = run_media_command(argv, timeout_s)
    except subprocess.TimeoutExpired:
        raise InputError(f"ffprobe timed out after {timeout_s} s (killed)") from None
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise InputError(f"not a readable media file (ffprobe: {_one_line(stderr) or 'failed'})")
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


# ── magic bytes ──────────────────────────────────────────────────────────────────────────────────

SNIFF_BYTES = 64          # enough for every signature below
# What each reference column may hold, in words (for the error message).
KIND_FORMATS = {
    "image": "PNG, JPEG, WebP, GIF, BMP or TIFF",
    "watermark": "PNG",
    "driving_video": "MP4, MOV, WebM, MKV or AVI",
    "audio": "MP3, WAV, OGG, FLAC, M4A or AAC",
}


def sniff_format(head: bytes, column: str) -> str | None:
    """The file extension (without dot) the first bytes of a file announce for `column`, or None.

    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n...", "image")
    'png'
    """
    if column == "watermark":
        return "png" if head.startswith(b"\x89PNG\r\n\x1a\n") else None
    if column == "image":
        return _sniff_image(head)
    if column == "driving_video":
        return _sniff_video(head)
    if column == "audio":
        return _sniff_audio(head)
    raise ValueError(f"no magic-byte rule for column {column!r}; known: {', '.join(KIND_FORMATS)}")


def _sniff_image(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _sniff_video(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):            # EBML: Matroska, or WebM by its DocType
        return "webm" if b"webm" in head else "mkv"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _sniff_audio(head: bytes) -> str | None:
    if head.startswith(b"ID3"):
        return "mp3"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head[4:8] == b"ftyp":
        return "m4a"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:                          # 12-bit sync, layer 00: AAC ADTS
            return "aac"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06:       # 11-bit sync, layer I/II/III: MPEG audio
            return "mp3"
    return None


# ── https host allowlist ─────────────────────────────────────────────────────────────────────────

def parse_host_list(text: str | None) -> tuple[str, ...]:
    """`TURBO_FETCH_ALLOW`-style text ("cdn.example.com, *.assets.example.com") → lower-case names."""
    return tuple(h for h in (part.strip().lower() for part in (text or "").split(",")) if h)


def host_allowed(host: str | None, allow: Iterable[str]) -> bool:
    """Exact (case-insensitive) match, or `*.example.com` for any name under example.com (not
    example.com itself). Ports are not part of the match. An empty allowlist allows nothing."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    for pattern in allow:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif pattern and host == pattern:
            return True
    return False


def _streams_of(info: dict[str, Any], codec_type: str) -> list[dict[str, Any]]:
    # Cover art in audio files shows up as a video stream with attached_pic set: not a video.
    return [s for s in info.get("streams", [])
            if s.get("codec_type") == codec_type
            and not s.get("disposition", {}).get("attached_pic")]


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
