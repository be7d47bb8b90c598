"""A hand-made 134-point figure for the alignment and augmentation tests."""

from __future__ import annotations

import numpy as np

from pose.keypoints import BODY, FACE, FEET, LEFT_HAND, RIGHT_HAND

__all__ = ["standing_figure"]


def standing_figure() -> np.ndarray:
    """A standing figure in a 400×800 frame (OpenPose order), every point distinct."""
    body = np.array([[200, 150], [200, 220], [150, 220], [120, 320], [110, 410], [250, 220], [280, 320],
                     [290, 410], [170, 420], [165, 560], [160, 700], [230, 420], [235, 560], [240, 700],
                     [190, 140], [210, 140], [180, 150], [220, 150]], np.float64)
    points = np.zeros((134, 2))
    points[BODY] = body
    points[FEET] = [[245, 720], [250, 715], [238, 705], [155, 720], [150, 715], [162, 705]]
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    points[FACE] = np.stack([200 + 15 * np.cos(angles), 145 + 10 * np.sin(angles)], axis=1)
    fingers = np.array([[0, 0]] + [[3 * (f - 2), 6 * j] for f in range(5) for j in range(1, 5)], np.float64)
    points[LEFT_HAND] = body[7] + fingers
    points[RIGHT_HAND] = body[4] + fingers * (-1, 1)
    return points
