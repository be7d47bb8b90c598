"""Pose keypoints in DWPose's OpenPose order: one frame (`PoseFrame`) or a clip (`PoseSequence`).

134 points per person, in pixels of the frame they were found in (x right, y down):
COCO-WholeBody's 133 with a neck (the mean of the shoulders) inserted at index 1 and the body
permuted to OpenPose's COCO-18 order, as DWPose, SteadyDancer and rtmlib's `to_openpose` do:

    [0:18]    body: nose, neck, R shoulder, R elbow, R wrist, L shoulder, L elbow, L wrist,
              R hip, R knee, R ankle, L hip, L knee, L ankle, R eye, L eye, R ear, L ear
    [18:24]   feet (L big toe, L small toe, L heel, R big toe, R small toe, R heel)
    [24:92]   face, 68 points
    [92:113]  left hand, 21 points (wrist, then 4 per finger from the thumb)
    [113:134] right hand

Left and right are the person's own. A point counts only where its score is above
SCORE_THRESHOLD (SteadyDancer's 0.35) and its coordinates are finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BODY", "BODY_NAMES", "FACE", "FEET", "LEFT_HAND", "NECK", "NUM_KEYPOINTS", "RIGHT_HAND",
           "SCORE_THRESHOLD", "PoseFrame", "PoseSequence", "valid_mask"]

NUM_KEYPOINTS = 134
NECK = 1
BODY, FEET, FACE = slice(0, 18), slice(18, 24), slice(24, 92)
LEFT_HAND, RIGHT_HAND = slice(92, 113), slice(113, 134)
BODY_NAMES = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
              "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
              "right_eye", "left_eye", "right_ear", "left_ear")
# SteadyDancer keeps a point when its score is > 0.35 (controlnet-aux and easy-dwpose use 0.3).
SCORE_THRESHOLD = 0.35

_NPZ_FORMAT = "turbo-batch-pose/1"
# OpenPose JSON names of the parts, in file order.
_JSON_PARTS = (("pose_keypoints_2d", BODY), ("foot_keypoints_2d", FEET), ("face_keypoints_2d", FACE),
               ("hand_left_keypoints_2d", LEFT_HAND), ("hand_right_keypoints_2d", RIGHT_HAND))


def valid_mask(keypoints: np.ndarray, scores: np.ndarray, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """True where a point counts: score above the threshold and finite coordinates (any leading shape)."""
    return (scores > threshold) & np.isfinite(keypoints).all(axis=-1)


@dataclass(frozen=True, eq=False)
class PoseFrame:
    """One person's 134 keypoints (float32 [134, 2], pixels) and scores (float32 [134])."""

    keypoints: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "keypoints", _as_float32(self.keypoints, (NUM_KEYPOINTS, 2), "keypoints"))
        object.__setattr__(self, "scores", _as_float32(self.scores, (NUM_KEYPOINTS,), "scores"))

    def valid(self, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
        return valid_mask(self.keypoints, self.scores, threshold)


@dataclass(frozen=True, eq=False)
class PoseSequence:
    """One person per frame: keypoints float32 [F, 134, 2] in pixels of a width × height frame, scores [F, 134]."""

    keypoints: np.ndarray
    scores: np.ndarray
    width: int
    height: int
    fps: float

    def __post_init__(self) -> None:
        frames = np.shape(self.keypoints)[0] if np.ndim(self.keypoints) == 3 else -1
        object.__setattr__(self, "keypoints", _as_float32(self.keypoints, (frames, NUM_KEYPOINTS, 2), "keypoints"))
        object.__setattr__(self, "scores", _as_float32(self.scores, (frames, NUM_KEYPOINTS), "scores"))

    @classmethod
    def from_frames(cls, frames: list[PoseFrame], width: int, height: int, fps: float) -> PoseSequence:
        keypoints = np.stack([f.keypoints for f in frames]) if frames else np.zeros((0, NUM_KEYPOINTS, 2))
        scores = np.stack([f.scores for f in frames]) if frames else np.zeros((0, NUM_KEYPOINTS))
        return cls(keypoints, scores, width, height, fps)

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def frame(self, index: int) -> PoseFrame:
        return PoseFrame(self.keypoints[index], self.scores[index])

    def valid(self, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
        return valid_mask(self.keypoints, self.scores, threshold)

    def save_npz(self, path: str | Path) -> None:
        """keypoints, scores, width, height, fps and a format tag; read back with `load_npz`."""
        np.savez_compressed(path, format=np.array(_NPZ_FORMAT), keypoints=self.keypoints, scores=self.scores,
                            width=np.array(self.width), height=np.array(self.height), fps=np.array(self.fps))

    @classmethod
    def load_npz(cls, path: str | Path) -> PoseSequence:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != _NPZ_FORMAT:
                raise ValueError(f"{path}: not a {_NPZ_FORMAT} file (format {str(data['format'])!r})")
            return cls(data["keypoints"], data["scores"], int(data["width"]), int(data["height"]),
                       float(data["fps"]))

    def save_json(self, path: str | Path, threshold: float = SCORE_THRESHOLD) -> None:
        """OpenPose-style JSON (docs/POSE.md): per frame one person with flat [x, y, score, ...] lists per
        part, in pixels; a point that does not count is written 0, 0, 0 as OpenPose writes it."""
        valid = self.valid(threshold)
        frames = []
        for index in range(len(self)):
            person = {}
            for name, part in _JSON_PARTS:
                values: list[float] = []
                for (x, y), score, ok in zip(self.keypoints[index, part], self.scores[index, part], valid[index, part]):
                    values += [round(float(x), 2), round(float(y), 2), round(float(score), 4)] if ok else [0, 0, 0]
                person[name] = values
            frames.append({"frame": index, "people": [person]})
        document = {"format": "turbo-batch-pose-json/1", "layout": "openpose-coco18+feet+face68+hands21",
                    "width": self.width, "height": self.height, "fps": self.fps,
                    "score_threshold": threshold, "frames": frames}
        Path(path).write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")


def _as_float32(array: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != len(shape) or any(want >= 0 and got != want for got, want in zip(array.shape, shape)):
        wanted = "×".join("F" if want < 0 else str(want) for want in shape)
        raise ValueError(f"{name} must have shape [{wanted}], got {list(array.shape)}")
    return array
