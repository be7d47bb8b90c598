"""The pose stage in one call: reference image + driving video → aligned, negative and rendered poses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from engine.errors import RequestError
from pose.align import align_poses
from pose.detector import DWPose
from pose.errors import PoseInputError
from pose.keypoints import NECK, PoseFrame, PoseSequence
from pose.negative import negative_poses
from pose.render import POSE_CANVAS_SCALE, render_sequence
from pose.video import read_driving_video

__all__ = ["PoseResult", "extract_poses"]

_FRAMES_LISTED = 20


@dataclass(eq=False)
class PoseResult:
    """`driving`: detected poses in the driving video's pixels (frames without a person filled from the
    nearest one); `aligned`/`negative`: in the generation size's pixels; `*_frames`: uint8 [F, 2H, 2W, 3]
    RGB renders. `timings` in seconds: decode_s, detect_s, align_s (with the negatives), render_s."""

    driving: PoseSequence
    aligned: PoseSequence
    negative: PoseSequence
    positive_frames: np.ndarray
    negative_frames: np.ndarray
    pose_frames: int
    pose_fps: float
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def extract_poses(reference_image: Path, driving_video: Path, detector: DWPose, *, width: int, height: int,
                  num_frames: int = 81, fps: float = 16, fill: str = "error", align_frame: int = 0,
                  seed: int = 0, render_negative: bool = True) -> PoseResult:
    """SteadyDancer's preprocessing for one row. `width` × `height` is the generation size: the reference
    is resized to it, the poses are aligned in it and drawn at POSE_CANVAS_SCALE × it."""
    if not 0 <= align_frame < num_frames:
        raise RequestError("align_frame", align_frame, f"a frame number from 0 to {num_frames - 1}")
    if width < 1 or height < 1:
        raise RequestError("width × height", (width, height), "a positive size")
    timings = dict.fromkeys(("decode_s", "detect_s", "align_s", "render_s"), 0.0)
    warnings: list[str] = []

    # The reference first: a row without a usable person fails before the video is decoded.
    with _timed(timings, "decode_s"):
        reference_rgb = _load_reference(Path(reference_image), width, height)
    with _timed(timings, "detect_s"):
        reference = detector.detect(reference_rgb)
    if reference is None:
        raise PoseInputError("image", "no person found in the reference image")
    if not reference.valid()[NECK]:
        raise PoseInputError("image", "the reference person's shoulders are not both visible, so the driving "
                                      "poses cannot be aligned to it")

    with _timed(timings, "decode_s"):
        video = read_driving_video(driving_video, fps=fps, num_frames=num_frames, fill=fill)
    decoded = num_frames - video.filled
    if video.filled:
        warnings.append(f"the driving video has {decoded} frames at {fps:g} fps; {video.filled} more were "
                        f"filled by fill={fill}")
    with _timed(timings, "detect_s"):
        # Repeated frames (fill) are detected once: a frame's pose is its source frame's.
        unique = detector.detect_many(video.frames[:decoded])
    wanted = np.arange(num_frames)
    source = wanted % decoded if fill == "loop" else np.minimum(wanted, decoded - 1)
    frame_h, frame_w = video.frames.shape[1:3]
    driving = PoseSequence.from_frames(_fill_missing([unique[i] for i in source], align_frame, warnings),
                                       frame_w, frame_h, video.fps)

    with _timed(timings, "align_s"):
        aligned = align_poses(reference, (width, height), driving, align_frame)
        negative = negative_poses(aligned, seed)
    with _timed(timings, "render_s"):
        canvas_w, canvas_h = POSE_CANVAS_SCALE * width, POSE_CANVAS_SCALE * height
        positive_frames = render_sequence(aligned, canvas_w, canvas_h)
        # The generate stage draws from the keypoints itself; a caller that only shows the
        # positive poses skips drawing the negatives (`negative_frames` is then empty).
        negative_frames = (render_sequence(negative, canvas_w, canvas_h) if render_negative
                           else np.zeros((0, canvas_h, canvas_w, 3), np.uint8))

    return PoseResult(driving=driving, aligned=aligned, negative=negative, positive_frames=positive_frames,
                      negative_frames=negative_frames, pose_frames=num_frames, pose_fps=video.fps,
                      timings=timings, warnings=warnings)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to timings[key]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] += time.perf_counter() - started


def _load_reference(path: Path, width: int, height: int) -> np.ndarray:
    """RGB uint8 at width × height (EXIF orientation applied, as cv2.imread does for SteadyDancer)."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PoseInputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)


def _fill_missing(found: list[PoseFrame | None], align_frame: int, warnings: list[str]) -> list[PoseFrame]:
    """Frames without a person take the nearest frame's pose (the earlier one on a tie); refused when
    the align frame or more than half of the frames have nobody."""
    poses = {index: frame for index, frame in enumerate(found) if frame is not None}
    missing = [index for index in range(len(found)) if index not in poses]
    if align_frame in missing:
        raise PoseInputError("driving_video", f"no person in frame {align_frame}, the frame the poses are aligned "
                                              f"on (align_frame); no person in {len(missing)} of {len(found)} frames",
                             frames=missing)
    if 2 * len(missing) > len(found):
        raise PoseInputError("driving_video", f"no person in {len(missing)} of {len(found)} frames (more than half)",
                             frames=missing)
    if not poses[align_frame].valid()[NECK]:
        raise PoseInputError("driving_video", f"frame {align_frame} (align_frame): the person's shoulders are not "
                                              f"both visible, so the poses cannot be aligned", frames=[align_frame])
    if missing:
        listed = ", ".join(str(i) for i in missing[:_FRAMES_LISTED]) + (", …" if len(missing) > _FRAMES_LISTED else "")
        warnings.append(f"no person in {len(missing)} of {len(found)} driving frames ({listed}); each took the "
                        f"pose of the nearest frame with one")
    return [poses[min(poses, key=lambda p: (abs(p - index), p))] for index in range(len(found))]
