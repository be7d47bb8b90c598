"""Post-processing: uint8 frames on disk -> H.264 MP4 (+ poster, optional WebP preview and audio).

The generate stage writes `frames.npy` (T, H, W, 3) uint8 RGB. `run_postprocess` streams those
frames through one ffmpeg encode (rawvideo on stdin -> filters -> libx264), then derives the
poster, the preview and the audio mux from the encoded file with cheap follow-up commands.

Every ffmpeg call gets an argv list (never a shell). A failure raises `PostprocessError` whose
message leads with ffmpeg's own reason, then the command and the tail of ffmpeg's stderr.

ffmpeg is only ever given local files: a reference with a URL scheme (`https:`, `s3:`, `concat:`,
...) is refused before any command runs, every path reaches ffmpeg as `file:<absolute path>` with
`-protocol_whitelist file`, and every input has an explicit demuxer (`png_pipe` for a watermark,
`mp4` for our own encodes) or a demuxer whitelist (audio), so `wm%d.png` is never read as an image
sequence. Every command runs under a timeout that grows with the clip (`media_timeout_s`); at the
timeout its whole process group is killed and reaped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ffmpeg
import numpy as np
from PIL import ImageFont

from tasks.errors import PostprocessError

logger = logging.getLogger(__name__)

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
PREVIEW_FPS = 12
PREVIEW_WIDTH = 480
STDERR_TAIL_LINES = 20
WATERMARK_MARGIN_PX = 16      # between a watermark and the frame's edges
WATERMARK_BOX_BORDER_PX = 6   # drawtext box padding around the text
# Timeout of every ffmpeg/ffprobe command of this stage (read at call time; tests lower them):
#   FFMPEG_TIMEOUT_BASE_S + FFMPEG_TIMEOUT_PER_FRAME_S * output frames * max(1, output megapixels).
# The slowest recipe, motion-compensated interpolation, costs ~0.15 s per output frame at 832x480
# on 2 shared cores (shared/reference/r2_ffmpeg.md §4): 1 s per frame leaves a wide margin.
FFMPEG_TIMEOUT_BASE_S = 30.0
FFMPEG_TIMEOUT_PER_FRAME_S = 1.0
# Demuxers an audio input may open with (the audio formats the fetch stage admits): never image2,
# which would expand `%d` in the name into an image sequence.
AUDIO_DEMUXERS = "wav,mp3,ogg,flac,mov,aac"
# x264 settings shared by every encode; BT.709 tags so players do not guess the matrix.
X264_ARGS: dict[str, Any] = {
    "vcodec": "libx264",
    "profile:v": "high",
    "pix_fmt": "yuv420p",
    "crf": 18,
    "preset": "medium",
    "movflags": "+faststart",
    "colorspace": "bt709",
    "color_primaries": "bt709",
    "color_trc": "bt709",
}


@dataclass(frozen=True)
class PostprocessRecipe:
    fps: int = 16                       # frame rate of the generated frames
    interpolate_fps: int | None = None  # motion-compensated interpolation to this rate
    upscale: float | None = None        # lanczos scale factor, e.g. 2.0
    watermark: str | None = None        # text, or a path to a .png
    preview: bool = False               # animated WebP preview (12 fps, 480 px wide)
    audio: str | None = None            # path to an audio file muxed as AAC

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"PostprocessRecipe.fps must be > 0, got {self.fps}")
        if self.interpolate_fps is not None and self.interpolate_fps <= self.fps:
            raise ValueError(
                f"PostprocessRecipe.interpolate_fps must be > fps={self.fps}, got {self.interpolate_fps}")
        if self.upscale is not None and not self.upscale > 0:
            raise ValueError(f"PostprocessRecipe.upscale must be > 0, got {self.upscale}")

    @property
    def output_fps(self) -> int:
        return self.interpolate_fps or self.fps

    @property
    def watermark_is_image(self) -> bool:
        return self.watermark is not None and self.watermark.lower().endswith(".png")


@dataclass(frozen=True)
class PostprocessOutput:
    video_path: Path
    poster_path: Path
    preview_path: Path | None
    width: int
    height: int
    frames: int
    fps: int
    seconds: float


def run_postprocess(frames_path: Path, recipe: PostprocessRecipe, out_dir: Path, name: str) -> PostprocessOutput:
    """Encode `frames_path` with `recipe` into `out_dir/<name>.mp4` (+ `.jpg` poster, `.webp` preview)."""
    frames = np.load(frames_path, mmap_mode="r")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{frames_path}: expected uint8 frames of shape (T, H, W, 3), "
                         f"got {frames.dtype} {tuple(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError(f"{frames_path}: has no frames")
    out_width, out_height = _output_size(width, height, recipe.upscale)
    if out_width % 2 or out_height % 2:
        raise ValueError(f"{frames_path}: yuv420p needs an even output size, got {out_width}x{out_height} "
                         f"(input {width}x{height}, upscale={recipe.upscale})")

    if recipe.watermark_is_image:
        _refuse_url("watermark", recipe.watermark)
    if recipe.audio is not None:
        _refuse_url("audio", recipe.audio)
    # Every command's timeout scales with the clip: the output frame count after interpolation.
    timeout_s = media_timeout_s(math.ceil(num_frames * recipe.output_fps / recipe.fps), out_width, out_height,
                                FFMPEG_TIMEOUT_BASE_S, FFMPEG_TIMEOUT_PER_FRAME_S)

    out_dir.mkdir(parents=True, exist_ok=True)
    video_path = out_dir / f"{name}.mp4"
    partial_path = out_dir / f"{name}.partial.mp4"

    # 1. Encode: rgb24 frames on stdin -> filters -> libx264 (written to a partial file, renamed last).
    encode_cmd = _encode_command(recipe, width, height, out_width, out_height, partial_path)
    _run_with_stdin_frames(encode_cmd, frames, timeout_s)

    # 2. Optional audio mux: copy the video stream, AAC audio, cut to the shorter stream.
    if recipe.audio is not None:
        muxed_path = out_dir / f"{name}.partial-audio.mp4"
        _run(_audio_mux_command(partial_path, Path(recipe.audio), muxed_path), timeout_s)
        os.replace(muxed_path, partial_path)
    os.replace(partial_path, video_path)

    encoded_frames = _count_video_packets(video_path, timeout_s)
    seconds = encoded_frames / recipe.output_fps

    # 3. Poster from the middle of the encoded clip, so it shows the watermark and upscale too.
    poster_path = out_dir / f"{name}.jpg"
    _run(_poster_command(video_path, poster_path, seek_seconds=(encoded_frames // 2) / recipe.output_fps),
         timeout_s)

    # 4. Optional animated WebP preview.
    preview_path = None
    if recipe.preview:
        preview_path = out_dir / f"{name}.webp"
        _run(_preview_command(video_path, preview_path, out_width), timeout_s)

    return PostprocessOutput(video_path=video_path, poster_path=poster_path, preview_path=preview_path,
                             width=out_width, height=out_height, frames=encoded_frames,
                             fps=recipe.output_fps, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Command builders (argv lists)
# ---------------------------------------------------------------------------------------------

def _output_size(width: int, height: int, upscale: float | None) -> tuple[int, int]:
    if upscale is None:
        return width, height
    # Round to the nearest even size: yuv420p subsamples chroma by 2 in both directions.
    return 2 * round(width * upscale / 2), 2 * round(height * upscale / 2)


def _encode_command(recipe: PostprocessRecipe, width: int, height: int, out_width: int, out_height: int,
                    out_path: Path) -> list[str]:
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                         framerate=recipe.fps).video
    if recipe.interpolate_fps is not None:
        video = video.filter("minterpolate", fps=recipe.interpolate_fps, mi_mode="mci", mc_mode="aobmc",
                             me_mode="bidir", vsbmc=1)
    if recipe.upscale is not None:
        video = video.filter("scale", out_width, out_height, flags="lanczos")
    if recipe.watermark is not None:
        video = _add_watermark(video, recipe, out_width, out_height)
    # RGB -> limited-range BT.709 YUV in one explicit conversion that matches the stream tags.
    video = video.filter("scale", out_color_matrix="bt709", out_range="tv").filter("format", "yuv420p")
    output = ffmpeg.output(video, file_url(out_path), format="mp4", **X264_ARGS)
    return _compile(output)


def _add_watermark(video: Any, recipe: PostprocessRecipe, out_width: int, out_height: int) -> Any:
    assert recipe.watermark is not None
    margin = WATERMARK_MARGIN_PX
    if recipe.watermark_is_image:
        # png_pipe reads exactly this one file: image2 would take `wm%d.png` as a sequence pattern.
        mark = (ffmpeg.input(file_url(recipe.watermark), format="png_pipe", protocol_whitelist="file").video
                .filter("format", "rgba").filter("colorchannelmixer", aa=0.8))
        return ffmpeg.overlay(video, mark, x=f"W-w-{margin}", y=f"H-h-{margin}")
    if not FONT_PATH.is_file():
        raise PostprocessError([], "", reason=f"text watermark needs the font {FONT_PATH} "
                                              f"(apt-get install fonts-dejavu-core)")
    # expansion=none: the text is literal, '%' is not a drawtext expansion marker.
    return video.filter("drawtext", fontfile=str(FONT_PATH), text=recipe.watermark, expansion="none",
                        fontsize=watermark_font_size(recipe.watermark, out_width, out_height),
                        fontcolor="white@0.7", box=1, boxcolor="black@0.4", boxborderw=WATERMARK_BOX_BORDER_PX,
                        x=f"w-tw-{margin}", y=f"h-th-{margin}")


def watermark_font_size(text: str, frame_width: int, frame_height: int) -> int:
    """drawtext font size for a text watermark: 1/24 of the frame height (at least 12 px), made smaller
    until the text and its box fit the frame width minus a margin on both sides, so it is never clipped.

    The width is measured with Pillow on the same DejaVu font that drawtext renders (`_text_width_px`)."""
    room = frame_width - 2 * (WATERMARK_MARGIN_PX + WATERMARK_BOX_BORDER_PX)
    size = max(12, frame_height // 24)
    width = _text_width_px(text, size)
    if width > room and room > 0:
        size = max(1, min(size - 1, math.floor(size * room / width)))  # text width is ~linear in size
        while size > 1 and _text_width_px(text, size) > room:
            size -= 1
        width = _text_width_px(text, size)
    if width > room:
        raise PostprocessError([], "", reason=f"text watermark ({len(text)} characters) does not fit a "
                                              f"{frame_width}-pixel-wide frame even at 1 px: shorten it")
    return size


def _text_width_px(text: str, size: int) -> float:
    """Width of the widest line of `text` at `size` px, rounded up for drawtext: its glyph ink can end
    a pixel or two past Pillow's advance width."""
    font = ImageFont.truetype(str(FONT_PATH), size)
    widest = max((max(font.getlength(line), font.getbbox(line)[2]) for line in text.split("\n")), default=0.0)
    return widest * 1.03 + 2


def _audio_mux_command(video_path: Path, audio_path: Path, out_path: Path) -> list[str]:
    video = ffmpeg.input(file_url(video_path), format="mp4", protocol_whitelist="file").video
    audio = ffmpeg.input(file_url(audio_path), format_whitelist=AUDIO_DEMUXERS, protocol_whitelist="file").audio
    output = ffmpeg.output(video, audio, file_url(out_path), format="mp4", vcodec="copy", acodec="aac",
                           **{"b:a": "192k"}, shortest=None, movflags="+faststart")
    return _compile(output)


def _poster_command(video_path: Path, poster_path: Path, seek_seconds: float) -> list[str]:
    video = ffmpeg.input(file_url(video_path), ss=f"{seek_seconds:.3f}", format="mp4",
                         protocol_whitelist="file").video
    # update=1: the image2 muxer writes this one name, never a `%d` pattern.
    output = ffmpeg.output(video, file_url(poster_path), format="image2", vframes=1, **{"q:v": 2}, update=1)
    return _compile(output)


def _preview_command(video_path: Path, preview_path: Path, video_width: int) -> list[str]:
    width = min(PREVIEW_WIDTH, video_width)  # never upscale a preview
    video = (ffmpeg.input(file_url(video_path), format="mp4", protocol_whitelist="file").video
             .filter("fps", PREVIEW_FPS)
             .filter("scale", width, -2, flags="lanczos"))
    output = ffmpeg.output(video, file_url(preview_path), format="webp", vcodec="libwebp_anim", quality=70,
                           compression_level=4, loop=0, an=None)
    return _compile(output)


def _compile(output: Any) -> list[str]:
    return list(ffmpeg.compile(output.global_args("-hide_banner", "-nostats", "-loglevel", "error"),
                               overwrite_output=True))


# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

def _run(command: list[str], timeout_s: float, feed: Callable[[IO[bytes]], None] | None = None,
         ) -> subprocess.CompletedProcess[bytes]:
    """`run_media_command`, with every failure (non-zero exit, timeout, no ffmpeg) as PostprocessError."""
    program = Path(command[0]).name
    try:
        result = run_media_command(command, timeout_s, feed=feed)
    except subprocess.TimeoutExpired as exc:
        raise PostprocessError(command, _tail(_decode(exc.stderr)),
                               reason=f"{program} timed out after {timeout_s:g} s (killed)") from None
    except FileNotFoundError:
        raise PostprocessError(command, "", reason=f"{program} is not on PATH (apt-get install ffmpeg)") from None
    if result.returncode != 0:
        stderr = _decode(result.stderr)
        raise PostprocessError(command, _tail(stderr), reason=failure_reason(program, result.returncode, stderr))
    return result


def _run_with_stdin_frames(command: list[str], frames: np.ndarray, timeout_s: float) -> None:
    """Feed frames one by one to ffmpeg's stdin (stderr goes to a temp file, so it can never fill a pipe)."""
    logger.debug("encode: %s", shlex.join(command))

    def feed(stdin: IO[bytes]) -> None:
        for frame in frames:
            stdin.write(np.ascontiguousarray(frame).tobytes())

    _run(command, timeout_s, feed)


# ffprobe calls use plain argv lists: ffmpeg.probe() cannot return stdout on error or select streams cleanly.
def _count_video_packets(video_path: Path, timeout_s: float) -> int:
    command = ["ffprobe", "-v", "error", "-protocol_whitelist", "file", "-f", "mp4", "-count_packets",
               "-select_streams", "v:0", "-show_entries", "stream=nb_read_packets", "-of", "json",
               file_url(video_path)]
    result = _run(command, timeout_s)
    return int(json.loads(result.stdout)["streams"][0]["nb_read_packets"])


# ---------------------------------------------------------------------------------------------
# ffmpeg/ffprobe safety, shared with tasks.validate_video and tasks.inputs
# ---------------------------------------------------------------------------------------------

# A URL scheme as ffmpeg's protocol lookup sees one (`https:`, `s3:`, `concat:`, `subfile,`...).
_URL_SCHEME = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:|subfile,)")
# ffmpeg's follow-up lines after the real error: never the reason itself.
_CONSEQUENCE_LINE = re.compile(
    r"(Conversion failed!|Error reinitializing filters!|Failed to inject frame into filter network"
    r"|Error while processing the decoded data|Output file #\d+ does not contain any stream"
    r"|Error marking filters as finished|Error while filtering|Nothing was written into output file"
    r"|Error initializing output stream|Cannot determine format of input stream|Exiting normally)")
_LOG_CONTEXT = re.compile(r"^\[([^\]@]+?) @ 0x[0-9a-f]+\] ")   # "[png @ 0x55d0…] " -> "[png] "


def url_scheme(reference: str | os.PathLike[str]) -> str | None:
    """The URL scheme (or ffmpeg protocol) `reference` starts with, e.g. "https", or None for a path.

    ffmpeg opens such a reference itself (an http GET without certificate checks, an S3 or FTP
    session, a concat of other files), so callers refuse it instead of passing it on."""
    match = _URL_SCHEME.match(os.fspath(reference))
    return match.group()[:-1] if match else None


def file_url(path: str | os.PathLike[str]) -> str:
    """`path` as ffmpeg must see it: `file:` + the absolute path, so no part of it reads as a protocol."""
    return "file:" + os.path.abspath(path)


def _refuse_url(what: str, reference: str | None) -> None:
    scheme = url_scheme(reference or "")
    if scheme is not None:
        raise PostprocessError([], "", reason=f"{what} is a URL ({scheme}:...), not a local file: post-processing "
                                              f"opens local files only (the fetch stage downloads references)")


def media_timeout_s(frames: int, width: int, height: int, base_s: float, per_frame_s: float) -> float:
    """`base_s` plus `per_frame_s` per frame, times the megapixels above the first; whole seconds."""
    return float(math.ceil(base_s + per_frame_s * max(frames, 0) * max(1.0, width * height / 1e6)))


def run_media_command(command: Sequence[str], timeout_s: float, *,
                      feed: Callable[[IO[bytes]], None] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run an ffmpeg/ffprobe argv in a process group of its own; raise `subprocess.TimeoutExpired` (with
    what it printed) after killing and reaping the whole group at `timeout_s`.

    stdout and stderr go to temporary files, so a chatty process can never stall on a full pipe. `feed`
    writes its stdin from a thread: a process that stops reading cannot block the timeout either."""
    argv = list(command)
    with tempfile.TemporaryFile() as stdout_file, tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                                   stdout=stdout_file, stderr=stderr_file, start_new_session=True)
        feed_errors: list[BaseException] = []
        feeder = None
        if feed is not None:
            feeder = threading.Thread(target=_feed_stdin, args=(process, feed, feed_errors), daemon=True)
            feeder.start()
        timed_out = False
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = _kill_group(process)
        except BaseException:       # KeyboardInterrupt, ...: never leave it running
            _kill_group(process)
            raise
        finally:
            if feeder is not None:
                feeder.join()
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout_s, output=stdout, stderr=stderr)
    if feed_errors:
        raise feed_errors[0]
    return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def _feed_stdin(process: subprocess.Popen[bytes], feed: Callable[[IO[bytes]], None],
                errors: list[BaseException]) -> None:
    assert process.stdin is not None
    try:
        feed(process.stdin)
    except BrokenPipeError:
        pass                        # it exited or was killed: its return code and stderr say why
    except BaseException as exc:    # re-raised by run_media_command once the process has ended
        errors.append(exc)
    finally:
        try:
            process.stdin.close()   # EOF: ffmpeg finishes the file
        except OSError:
            pass


def _kill_group(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL the process and everything it started (its session's group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)   # not reaped yet, so the group id is still its own
    except (ProcessLookupError, PermissionError):
        process.kill()
    return process.wait()


def failure_reason(program: str, returncode: int, stderr: str) -> str:
    """`<program> failed: <its last meaningful stderr line>`, for the head of an error message."""
    if returncode < 0:
        try:
            return f"{program} was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"{program} was killed by signal {-returncode}"
    for line in reversed(stderr.strip().splitlines()):
        line = _LOG_CONTEXT.sub(r"[\1] ", line.strip())
        if line and not _CONSEQUENCE_LINE.match(line):
            return f"{program} failed: {line if len(line) <= 300 else line[:299] + '…'}"
    return f"{program} failed with exit code {returncode} and no error output"


def _decode(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
