"""The pose stage's errors: a bad input (reference image or driving video) and missing ONNX files.

    TurboBatchError
    ├── PoseInputError      the reference image or the driving video cannot give poses (permanent)
    └── EngineError
        └── CheckpointError
            └── PoseModelError   the DWPose ONNX files are not in the model folder
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.errors import CheckpointError, TurboBatchError

__all__ = ["PoseInputError", "PoseModelError"]

# How many frame numbers a message lists before it says "…".
_FRAMES_SHOWN = 20


class PoseInputError(TurboBatchError):
    """A reference image or driving video the pose stage cannot use; names the manifest column."""

    def __init__(self, column: str, reason: str, frames: list[int] | None = None):
        self.column, self.reason, self.frames = column, reason, list(frames) if frames else None
        message = f"{column}: {reason}"
        if self.frames:
            shown = ", ".join(str(f) for f in self.frames[:_FRAMES_SHOWN])
            more = ", …" if len(self.frames) > _FRAMES_SHOWN else ""
            message += f" (frames {shown}{more})"
        super().__init__(message)


class PoseModelError(CheckpointError):
    """DWPose ONNX files missing from the model folder; names every missing file and the folder."""

    def __init__(self, folder: str | Path, missing: Sequence[str]):
        files = ", ".join(missing)
        # CheckpointError's `missing=` is worded as state-dict keys; these are files, so they go in the reason.
        super().__init__(folder, f"DWPose ONNX model file(s) not found in this folder: {files} "
                                 f"(the ONNX exports from huggingface.co/yzd-v/DWPose)")
        self.folder = str(folder)
        self.missing = list(missing)
