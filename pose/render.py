"""Draw pose frames the way SteadyDancer's conditioning frames look (`preprocess/pose/script/util.py`).

Black canvas; the first 17 OpenPose limbs as filled ellipses 4 px half-wide in the 18-colour
OpenPose palette; the whole canvas × 0.6; body joints as radius-4 discs in full colour; hand
bones 2 px wide in an HSV rainbow, hand joints radius 4; no face and no feet. SteadyDancer draws
with OpenCV (BGR order) and then converts BGR → RGB, so its frames show the palette with red and
blue swapped (neck→nose is red, hand joints red); the channels are swapped here the same way.

The canvas is the caller's size; SteadyDancer draws at twice the generation size (POSE_CANVAS_SCALE).
"""

from __future__ import annotations

import colorsys
import math
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from pose.keypoints import BODY, LEFT_HAND, RIGHT_HAND, PoseFrame, PoseSequence

__all__ = ["BODY_COLORS", "HAND_EDGES", "HAND_JOINT_COLOR", "LIMBS", "POSE_CANVAS_SCALE", "render_pose",
           "render_sequence"]

POSE_CANVAS_SCALE = 2
# OpenPose's limbSeq, 0-based; SteadyDancer draws the first 17 (not the two ear-to-shoulder limbs).
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
_LIMBS_DRAWN = 17
# In OpenCV's BGR order as SteadyDancer passes them (the final swap turns [255, 0, 0] into blue).
BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_JOINT_COLOR = (0, 0, 255)   # BGR red, red after the swap
_LIMB_HALF_WIDTH = 4
_JOINT_RADIUS = 4
_HAND_LINE_WIDTH = 2
_LIMB_DIM = 0.6
# SteadyDancer skips a hand point whose integer pixel position is not > 0.01 (its -1 placeholder test).
_HAND_EPS = 0.01
_COORD_LIMIT = 1e6   # OpenCV takes int32 pixel positions


def render_pose(frame: PoseFrame | None, width: int, height: int, *,
                source_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [height, width, 3] RGB. Keypoints are in pixels of `source_size` (width, height), scaled to
    the canvas; without it they are canvas pixels. None draws nothing (a black frame)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    if frame is None:
        return canvas
    src_w, src_h = source_size or (width, height)
    # As SteadyDancer: normalised coordinates × canvas size, then int() (truncation).
    points = np.clip(frame.keypoints.astype(np.float64) / (src_w, src_h) * (width, height),
                     -_COORD_LIMIT, _COORD_LIMIT)
    valid = frame.valid()
    canvas = _draw_body(canvas, points[BODY], valid[BODY])
    for hand in (LEFT_HAND, RIGHT_HAND):
        _draw_hand(canvas, points[hand], valid[hand])
    return np.ascontiguousarray(canvas[..., ::-1])   # SteadyDancer's cv2.COLOR_BGR2RGB


def render_sequence(seq: PoseSequence, width: int, height: int) -> np.ndarray:
    """uint8 [F, height, width, 3]: every frame of `seq` drawn on a width × height canvas.

    Frames are drawn on a thread pool: OpenCV releases the GIL, and at SteadyDancer's 2× canvas
    (1152×2048 for 576×1024) one pass over 81 frames took 9 s on one core of a GPU host."""
    frames = np.zeros((len(seq), height, width, 3), np.uint8)

    def draw(index: int) -> None:
        frames[index] = render_pose(seq.frame(index), width, height, source_size=(seq.width, seq.height))

    workers = min(len(seq), os.cpu_count() or 1, 16)
    if workers <= 1:
        for index in range(len(seq)):
            draw(index)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pose-render") as pool:
            list(pool.map(draw, range(len(seq))))
    return frames


def _draw_body(canvas: np.ndarray, points: np.ndarray, valid: np.ndarray) -> np.ndarray:
    for index, (a, b) in enumerate(LIMBS[:_LIMBS_DRAWN]):
        if not (valid[a] and valid[b]):
            continue
        (x0, y0), (x1, y1) = points[a], points[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = np.asarray(cv2.ellipse2Poly(center, (int(length / 2), _LIMB_HALF_WIDTH),
                                              int(angle), 0, 360, 1), np.int32)
        cv2.fillConvexPoly(canvas, polygon, BODY_COLORS[index])
    canvas = (canvas * _LIMB_DIM).astype(np.uint8)
    for index in range(len(points)):
        if valid[index]:
            x, y = points[index]
            cv2.circle(canvas, (int(x), int(y)), _JOINT_RADIUS, BODY_COLORS[index], thickness=-1)
    return canvas


def _draw_hand(canvas: np.ndarray, points: np.ndarray, valid: np.ndarray) -> None:
    pixels = [(int(x), int(y)) for x, y in points]
    drawable = [bool(ok) and x > _HAND_EPS and y > _HAND_EPS for (x, y), ok in zip(pixels, valid)]
    for index, (a, b) in enumerate(HAND_EDGES):
        if drawable[a] and drawable[b]:
            color = [255 * c for c in colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0)]
            cv2.line(canvas, pixels[a], pixels[b], color, thickness=_HAND_LINE_WIDTH)
    for pixel, ok in zip(pixels, drawable):
        if ok:
            cv2.circle(canvas, pixel, _JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)
