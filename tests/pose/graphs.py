"""Tiny ONNX stand-ins for the DWPose models, and synthetic driving videos, for CPU tests.

`write_dwpose_stand_ins(folder)` writes `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` with the real
models' signatures, so the real rtmlib path runs on them:

- detector: float32 [1, 3, 640, 640] (letterboxed pixels 0..255) → raw YOLOX output [1, 8400, 85]
  (cx, cy, log w, log h offsets per anchor, objectness, 80 class scores). Anchor 0 (stride 8, grid
  0,0) holds a box around the pixels brighter than 200, objectness = 1 if there are any, class
  "person"; every other anchor scores 0.
- pose: float32 [1, 3, 384, 288] (mean/std-normalised crop) → simcc_x [1, 133, 576], simcc_y
  [1, 133, 768]. It finds the bright rectangle in its crop and puts COCO-WholeBody keypoint k at
  PATTERN[k] in the rectangle's unit square (0,0 = its top-left pixel edge, 1,1 = bottom-right),
  with score SCORES[k] (0 in a crop without bright pixels).

So in image pixels, for a white rectangle on black covering pixel columns x1..x2 and rows y1..y2,
keypoint k lands at (x1 - 0.5 + u·(x2 - x1 + 1), y1 - 0.5 + v·(y2 - y1 + 1)), within a pixel or so.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["PATTERN", "SCORES", "bright_box", "expected_coco", "person_image", "write_driving_video",
           "write_dwpose_stand_ins", "write_rotated_video"]

_OPSET = 17
_FLOAT = TensorProto.FLOAT


def _coco_pattern() -> np.ndarray:
    """133 (u, v) points of a front-facing figure in its box (the person's left is image right)."""
    body = [(0.5, 0.1), (0.55, 0.08), (0.45, 0.08), (0.6, 0.1), (0.4, 0.1),        # nose, L/R eye, L/R ear
            (0.7, 0.25), (0.3, 0.25), (0.8, 0.4), (0.2, 0.4), (0.85, 0.55), (0.15, 0.55),   # shoulders..wrists
            (0.62, 0.55), (0.38, 0.55), (0.63, 0.75), (0.37, 0.75), (0.64, 0.95), (0.36, 0.95)]  # hips..ankles
    feet = [(0.68, 0.98), (0.66, 0.97), (0.62, 0.97), (0.32, 0.98), (0.34, 0.97), (0.38, 0.97)]
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = [(0.5 + 0.06 * np.cos(a), 0.11 + 0.04 * np.sin(a)) for a in angles]

    def hand(wrist_u: float, wrist_v: float, side: float) -> list[tuple[float, float]]:
        points = [(wrist_u, wrist_v)]
        for finger in range(5):
            for joint in range(1, 5):
                points.append((wrist_u + side * 0.012 * (finger - 2), wrist_v + 0.015 * joint))
        return points

    points = body + feet + face + hand(0.85, 0.55, 1.0) + hand(0.15, 0.55, -1.0)
    return np.array(points, dtype=np.float32)


PATTERN = _coco_pattern()
# A distinct score per COCO index (so the OpenPose permutation can be read back from scores);
# the right ear (COCO 4) is under the 0.35 threshold on purpose.
SCORES = (0.6 + 0.002 * np.arange(133)).astype(np.float32)
SCORES[4] = 0.2


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _extent(nodes: list[onnx.NodeProto], mask: str, reduce_axis: int, length: int, tag: str) -> tuple[str, str]:
    """Node outputs (first, last) index of the mask's bright pixels along one axis, as float [1] tensors."""
    nodes += [helper.make_node("ReduceMax", [mask], [f"{tag}_profile4"], axes=[reduce_axis], keepdims=0),
              _const(f"{tag}_flat_shape", np.array([length], np.int64)),
              helper.make_node("Reshape", [f"{tag}_profile4", f"{tag}_flat_shape"], [f"{tag}_profile"]),
              helper.make_node("ArgMax", [f"{tag}_profile"], [f"{tag}_first_i"], axis=0, keepdims=1),
              helper.make_node("ArgMax", [f"{tag}_profile"], [f"{tag}_last_i"], axis=0, keepdims=1,
                               select_last_index=1),
              helper.make_node("Cast", [f"{tag}_first_i"], [f"{tag}_first"], to=_FLOAT),
              helper.make_node("Cast", [f"{tag}_last_i"], [f"{tag}_last"], to=_FLOAT)]
    return f"{tag}_first", f"{tag}_last"


def _bright_mask(nodes: list[onnx.NodeProto], image: str, threshold: float) -> str:
    nodes += [helper.make_node("ReduceMax", [image], ["lum"], axes=[1], keepdims=1),
              _const("bright_thr", np.array(threshold, np.float32)),
              helper.make_node("Greater", ["lum", "bright_thr"], ["bright"]),
              helper.make_node("Cast", ["bright"], ["mask"], to=_FLOAT),
              helper.make_node("ReduceMax", ["mask"], ["any_bright"], keepdims=0)]
    return "mask"


def _save(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
          path: Path, name: str) -> None:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="turbo-batch")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _detector_graph(path: Path, nms_baked: bool) -> None:
    nodes: list[onnx.NodeProto] = []
    mask = _bright_mask(nodes, "images", 200.0)
    x1, x2 = _extent(nodes, mask, 2, 640, "col")
    y1, y2 = _extent(nodes, mask, 3, 640, "row")
    nodes += [_const("one", np.array([1.0], np.float32)),
              helper.make_node("Add", [x2, "one"], ["x2_edge"]), helper.make_node("Add", [y2, "one"], ["y2_edge"]),
              _const("score_shape", np.array([1], np.int64)),
              helper.make_node("Reshape", ["any_bright", "score_shape"], ["objectness"])]
    image_input = [helper.make_tensor_value_info("images", _FLOAT, [1, 3, 640, 640])]
    if nms_baked:   # an export with NMS inside: dets [1, N, 5] (x1, y1, x2, y2, score) and labels [1, N]
        nodes += [helper.make_node("Concat", [x1, y1, "x2_edge", "y2_edge", "objectness"], ["dets_flat"], axis=0),
                  _const("dets_shape", np.array([1, 1, 5], np.int64)),
                  helper.make_node("Reshape", ["dets_flat", "dets_shape"], ["dets"]),
                  _const("labels", np.zeros((1, 1), np.int64))]
        _save(nodes, image_input, [helper.make_tensor_value_info("dets", _FLOAT, [1, 1, 5]),
                                   helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 1])],
              path, "yolox_nms_stand_in")
        return
    # raw YOLOX: anchor 0 (grid 0,0, stride 8) decodes to cx = raw·8, w = exp(raw)·8
    nodes += [_const("half", np.array([0.5], np.float32)), _const("stride", np.array([8.0], np.float32)),
              helper.make_node("Sub", ["x2_edge", x1], ["w"]), helper.make_node("Sub", ["y2_edge", y1], ["h"]),
              helper.make_node("Mul", ["w", "half"], ["half_w"]), helper.make_node("Add", [x1, "half_w"], ["cx"]),
              helper.make_node("Mul", ["h", "half"], ["half_h"]), helper.make_node("Add", [y1, "half_h"], ["cy"]),
              helper.make_node("Div", ["cx", "stride"], ["raw_cx"]),
              helper.make_node("Div", ["cy", "stride"], ["raw_cy"]),
              helper.make_node("Div", ["w", "stride"], ["w_s"]), helper.make_node("Log", ["w_s"], ["raw_w"]),
              helper.make_node("Div", ["h", "stride"], ["h_s"]), helper.make_node("Log", ["h_s"], ["raw_h"]),
              _const("classes", np.eye(80, dtype=np.float32)[0]),   # "person" = 1, the 79 others 0
              helper.make_node("Concat", ["raw_cx", "raw_cy", "raw_w", "raw_h", "objectness", "classes"],
                               ["anchor0_flat"], axis=0),
              _const("anchor0_shape", np.array([1, 1, 85], np.int64)),
              helper.make_node("Reshape", ["anchor0_flat", "anchor0_shape"], ["anchor0"]),
              _const("rest_shape", np.array([1, 8399, 85], np.int64)),
              helper.make_node("ConstantOfShape", ["rest_shape"], ["rest"],
                               value=numpy_helper.from_array(np.zeros(1, np.float32))),
              helper.make_node("Concat", ["anchor0", "rest"], ["output"], axis=1)]
    _save(nodes, image_input, [helper.make_tensor_value_info("output", _FLOAT, [1, 8400, 85])], path,
          "yolox_stand_in")


def _pose_graph(path: Path, scores: np.ndarray) -> None:
    nodes: list[onnx.NodeProto] = []
    # (255 - 123.675) / 58.395 ≈ 2.25 for white, -2.1 for black: > 1 is "bright"
    mask = _bright_mask(nodes, "input", 1.0)
    for axis, (reduce_axis, length, bins) in {"x": (2, 288, 576), "y": (3, 384, 768)}.items():
        first, last = _extent(nodes, mask, reduce_axis, length, axis)
        column = 0 if axis == "x" else 1
        nodes += [_const(f"{axis}_one", np.array([1.0], np.float32)),
                  _const(f"{axis}_half", np.array([0.5], np.float32)),
                  helper.make_node("Sub", [last, first], [f"{axis}_d"]),
                  helper.make_node("Add", [f"{axis}_d", f"{axis}_one"], [f"{axis}_size"]),
                  helper.make_node("Sub", [first, f"{axis}_half"], [f"{axis}_edge"]),
                  _const(f"{axis}_pattern", PATTERN[:, column].reshape(1, 133, 1)),
                  helper.make_node("Mul", [f"{axis}_pattern", f"{axis}_size"], [f"{axis}_offset"]),
                  helper.make_node("Add", [f"{axis}_offset", f"{axis}_edge"], [f"{axis}_loc"]),
                  _const(f"{axis}_split", np.array([2.0], np.float32)),   # SimCC bins per pixel
                  helper.make_node("Mul", [f"{axis}_loc", f"{axis}_split"], [f"{axis}_target"]),
                  _const(f"{axis}_bins", np.arange(bins, dtype=np.float32).reshape(1, 1, bins)),
                  helper.make_node("Sub", [f"{axis}_bins", f"{axis}_target"], [f"{axis}_dist_signed"]),
                  helper.make_node("Abs", [f"{axis}_dist_signed"], [f"{axis}_dist"]),
                  _const(f"{axis}_slope", np.array([1e-4], np.float32)),
                  helper.make_node("Mul", [f"{axis}_dist", f"{axis}_slope"], [f"{axis}_falloff"]),
                  _const(f"{axis}_scores", scores.reshape(1, 133, 1)),
                  helper.make_node("Mul", [f"{axis}_scores", "any_bright"], [f"{axis}_peak"]),
                  helper.make_node("Sub", [f"{axis}_peak", f"{axis}_falloff"], [f"simcc_{axis}"])]
    _save(nodes, [helper.make_tensor_value_info("input", _FLOAT, [1, 3, 384, 288])],
          [helper.make_tensor_value_info("simcc_x", _FLOAT, [1, 133, 576]),
           helper.make_tensor_value_info("simcc_y", _FLOAT, [1, 133, 768])], path, "dwpose_stand_in")


def write_dwpose_stand_ins(folder: str | Path, scores: np.ndarray | None = None, nms_baked: bool = False) -> Path:
    """Write `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` stand-ins into `folder` (created); return it.
    `scores` replaces SCORES (133 COCO-WholeBody keypoint scores) for a bright crop; `nms_baked` writes a
    detector with NMS inside (outputs dets [1, N, 5] and labels [1, N]) instead of the raw [1, 8400, 85]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _detector_graph(folder / "yolox_l.onnx", nms_baked)
    _pose_graph(folder / "dw-ll_ucoco_384.onnx", SCORES if scores is None else np.asarray(scores, np.float32))
    return folder


def person_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black RGB image with a white rectangle over pixel columns x1..x2 and rows y1..y2 (inclusive)."""
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2 + 1, x1:x2 + 1] = 255
    return image


def bright_box(image: np.ndarray, threshold: int = 200) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): first and last pixel column/row brighter than `threshold` in an RGB image."""
    mask = image.max(axis=2) > threshold
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def expected_coco(box: tuple[int, int, int, int]) -> np.ndarray:
    """Where the stand-ins put the 133 COCO-WholeBody points for a bright rectangle `box` (pixels)."""
    x1, y1, x2, y2 = box
    origin = np.array([x1 - 0.5, y1 - 0.5], np.float32)
    size = np.array([x2 - x1 + 1, y2 - y1 + 1], np.float32)
    return origin + PATTERN * size


def write_driving_video(path: str | Path, *, seconds: float = 2.0, fps: int = 30, size: tuple[int, int] = (320, 240),
                        box: tuple[int, int] = (40, 100), speed: float = 40.0, hidden: Iterable[int] = ()) -> Path:
    """A white `box` (width, height) on black moving right at `speed` px/s from x=20, H.264 at `fps`, every
    frame a key frame; source frames in `hidden` are all black (nobody there)."""
    blank = set(hidden)
    width, height = size
    count = round(seconds * fps)
    frames = np.zeros((count, height, width, 3), np.uint8)
    top = (height - box[1]) // 2
    for index in range(count):
        left = 20 + round(speed * index / fps)
        if index not in blank:
            frames[index, top:top + box[1], left:left + box[0]] = 255
    argv = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-g", "1", str(path)]
    subprocess.run(argv, input=frames.tobytes(), check=True, timeout=120)
    return Path(path)


def write_rotated_video(source: str | Path, path: str | Path, degrees: int = 90) -> Path:
    """`source` remuxed (stream copy) with rotation metadata, the way phones store portrait video."""
    argv = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), "-c", "copy",
            "-metadata:s:v:0", f"rotate={degrees}", str(path)]
    subprocess.run(argv, check=True, timeout=60)
    return Path(path)


def _ffmpeg() -> str:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None, "ffmpeg is not installed"
    return ffmpeg
