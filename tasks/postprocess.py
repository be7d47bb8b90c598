"""Post-processing: uint8 frames on disk -> H.264 MP4 (+ poster, optional WebP preview and audio).

The generate stage writes `frames.npy` (T, H, W, 3) uint8 RGB. `run_postprocess` streams those
frames through one ffmpeg encode (rawvideo on stdin -> filters -> libx264), then derives the
poster, the preview and the audio mux from the encoded file with cheap follow-up commands.

Every ffmpeg call gets an argv list (never a shell). A failure raises `PostprocessError` with the
command and the tail of ffmpeg's stderr.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from tasks.errors import PostprocessError

logger = logging.getLogger(__name__)

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
PREVIEW_FPS = 12
PREVIEW_WIDTH = 480
STDERR_TAIL_LINES = 20
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

    out_dir.mkdir(parents=True, exist_ok=True)
    video_path = out_dir / f"{name}.mp4"
    partial_path = out_dir / f"{name}.partial.mp4"

    # 1. Encode: rgb24 frames on stdin -> filters -> libx264 (written to a partial file, renamed last).
    encode_cmd = _encode_command(recipe, width, height, out_width, out_height, partial_path)
    _run_with_stdin_frames(encode_cmd, frames)

    # 2. Optional audio mux: copy the video stream, AAC audio, cut to the shorter stream.
    if recipe.audio is not None:
        muxed_path = out_dir / f"{name}.partial-audio.mp4"
        _run(_audio_mux_command(partial_path, Path(recipe.audio), muxed_path))
        os.replace(muxed_path, partial_path)
    os.replace(partial_path, video_path)

    encoded_frames = _count_video_packets(video_path)
    seconds = encoded_frames / recipe.output_fps

    # 3. Poster from the middle of the encoded clip, so it shows the watermark and upscale too.
    poster_path = out_dir / f"{name}.jpg"
    _run(_poster_command(video_path, poster_path, seek_seconds=(encoded_frames // 2) / recipe.output_fps))

    # 4. Optional animated WebP preview.
    preview_path = None
    if recipe.preview:
        preview_path = out_dir / f"{name}.webp"
        _run(_preview_command(video_path, preview_path, out_width))

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
        video = _add_watermark(video, recipe, out_height)
    # RGB -> limited-range BT.709 YUV in one explicit conversion that matches the stream tags.
    video = video.filter("scale", out_color_matrix="bt709", out_range="tv").filter("format", "yuv420p")
    output = ffmpeg.output(video, str(out_path), format="mp4", **X264_ARGS)
    return _compile(output)


def _add_watermark(video: Any, recipe: PostprocessRecipe, out_height: int) -> Any:
    assert recipe.watermark is not None
    if recipe.watermark_is_image:
        mark = ffmpeg.input(recipe.watermark).video.filter("format", "rgba").filter("colorchannelmixer", aa=0.8)
        return ffmpeg.overlay(video, mark, x="W-w-16", y="H-h-16")
    if not FONT_PATH.is_file():
        raise PostprocessError([], "", reason=f"text watermark needs the font {FONT_PATH} "
                                              f"(apt-get install fonts-dejavu-core)")
    # expansion=none: the text is literal, '%' is not a drawtext expansion marker.
    return video.filter("drawtext", fontfile=str(FONT_PATH), text=recipe.watermark, expansion="none",
                        fontsize=max(12, out_height // 24), fontcolor="white@0.7", box=1, boxcolor="black@0.4",
                        boxborderw=6, x="w-tw-16", y="h-th-16")


def _audio_mux_command(video_path: Path, audio_path: Path, out_path: Path) -> list[str]:
    video = ffmpeg.input(str(video_path)).video
    audio = ffmpeg.input(str(audio_path)).audio
    output = ffmpeg.output(video, audio, str(out_path), format="mp4", vcodec="copy", acodec="aac",
                           **{"b:a": "192k"}, shortest=None, movflags="+faststart")
    return _compile(output)


def _poster_command(video_path: Path, poster_path: Path, seek_seconds: float) -> list[str]:
    video = ffmpeg.input(str(video_path), ss=f"{seek_seconds:.3f}").video
    output = ffmpeg.output(video, str(poster_path), format="image2", vframes=1, **{"q:v": 2}, update=1)
    return _compile(output)


def _preview_command(video_path: Path, preview_path: Path, video_width: int) -> list[str]:
    width = min(PREVIEW_WIDTH, video_width)  # never upscale a preview
    video = (ffmpeg.input(str(video_path)).video
             .filter("fps", PREVIEW_FPS)
             .filter("scale", width, -2, flags="lanczos"))
    output = ffmpeg.output(video, str(preview_path), format="webp", vcodec="libwebp_anim", quality=70,
                           compression_level=4, loop=0, an=None)
    return _compile(output)


def _compile(output: Any) -> list[str]:
    return list(ffmpeg.compile(output.global_args("-hide_banner", "-nostats", "-loglevel", "error"),
                               overwrite_output=True))


# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

def _run(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if result.returncode != 0:
        raise PostprocessError(command, _tail(result.stderr.decode(errors="replace")))
    return result


def _run_with_stdin_frames(command: list[str], frames: np.ndarray) -> None:
    """Feed frames one by one to ffmpeg's stdin; stderr goes to a temp file so it can never fill a pipe."""
    logger.debug("encode: %s", shlex.join(command))
    with tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr_file)
        assert process.stdin is not None
        try:
            for frame in frames:
                process.stdin.write(np.ascontiguousarray(frame).tobytes())
            process.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg exited early; its return code and stderr say why
        finally:
            returncode = process.wait()
        if returncode != 0:
            stderr_file.seek(0)
            raise PostprocessError(command, _tail(stderr_file.read().decode(errors="replace")))


# ffprobe calls use plain argv lists: ffmpeg.probe() cannot return stdout on error or select streams cleanly.
def _count_video_packets(video_path: Path) -> int:
    command = ["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
               "-show_entries", "stream=nb_read_packets", "-of", "json", str(video_path)]
    result = _run(command)
    return int(json.loads(result.stdout)["streams"][0]["nb_read_packets"])


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
