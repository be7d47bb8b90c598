"""ffmpeg/ffprobe are given local files only, never hang a row, and say why they failed.

Real ffmpeg on tiny clips; hung processes are simulated by a fake `ffmpeg`/`ffprobe` script put
first on PATH, with the timeouts lowered to ~1 s.
"""

from __future__ import annotations

import http.server
import os
import shlex
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

import tasks.inputs
import tasks.postprocess
import tasks.validate_video
from tasks.errors import InputError, PostprocessError, VideoValidationError
from tasks.inputs import check_audio, check_video
from tasks.postprocess import (
    FONT_PATH,
    WATERMARK_BOX_BORDER_PX,
    WATERMARK_MARGIN_PX,
    PostprocessRecipe,
    failure_reason,
    media_timeout_s,
    run_postprocess,
    watermark_font_size,
)
from tasks.validate_video import validate_video

FRAMES, HEIGHT, WIDTH = 13, 64, 112     # 13 x 21 KiB of rgb24: more than a pipe buffer holds
URL_REFERENCES = ["http://127.0.0.1:9/wm.png", "https://cdn.example.com/wm.png", "s3://bucket/wm.png",
                  "ftp://host/wm.png", "concat:/tmp/a.png|/tmp/b.png", "subfile,,start,0,end,99,,:/tmp/wm.png",
                  "file:/tmp/wm.png"]


def gradient(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red, green, blue = np.broadcast_arrays((x * 2 + t * 4) % 256, (y * 3 + t * 2) % 256, (x + y) + 0 * t)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


@pytest.fixture
def frames_path(tmp_path: Path) -> Path:
    path = tmp_path / "frames.npy"
    np.save(path, gradient())
    return path


def write_tone(path: Path, seconds: float = 1.0) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        samples = (8000 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * seconds)) / 16000)).astype("<i2")
        wav.writeframes(samples.tobytes())
    return path


def decode_frame0(video: Path) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(HEIGHT, WIDTH, 3).astype(np.float64)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server serving tone.wav and mark.png; yields (base URL, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    write_tone(root / "tone.wav")
    Image.new("RGBA", (16, 12), (0, 255, 0, 255)).save(root / "mark.png")
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


# ── 1. files only: no patterns, no URLs ─────────────────────────────────────────────────────────

def test_png_watermark_named_like_a_pattern_is_read_as_that_one_file(frames_path, tmp_path):
    Image.new("RGBA", (16, 12), (255, 0, 255, 255)).save(tmp_path / "wm%d.png")   # the one named
    Image.new("RGBA", (16, 12), (0, 255, 0, 255)).save(tmp_path / "wm1.png")      # what image2 reads
    out = run_postprocess(frames_path, PostprocessRecipe(watermark=str(tmp_path / "wm%d.png")), tmp_path / "o", "c")
    frame = decode_frame0(out.video_path)
    m = WATERMARK_MARGIN_PX
    box = frame[HEIGHT - 12 - m + 3: HEIGHT - m - 3, WIDTH - 16 - m + 3: WIDTH - m - 3]
    assert box[..., 0].mean() > 150 and box[..., 2].mean() > 150 and box[..., 1].mean() < 110, box.mean((0, 1))


def test_every_ffmpeg_input_and_output_is_an_absolute_file_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pp = tasks.postprocess
    recipe = PostprocessRecipe(watermark="wm.png")
    commands = [pp._encode_command(recipe, 64, 48, 64, 48, Path("clip.partial.mp4")),
                pp._audio_mux_command(Path("clip.mp4"), Path("a%d.wav"), Path("muxed.mp4")),
                pp._poster_command(Path("clip.mp4"), Path("clip.jpg"), 0.5),
                pp._preview_command(Path("clip.mp4"), Path("clip.webp"), 64)]
    for command in commands:
        text = shlex.join(command)
        starts = [i for i, arg in enumerate(command) if arg == "-i"]
        for previous, at in zip([-1, *starts], starts):
            value, options = command[at + 1], command[previous + 2: at]   # this input's own options
            if value == "pipe:":
                continue
            assert value.startswith(f"file:{tmp_path}/"), text
            assert "-protocol_whitelist file" in shlex.join(options), text
            assert "-f" in options or "-format_whitelist" in options, text   # never a free demuxer choice
        output = command[command.index("-hide_banner") - 1]
        assert output.startswith(f"file:{tmp_path}/"), text
    encode, mux = commands[0], commands[1]
    assert f"-f png_pipe -protocol_whitelist file -i file:{tmp_path}/wm.png" in shlex.join(encode)
    assert "image2" not in mux[mux.index("-format_whitelist") + 1]


def test_url_audio_is_refused_and_never_fetched(frames_path, tmp_path, http_server):
    base, requested = http_server
    with pytest.raises(PostprocessError) as info:
        run_postprocess(frames_path, PostprocessRecipe(audio=f"{base}/tone.wav"), tmp_path / "o", "c")
    assert "audio is a URL (http:...)" in str(info.value) and "local files only" in str(info.value)
    assert info.value.command == []           # refused before any ffmpeg ran
    assert requested == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("reference", URL_REFERENCES)
def test_url_watermark_is_refused(frames_path, tmp_path, reference):
    with pytest.raises(PostprocessError, match=r"watermark is a URL \(") as info:
        run_postprocess(frames_path, PostprocessRecipe(watermark=reference), tmp_path / "o", "c")
    assert info.value.command == []


def test_url_watermark_on_a_live_server_is_never_fetched(frames_path, tmp_path, http_server):
    base, requested = http_server
    with pytest.raises(PostprocessError, match="watermark is a URL"):
        run_postprocess(frames_path, PostprocessRecipe(watermark=f"{base}/mark.png"), tmp_path / "o", "c")
    assert requested == []


@pytest.mark.parametrize("reference", [*URL_REFERENCES, "http://127.0.0.1:9/clip.mp4"])
def test_validation_refuses_a_url(reference):
    with pytest.raises(VideoValidationError) as info:
        validate_video(reference, WIDTH, HEIGHT, FRAMES)
    assert info.value.check == "path"
    assert "is a URL (" in info.value.reason and "local files only" in info.value.reason


def test_input_probe_refuses_a_url_and_never_fetches(http_server):
    base, requested = http_server
    for check in (check_audio, check_video):
        with pytest.raises(InputError, match=r"is a URL \(http:\.\.\.\), not a local file"):
            check(f"{base}/tone.wav")
    assert requested == []


def test_input_probe_still_reads_local_files_with_odd_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tone(tmp_path / "tone%d 100%.wav")
    info = check_audio("tone%d 100%.wav")                      # relative, with pattern characters
    assert info["streams"][0]["codec_type"] == "audio"


# ── 2. timeouts: a hung ffmpeg/ffprobe is killed and fails the row ──────────────────────────────

FAKE = """#!/bin/sh
# A hung ffmpeg: ignores polite signals, starts a child, never reads stdin, never exits.
trap '' TERM INT HUP
echo $$ >> "$FAKE_PIDS"
sleep 3600 &
echo $! >> "$FAKE_PIDS"
wait
"""


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """install("ffmpeg") puts a hanging fake first on PATH; returns the file its pids go to."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    pids = tmp_path / "fake.pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def install(*names: str) -> Path:
        for name in names:
            script = bin_dir / name
            script.write_text(FAKE)
            script.chmod(0o755)
        return pids
    return install


def state_of(pid: int) -> str | None:
    """The process state letter (R, S, Z...) or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def assert_killed_and_reaped(pids_file: Path) -> None:
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) >= 2, pids
    fake, child = pids[0], pids[1]
    assert state_of(fake) is None            # killed AND reaped by us: not even a zombie
    deadline = time.monotonic() + 5
    while state_of(child) not in (None, "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state_of(child) in (None, "Z", "X"), f"the fake's child {child} still runs"   # the whole group


def test_hung_encoder_is_killed_and_fails_with_a_timeout(frames_path, tmp_path, fake_bin, monkeypatch):
    monkeypatch.setattr(tasks.postprocess, "FFMPEG_TIMEOUT_BASE_S", 1.0)
    monkeypatch.setattr(tasks.postprocess, "FFMPEG_TIMEOUT_PER_FRAME_S", 0.0)
    pids = fake_bin("ffmpeg")
    start = time.monotonic()
    with pytest.raises(PostprocessError) as info:
        run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "o", "c")
    assert time.monotonic() - start < 10
    assert str(info.value).startswith("ffmpeg timed out after 1 s (killed): ffmpeg ")
    assert info.value.command[0] == "ffmpeg" and "rawvideo" in info.value.command
    assert_killed_and_reaped(pids)
    assert not (tmp_path / "o" / "c.mp4").exists()


def test_hung_ffprobe_fails_the_stream_check_with_a_timeout(frames_path, tmp_path, fake_bin, monkeypatch):
    video = run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "o", "c").video_path
    monkeypatch.setattr(tasks.validate_video, "VALIDATE_TIMEOUT_BASE_S", 1.0)
    monkeypatch.setattr(tasks.validate_video, "VALIDATE_TIMEOUT_PER_FRAME_S", 0.0)
    pids = fake_bin("ffprobe")
    with pytest.raises(VideoValidationError) as info:
        validate_video(video, WIDTH, HEIGHT, FRAMES)
    assert info.value.check == "stream" and info.value.reason == "ffprobe timed out after 1 s (killed)"
    assert_killed_and_reaped(pids)


def test_hung_decoder_fails_the_decode_check_with_a_timeout(frames_path, tmp_path, fake_bin, monkeypatch):
    video = run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "o", "c").video_path
    monkeypatch.setattr(tasks.validate_video, "VALIDATE_TIMEOUT_BASE_S", 1.0)
    monkeypatch.setattr(tasks.validate_video, "VALIDATE_TIMEOUT_PER_FRAME_S", 0.0)
    pids = fake_bin("ffmpeg")                 # the real ffprobe still answers the stream check
    with pytest.raises(VideoValidationError) as info:
        validate_video(video, WIDTH, HEIGHT, FRAMES)
    assert info.value.check == "decode" and info.value.reason == "ffmpeg timed out after 1 s (killed)"
    assert_killed_and_reaped(pids)


def test_hung_input_probe_fails_with_a_timeout(tmp_path, fake_bin, monkeypatch):
    tone = write_tone(tmp_path / "tone.wav")
    monkeypatch.setattr(tasks.inputs, "FFPROBE_TIMEOUT_S", 1)
    monkeypatch.setattr(tasks.inputs, "FFPROBE_TIMEOUT_PER_GIB_S", 0)
    pids = fake_bin("ffprobe")
    start = time.monotonic()
    with pytest.raises(InputError, match=r"^ffprobe timed out after 1 s \(killed\)$"):
        check_audio(tone)
    assert time.monotonic() - start < 10
    assert_killed_and_reaped(pids)


def test_timeouts_scale_with_the_clip(frames_path, tmp_path, monkeypatch):
    assert media_timeout_s(81, 832, 480, 30.0, 1.0) == 30 + 81
    assert media_timeout_s(162, 832, 480, 30.0, 1.0) == 30 + 162
    assert media_timeout_s(81, 3840, 2160, 30.0, 1.0) > 30 + 81 * 8       # more pixels per frame: longer
    seen: list[float] = []
    real = tasks.postprocess.run_media_command

    def spy(command, timeout_s, **kwargs):
        seen.append(timeout_s)
        return real(command, timeout_s, **kwargs)

    monkeypatch.setattr(tasks.postprocess, "run_media_command", spy)
    run_postprocess(frames_path, PostprocessRecipe(interpolate_fps=32), tmp_path, "c")
    # every command of the row: base + 1 s per output frame (13 frames at 16 fps -> 26 at 32 fps)
    assert seen and set(seen) == {tasks.postprocess.FFMPEG_TIMEOUT_BASE_S + 26}


# ── 3. the error text leads with ffmpeg's reason ───────────────────────────────────────────────

def test_error_message_leads_with_ffmpegs_reason_then_the_command(frames_path, tmp_path):
    missing = tmp_path / "no-such-mark.png"
    with pytest.raises(PostprocessError) as info:
        run_postprocess(frames_path, PostprocessRecipe(watermark=str(missing)), tmp_path / "o", "c")
    text, error = str(info.value), info.value
    first_line = text.splitlines()[0]
    assert first_line.startswith(f"ffmpeg failed: file:{missing}: No such file or directory: ffmpeg ")
    assert text.index("No such file") < text.index(shlex.join(error.command)) < text.index("--- stderr (tail) ---")
    assert error.command[0] == "ffmpeg" and "No such file" in error.stderr_tail
    assert error.reason == f"ffmpeg failed: file:{missing}: No such file or directory"


def test_failure_reason_skips_ffmpegs_follow_up_lines():
    stderr = ("[AVFilterGraph @ 0x5609b5612a40] No such filter: 'nosuchfilter'\n"
              "Error reinitializing filters!\n"
              "Failed to inject frame into filter network: Invalid argument\n"
              "Error while processing the decoded data for stream #0:0\n"
              "Conversion failed!\n")
    assert failure_reason("ffmpeg", 1, stderr) == "ffmpeg failed: [AVFilterGraph] No such filter: 'nosuchfilter'"
    assert failure_reason("ffprobe", 1, "\n\n") == "ffprobe failed with exit code 1 and no error output"
    assert failure_reason("ffmpeg", -9, "") == "ffmpeg was killed by SIGKILL"


# ── 4. a text watermark is never clipped ───────────────────────────────────────────────────────

LONG_TEXT = "AI generated by turbo-batch, row 17"


def test_long_text_watermark_fits_inside_the_frame(frames_path, tmp_path):
    plain = decode_frame0(run_postprocess(frames_path, PostprocessRecipe(), tmp_path / "p", "c").video_path)
    marked = decode_frame0(run_postprocess(frames_path, PostprocessRecipe(watermark=LONG_TEXT),
                                           tmp_path / "m", "c").video_path)
    diff = np.abs(marked - plain).mean(axis=-1)
    # the box starts at least the margin in from the left edge: the leftmost columns are untouched
    assert diff[:, :8].mean() < 2.0, diff[:, :8].mean()
    assert diff[HEIGHT // 2:, WIDTH // 2:].mean() > 10                # and the watermark is there


def test_font_size_fits_the_width_and_never_exceeds_the_height_based_size():
    size = watermark_font_size(LONG_TEXT, WIDTH, HEIGHT)
    font = ImageFont.truetype(str(FONT_PATH), size)
    assert 1 <= size < 12
    assert font.getlength(LONG_TEXT) + 2 * WATERMARK_BOX_BORDER_PX <= WIDTH - 2 * WATERMARK_MARGIN_PX
    assert watermark_font_size("AI generated", 832, 480) == 20           # short text: today's size
    assert watermark_font_size("AI generated", 1664, 960) == 40
    assert watermark_font_size("x", 64, 48) == 12
    with pytest.raises(PostprocessError, match="does not fit"):
        watermark_font_size("W" * 200, WIDTH, HEIGHT)
