"""DWPose through the real rtmlib + onnxruntime path, on ONNX stand-ins with the real signatures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.errors import CheckpointError, RequestError
from pose.detector import DWPose
from pose.errors import PoseModelError
from pose.keypoints import PoseFrame
from pose.video import read_driving_video
from tests.pose.graphs import SCORES, bright_box, expected_coco, person_image, write_dwpose_stand_ins

# OpenPose index → COCO-WholeBody index, written out by name (neck is computed, not a COCO point).
OPENPOSE_FROM_COCO = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                      14: 2, 15: 1, 16: 4, 17: 3}
OPENPOSE_FROM_COCO |= {op: op - 1 for op in range(18, 134)}   # feet, face, hands: COCO 17.. shifted by the neck


def _expected_openpose(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    coco = expected_coco(box)
    keypoints, scores = np.zeros((134, 2), np.float32), np.zeros(134, np.float32)
    for op, index in OPENPOSE_FROM_COCO.items():
        keypoints[op], scores[op] = coco[index], SCORES[index]
    keypoints[1], scores[1] = (coco[5] + coco[6]) / 2, 1.0
    return keypoints, scores


def test_stand_ins_have_the_real_signatures(stand_in_folder: Path) -> None:
    det = onnx.load(str(stand_in_folder / "yolox_l.onnx")).graph
    pose = onnx.load(str(stand_in_folder / "dw-ll_ucoco_384.onnx")).graph

    def dims(value: onnx.ValueInfoProto) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [dims(v) for v in det.input] == [[1, 3, 640, 640]] and [dims(v) for v in det.output] == [[1, 8400, 85]]
    assert [dims(v) for v in pose.input] == [[1, 3, 384, 288]]
    assert {v.name: dims(v) for v in pose.output} == {"simcc_x": [1, 133, 576], "simcc_y": [1, 133, 768]}


def test_keypoints_land_on_the_person_in_openpose_order_with_the_neck(detector: DWPose) -> None:
    box = (60, 40, 139, 239)
    frame = detector.detect(person_image(200, 300, box))
    assert isinstance(frame, PoseFrame)
    keypoints, scores = _expected_openpose(box)
    np.testing.assert_allclose(frame.keypoints, keypoints, atol=1.0)
    np.testing.assert_allclose(frame.scores, scores, atol=1e-3)   # each score names its COCO point
    assert frame.keypoints[1] == pytest.approx((frame.keypoints[2] + frame.keypoints[5]) / 2, abs=1e-4)
    assert frame.keypoints[2][0] < frame.keypoints[5][0]          # the person's right shoulder is on image left
    assert not frame.valid()[16] and frame.valid()[17]             # the stand-in's right ear scores 0.2


def test_nobody_in_a_black_image(detector: DWPose) -> None:
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) is None


def test_keypoints_follow_the_moving_square(detector: DWPose, driving_video: Path) -> None:
    frames = read_driving_video(driving_video, num_frames=32).frames
    poses = detector.detect_many(frames)
    noses = []
    for frame, pose in zip(frames, poses):
        assert pose is not None
        keypoints, _ = _expected_openpose(bright_box(frame))
        np.testing.assert_allclose(pose.keypoints[:18], keypoints[:18], atol=1.5)
        noses.append(pose.keypoints[0, 0])
    # 40 px/s from x=20: the 40 px wide box's centre goes from 40 to ~118 over the 2 s
    assert np.all(np.diff(noses) > 0)
    assert noses[0] == pytest.approx(40, abs=1.5) and noses[-1] == pytest.approx(40 + 40 * 31 / 16, abs=2)


def test_neck_counts_only_when_both_shoulders_score_over_0_3(tmp_path: Path) -> None:
    scores = SCORES.copy()
    scores[5], scores[6] = 0.32, 0.31              # both shoulders under 0.35 but over DWPose's 0.3
    frame = DWPose.from_folder(write_dwpose_stand_ins(tmp_path / "a", scores)).detect(
        person_image(200, 300, (60, 40, 139, 239)))
    assert frame is not None and frame.scores[1] == 1.0 and not frame.valid()[2] and frame.valid()[1]
    scores[5] = 0.29
    frame = DWPose.from_folder(write_dwpose_stand_ins(tmp_path / "b", scores)).detect(
        person_image(200, 300, (60, 40, 139, 239)))
    assert frame is not None and frame.scores[1] == 0.0 and not frame.valid()[1]


def test_a_detector_with_nms_inside_works_too(tmp_path: Path, detector: DWPose) -> None:
    image = person_image(200, 300, (60, 40, 139, 239))
    baked = DWPose.from_folder(write_dwpose_stand_ins(tmp_path, nms_baked=True))
    frame, reference = baked.detect(image), detector.detect(image)
    assert frame is not None and reference is not None
    np.testing.assert_allclose(frame.keypoints, reference.keypoints, atol=1.0)
    assert baked.detect(np.zeros((300, 200, 3), np.uint8)) is None


def test_missing_onnx_files_name_every_file_and_the_folder(tmp_path: Path) -> None:
    with pytest.raises(PoseModelError) as caught:
        DWPose.from_folder(tmp_path / "models")
    message = str(caught.value)
    assert "yolox_l.onnx" in message and "dw-ll_ucoco_384.onnx" in message and str(tmp_path / "models") in message
    assert isinstance(caught.value, CheckpointError) and caught.value.missing == ["yolox_l.onnx",
                                                                                   "dw-ll_ucoco_384.onnx"]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "yolox_l.onnx").write_bytes(b"x")
    with pytest.raises(PoseModelError) as caught:
        DWPose.from_folder(tmp_path / "models")
    assert caught.value.missing == ["dw-ll_ucoco_384.onnx"] and "yolox_l.onnx" not in str(caught.value)


def test_cuda_falls_back_to_the_cpu_without_the_cuda_provider(stand_in_folder: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with caplog.at_level(logging.WARNING, logger="pose.detector"):
        assert DWPose.from_folder(stand_in_folder, device="cuda").device == "cpu"
    assert "CUDAExecutionProvider" in caplog.text
    with pytest.raises(RequestError, match="invalid device='tpu'"):
        DWPose.from_folder(stand_in_folder, device="tpu")
