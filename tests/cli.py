"""Run the real CLI in a subprocess and look at what it wrote (the CLI end-to-end tests share these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def turbo_batch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m flows.cli ARGS` from the repository root, this process's environment plus `env`."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=600)


def ffprobe(path: Path) -> dict:
    """The first video stream: codec, profile, pixel format, size and the frames actually decoded."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=codec_name,profile,pix_fmt,width,height,nb_read_frames",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def mp4_mtimes(out: Path) -> dict[str, int]:
    """Modification times of a sink folder's videos, posters and previews (nothing rewritten?)."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".mp4", ".jpg", ".webp")}
