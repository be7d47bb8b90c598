"""Pose stage (dance rows): reference image + driving video → aligned and negative poses.

    fetched image + driving_video ─ pose/extract.py (DWPose via rtmlib, SteadyDancer's alignment,
        rendering and negative poses) ─▶ work/poses.npz, poses-negative.npz, poses.json, pose.mp4

The generate stage renders the npz files at the generation size; the json and the rendered pose
video are uploaded beside the row's video. The stage needs no GPU: it runs inside the shard, or
on a CPU pool ahead of it. The detector (two ONNX files under `TURBO_POSE_DIR`, default
`$CHECKPOINTS_DIR/dwpose`) is loaded once per `PoseStage`, which its owner (the row runner) keeps.
A person missing from the reference or from the driving frames is the row's bad input.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import InputError
from tasks.manifest import ManifestRow

__all__ = ["PoseOutput", "PoseSettings", "PoseStage", "pose", "run_pose"]

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

    @property
    def extras(self) -> dict[str, str]:
        """The files uploaded beside the video, by the extension they get there."""
        return {".pose.mp4": str(self.files["pose_video"]), ".pose.json": str(self.files["pose_json"]),
                ".pose.npz": str(self.files["poses"])}


@dataclass
class PoseStage:
    settings: PoseSettings
    _detector: object = None

    def detector(self):
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


def run_pose(row: ManifestRow, work: Path, inputs: Mapping[str, Path], stage: PoseStage) -> PoseOutput:
    from pose.errors import PoseInputError
    from pose.extract import extract_poses
    t0 = time.perf_counter()
    width, height = generation_size(row, inputs["image"])
    try:
        result = extract_poses(inputs["image"], inputs["driving_video"], stage.detector(), width=width,
                               height=height, num_frames=row.num_frames, fill=row.fill,
                               align_frame=row.align_frame, seed=row.seed)
    except PoseInputError as e:       # str(e) is "column: reason (frames …)"; the row error says the column
        reason = str(e).removeprefix(f"{e.column}: ")
        raise InputError(reason, row=row.row, column=e.column, uri=getattr(row, e.column, None)) from e
    work.mkdir(parents=True, exist_ok=True)
    files = {"poses": work / "poses.npz", "negative_poses": work / "poses-negative.npz",
             "pose_json": work / "poses.json", "pose_video": work / "pose.mp4"}
    result.aligned.save_npz(files["poses"])
    result.negative.save_npz(files["negative_poses"])
    result.aligned.save_json(files["pose_json"])
    _encode(result.positive_frames, files["pose_video"], fps=int(result.pose_fps))
    return PoseOutput(files=files, pose_frames=result.pose_frames, pose_fps=result.pose_fps,
                      t_pose_s=time.perf_counter() - t0, warnings=result.warnings)


def _encode(frames: np.ndarray, path: Path, fps: int) -> None:
    """The rendered poses as H.264 (for people to look at; generation reads the npz)."""
    n, h, w, _ = frames.shape
    h2, w2 = h - h % 2, w - w % 2
    argv = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w2}x{h2}",
            "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23",
            "-movflags", "+faststart", f"file:{path}"]
    raw = np.ascontiguousarray(frames[:, :h2, :w2]).tobytes()
    subprocess.run(argv, input=raw, check=True, capture_output=True, timeout=60 + n)


# Decoding and ONNX inference do not get better by repeating; a bad input is the row's.
pose = task(name="pose", task_run_name="pose-{row.id}", cache_policy=NO_CACHE)(run_pose)

