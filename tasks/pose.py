"""Pose stage (dance rows): reference image + driving video → aligned and negative poses.

    fetched image + driving_video ─ pose/extract.py (DWPose via rtmlib, SteadyDancer's alignment,
        rendering and negative poses) ─▶ work/poses.npz, poses-negative.npz, poses.json, pose.mp4

The generate stage renders the npz files at the generation size; the json and the rendered pose
video are uploaded beside the row's video. The stage needs no GPU: it runs inside the shard, or
on the CPU pool ahead of it (`pose_ahead`, from the batch flow). Either way its outputs are kept
in the sink under `poses/<pose key>/`, keyed by the inputs' content and the pose settings, so the
shard that takes the row, or a later run, downloads them instead of extracting again.

The detector (two ONNX files under `TURBO_POSE_DIR`, default `$CHECKPOINTS_DIR/dwpose`) is loaded
once per `PoseStage`, which its owner (the row runner, the batch flow) keeps.
A person missing from the reference or from the driving frames is the row's bad input.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import InputError, retry_transient
from tasks.manifest import ManifestRow
from tasks.upload import Sink, file_sha256

__all__ = ["PoseOutput", "PoseSettings", "PoseStage", "pose", "pose_ahead", "pose_key", "run_pose", "run_pose_ahead"]

POSE_FILES = {"poses": "poses.npz", "negative_poses": "poses-negative.npz", "pose_json": "poses.json",
              "pose_video": "pose.mp4"}

POSE_VERSION = 1          # bump when the stage's output for the same inputs changes (row identity)


@dataclass(frozen=True)
class PoseSettings:
    folder: Path                  # yolox_l.onnx and dw-ll_ucoco_384.onnx
    device: str = "cpu"           # cpu | cuda (onnxruntime's CUDA provider when installed)
    max_source_seconds: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, checkpoints_dir: str | Path | None = None) -> PoseSettings:
        root = Path(checkpoints_dir or env.get("CHECKPOINTS_DIR") or "checkpoints")
        folder = Path(env["TURBO_POSE_DIR"]) if env.get("TURBO_POSE_DIR") else root / "dwpose"
        seconds = float(env.get("TURBO_POSE_MAX_SOURCE_S") or 600.0)
        return cls(folder=folder, device=(env.get("TURBO_POSE_DEVICE") or "cpu").lower(),
                   max_source_seconds=seconds)


@dataclass
class PoseOutput:
    files: dict[str, Path]               # poses, negative_poses (npz), pose_json, pose_video
    pose_frames: int
    pose_fps: float
    t_pose_s: float
    warnings: list[str] = field(default_factory=list)
    reused: bool = False                 # downloaded from the sink's pose store, not extracted here

    @property
    def extras(self) -> dict[str, str]:
        """The files uploaded beside the video, by the extension they get there."""
        return {".pose.mp4": str(self.files["pose_video"]), ".pose.json": str(self.files["pose_json"]),
                ".pose.npz": str(self.files["poses"])}


@dataclass
class PoseStage:
    settings: PoseSettings
    _detector: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def detector(self):
        with self._lock:          # the batch flow runs several rows' pose tasks at once
            if self._detector is None:
                from pose.detector import DWPose
                self._detector = DWPose.from_folder(self.settings.folder, device=self.settings.device)
            return self._detector


def generation_size(row: ManifestRow, image: Path) -> tuple[int, int]:
    """The size generate will use for this row (engine/dance.py's rule), known before any GPU work."""
    from PIL import Image

    from engine.config import WanConfig
    from engine.dance import dance_size
    preset = WanConfig.from_name(row.model).size(row.resolution, row.aspect_ratio)
    with Image.open(image) as opened:
        from PIL import ImageOps
        size = ImageOps.exif_transpose(opened).size
    return dance_size(preset[0] * preset[1], size)


def pose_key(row: ManifestRow, digests: Mapping[str, str]) -> str:
    """What the stage's output depends on: the two inputs' content, the size and frame count it
    works at, the settings and the seed (negative poses), and the stage's version."""
    payload = {"image": digests.get("image"), "driving_video": digests.get("driving_video"),
               "model": row.model, "resolution": row.resolution, "aspect_ratio": row.aspect_ratio,
               "num_frames": row.num_frames, "fill": row.fill, "align_frame": row.align_frame, "seed": row.seed,
               "version": POSE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def run_pose(row: ManifestRow, work: Path, inputs: Mapping[str, Path], stage: PoseStage, *,
             sink: Sink | None = None, digests: Mapping[str, str] | None = None) -> PoseOutput:
    """The row's poses: from the sink's pose store when there (with `sink` and the inputs'
    `digests`), else extracted here and stored there."""
    key = pose_key(row, digests) if sink is not None and digests else None
    if key is not None:
        stored = _load(sink, key, work)      # type: ignore[arg-type]
        if stored is not None:
            return stored
    out = _extract(row, work, inputs, stage)
    if key is not None:
        _store(sink, key, out)               # type: ignore[arg-type]
    return out


def run_pose_ahead(row: ManifestRow, stage: PoseStage, sink: Sink, fetch_settings: object) -> str:
    """On the CPU pool, before the GPU takes the row: fetch its inputs, extract, store in the sink.
    A bad input is only logged here: the shard answers it as the row's error."""
    from tasks.fetch import run_fetch
    work = Path(tempfile.mkdtemp(prefix=f"turbo-pose-{row.id}-"))
    try:
        inputs = run_fetch(row, work, fetch_settings)    # type: ignore[arg-type]
        out = run_pose(row, work / "pose", inputs.files, stage, sink=sink, digests=inputs.digests)
        return "stored" if not out.reused else "already stored"
    except InputError as e:
        return f"bad input (the shard reports it): {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(row: ManifestRow, work: Path, inputs: Mapping[str, Path], stage: PoseStage) -> PoseOutput:
    from pose.errors import PoseInputError
    from pose.extract import extract_poses
    t0 = time.perf_counter()
    width, height = generation_size(row, inputs["image"])
    try:
        result = extract_poses(inputs["image"], inputs["driving_video"], stage.detector(), width=width,
                               height=height, num_frames=row.num_frames, fill=row.fill,
                               align_frame=row.align_frame, seed=row.seed, render_negative=False)
    except PoseInputError as e:       # str(e) is "column: reason (frames …)"; the row error says the column
        reason = str(e).removeprefix(f"{e.column}: ")
        raise InputError(reason, row=row.row, column=e.column, uri=getattr(row, e.column, None)) from e
    work.mkdir(parents=True, exist_ok=True)
    files = {role: work / name for role, name in POSE_FILES.items()}
    result.aligned.save_npz(files["poses"])
    result.negative.save_npz(files["negative_poses"])
    result.aligned.save_json(files["pose_json"])
    _encode(result.positive_frames, files["pose_video"], fps=int(result.pose_fps))
    return PoseOutput(files=files, pose_frames=result.pose_frames, pose_fps=result.pose_fps,
                      t_pose_s=time.perf_counter() - t0, warnings=result.warnings)


def _store(sink: Sink, key: str, out: PoseOutput) -> None:
    """The files, then a record naming them with size and sha256 (its presence = complete)."""
    entries = {}
    for role, path in out.files.items():
        # A cache keyed by content: a damaged or half-written entry is simply replaced.
        sink.put(path, f"poses/{key}/{path.name}", overwrite=True)
        entries[role] = {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    record = {"files": entries, "pose_frames": out.pose_frames, "pose_fps": out.pose_fps, "warnings": out.warnings}
    record_path = out.files["poses"].parent / "record.json"
    record_path.write_text(json.dumps(record, sort_keys=True))
    sink.put(record_path, f"poses/{key}/record.json", content_type="application/json", overwrite=True)


def _load(sink: Sink, key: str, work: Path) -> PoseOutput | None:
    """The stored poses, or None when absent or damaged (they are then extracted again)."""
    t0 = time.perf_counter()
    raw = sink.read_bytes(f"poses/{key}/record.json", missing_ok=True)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        work.mkdir(parents=True, exist_ok=True)
        files = {}
        for role, entry in record["files"].items():
            data = sink.read_bytes(f"poses/{key}/{entry['name']}", missing_ok=True)
            if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return None
            files[role] = work / entry["name"]
            files[role].write_bytes(data)
        return PoseOutput(files=files, pose_frames=int(record["pose_frames"]), pose_fps=float(record["pose_fps"]),
                          t_pose_s=time.perf_counter() - t0, warnings=list(record.get("warnings", [])),
                          reused=True)
    except (ValueError, KeyError, TypeError):
        return None


def _encode(frames: np.ndarray, path: Path, fps: int) -> None:
    """The rendered poses as H.264 (for people to look at; generation reads the npz)."""
    n, h, w, _ = frames.shape
    h2, w2 = h - h % 2, w - w % 2
    argv = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w2}x{h2}",
            "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23",
            "-movflags", "+faststart", f"file:{path}"]
    raw = np.ascontiguousarray(frames[:, :h2, :w2]).tobytes()
    subprocess.run(argv, input=raw, check=True, capture_output=True, timeout=60 + n)


# Decoding and ONNX inference do not get better by repeating; a bad input is the row's. The sink
# reads and writes are what can fail transiently.
pose = task(name="pose", task_run_name="pose-{row.id}", cache_policy=NO_CACHE, retries=1,
            retry_delay_seconds=[2], retry_condition_fn=retry_transient)(run_pose)
pose_ahead = task(name="pose-ahead", task_run_name="pose-ahead-{row.id}", cache_policy=NO_CACHE, retries=1,
                  retry_delay_seconds=[2], retry_condition_fn=retry_transient)(run_pose_ahead)

