"""DWPose (YOLOX-L person detector + DWPose-L wholebody SimCC model) on onnxruntime, through rtmlib.

rtmlib's `YOLOX` and `RTMPose` classes do the pre- and post-processing (letterbox to 640×640,
NMS, the 1.25-padded 288×384 affine crop, SimCC decoding, COCO-WholeBody → OpenPose order with
the neck). What this module adds, to give what SteadyDancer's mmdet/mmpose DWPose gives:

- only COCO class 0 (person) boxes, score > 0.5 after NMS at IoU 0.65 (mmdet's YOLOX test config
  and SteadyDancer's filter; rtmlib's "human" mode keeps every class of an 80-class model);
- the most significant person is the highest-scoring box, as SteadyDancer draws `subset[:1]`;
- keypoint score = the smaller of the two SimCC axis maxima (mmpose; rtmlib 0.0.16 averages them);
- neck score 1 when both shoulders score > 0.3, else 0 (DWPose; rtmlib takes the smaller score).

rtmlib is installed without its dependencies (it declares the GUI OpenCV builds): see .ci/install.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BackendUnavailableError, RequestError
from pose.errors import PoseModelError
from pose.keypoints import NECK, PoseFrame

__all__ = ["DETECTOR_FILE", "DETECTOR_INPUT_SIZE", "POSE_FILE", "POSE_INPUT_SIZE", "DWPose"]

logger = logging.getLogger(__name__)

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DETECTOR_INPUT_SIZE = (640, 640)   # (H, W), letterboxed
POSE_INPUT_SIZE = (288, 384)       # (W, H), as rtmlib takes it
PERSON_SCORE_THRESHOLD = 0.5
NMS_IOU_THRESHOLD = 0.65
NECK_SHOULDER_THRESHOLD = 0.3
_RIGHT_SHOULDER, _LEFT_SHOULDER = 2, 5   # OpenPose order


class DWPose:
    """One person's 134 OpenPose-order keypoints per RGB image; build it with `from_folder`."""

    def __init__(self, detector: Any, pose: Any, device: str):
        self._detector, self._pose, self.device = detector, pose, device

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> DWPose:
        """Load `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` from `folder` (never downloads). `device` "cuda"
        (or "cuda:N") uses onnxruntime's CUDAExecutionProvider when it is available, else the CPU."""
        folder = Path(folder)
        missing = [name for name in (DETECTOR_FILE, POSE_FILE) if not (folder / name).is_file()]
        if missing:
            raise PoseModelError(folder, missing)
        rtmlib = _import_rtmlib()
        provider = _onnx_device(device)
        # rtmlib prints a "load ... with onnxruntime backend" line per model; keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            detector = rtmlib.YOLOX(str(folder / DETECTOR_FILE), model_input_size=DETECTOR_INPUT_SIZE,
                                    det_mode="multiclass", nms_thr=NMS_IOU_THRESHOLD,
                                    score_thr=PERSON_SCORE_THRESHOLD, backend="onnxruntime", device=provider)
            pose = rtmlib.RTMPose(str(folder / POSE_FILE), model_input_size=POSE_INPUT_SIZE, to_openpose=False,
                                  backend="onnxruntime", device=provider)
        if detector.session.get_outputs()[0].shape[-1] == 5:
            detector.det_mode = "human"   # an export with NMS inside: [1, N, 5] boxes, no class output
        return cls(detector, pose, provider)

    def detect(self, image_rgb: np.ndarray) -> PoseFrame | None:
        """The most significant person in an RGB uint8 [H, W, 3] image, in its pixels; None if nobody.

        RGB goes in as is: DWPose's own ONNX pipeline feeds RGB (rtmlib's examples pass BGR frames)."""
        image = np.ascontiguousarray(image_rgb)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
        boxes = self._person_boxes(image)
        if len(boxes) == 0:
            return None
        return self._keypoints(image, boxes[0])

    def detect_many(self, frames: Iterable[np.ndarray]) -> list[PoseFrame | None]:
        return [self.detect(frame) for frame in frames]

    def _person_boxes(self, image: np.ndarray) -> np.ndarray:
        """xyxy person boxes, highest score first (NMS keeps each class's boxes in score order)."""
        result = self._detector(image)
        if self._detector.det_mode == "human":
            return np.asarray(result).reshape(-1, 4)
        boxes, classes = result
        boxes = np.asarray(boxes).reshape(-1, 4)
        return boxes[np.asarray(classes).reshape(-1) == 0]

    def _keypoints(self, image: np.ndarray, box: np.ndarray) -> PoseFrame:
        from rtmlib.tools.pose_estimation.post_processings import convert_coco_to_openpose

        crop, center, scale = self._pose.preprocess(image, box)
        simcc_x, simcc_y = self._pose.inference(crop)
        keypoints, _ = self._pose.postprocess([simcc_x, simcc_y], center, scale)
        scores = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1))   # mmpose's get_simcc_maximum
        keypoints, scores = convert_coco_to_openpose(keypoints, scores)
        keypoints, scores = keypoints[0], scores[0].copy()
        shoulders = scores[[_RIGHT_SHOULDER, _LEFT_SHOULDER]]
        scores[NECK] = float(bool((shoulders > NECK_SHOULDER_THRESHOLD).all()))
        return PoseFrame(keypoints, scores)


def _import_rtmlib() -> Any:
    try:
        import rtmlib
    except ImportError as exc:
        raise BackendUnavailableError(
            f"rtmlib is not installed ({exc}): pip install --no-deps rtmlib==0.0.16 opencv-python-headless "
            "onnxruntime tqdm (see .ci/install)") from None
    return rtmlib


def _onnx_device(device: str) -> str:
    """rtmlib's device name for onnxruntime: "cuda"/"cuda:N" when CUDA is usable, else "cpu"."""
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise RequestError("device", device, "cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return device
    logger.warning("DWPose: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); using the CPU")
    return "cpu"
