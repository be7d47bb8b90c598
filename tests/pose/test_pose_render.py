"""render_pose / render_sequence: SteadyDancer's look, sampled at joint centres and limb middles."""

from __future__ import annotations

import colorsys

import numpy as np

from pose.keypoints import LEFT_HAND, RIGHT_HAND, PoseFrame, PoseSequence
from pose.render import POSE_CANVAS_SCALE, render_pose, render_sequence

# RGB as SteadyDancer's frames show them: the OpenPose palette with red and blue swapped.
NOSE_RGB = (0, 0, 255)          # OpenPose [255, 0, 0]
NECK_RGB = (0, 85, 255)         # OpenPose [255, 85, 0]
R_SHOULDER_RGB = (0, 170, 255)  # OpenPose [255, 170, 0]
NECK_NOSE_LIMB_RGB = (153, 0, 0)   # limb 12, OpenPose [0, 0, 255], × 0.6
HAND_JOINT_RGB = (255, 0, 0)


def pose(points: dict[int, tuple[float, float]]) -> PoseFrame:
    keypoints, scores = np.zeros((134, 2)), np.zeros(134)
    for index, point in points.items():
        keypoints[index], scores[index] = point, 0.9
    return PoseFrame(keypoints, scores)


def pixel(image: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(c) for c in image[y, x])


def test_joints_and_limbs_have_steadydancers_colours() -> None:
    image = render_pose(pose({0: (100, 50), 1: (100, 150), 2: (40, 150)}), 200, 200)
    assert image.shape == (200, 200, 3) and image.dtype == np.uint8
    assert pixel(image, 100, 50) == NOSE_RGB
    assert pixel(image, 100, 150) == NECK_RGB
    assert pixel(image, 40, 150) == R_SHOULDER_RGB
    assert pixel(image, 100, 100) == NECK_NOSE_LIMB_RGB    # the neck→nose limb is red, dimmed
    assert pixel(image, 70, 150) == (0, 0, 153)            # limb 0 neck→R shoulder: OpenPose [255, 0, 0] × 0.6
    assert pixel(image, 103, 100) == NECK_NOSE_LIMB_RGB and pixel(image, 106, 100) == (0, 0, 0)  # 4 px half-width
    assert pixel(image, 180, 20) == (0, 0, 0)


def test_points_that_do_not_count_draw_nothing() -> None:
    frame = pose({0: (100, 50), 1: (100, 150)})
    frame.scores[0] = 0.35                                 # at the threshold: not drawn
    image = render_pose(frame, 200, 200)
    assert pixel(image, 100, 50) == (0, 0, 0) and pixel(image, 100, 100) == (0, 0, 0)
    assert pixel(image, 100, 150) == NECK_RGB
    assert not render_pose(PoseFrame(np.full((134, 2), 50.0), np.zeros(134)), 100, 100).any()
    assert not render_pose(None, 64, 48).any() and render_pose(None, 64, 48).shape == (48, 64, 3)


def test_hands_draw_rainbow_bones_and_red_joints_but_no_face() -> None:
    left, right = LEFT_HAND.start, RIGHT_HAND.start
    frame = pose({left: (50, 50), left + 1: (50, 90), left + 5: (90, 50), right: (150, 150), right + 1: (0, 120),
                  30: (150, 30)})                         # 30 is a face point: never drawn
    image = render_pose(frame, 200, 200)
    assert pixel(image, 50, 50) == pixel(image, 50, 90) == pixel(image, 90, 50) == HAND_JOINT_RGB
    assert pixel(image, 150, 150) == HAND_JOINT_RGB
    assert pixel(image, 50, 70) == (0, 0, 255)             # edge 0, hue 0: (255, 0, 0) drawn as BGR
    b, g, r = (round(255 * c) for c in colorsys.hsv_to_rgb(4 / 20, 1.0, 1.0))
    assert pixel(image, 70, 50) == (r, g, b)               # edge 4 (wrist → index finger), hue 0.2
    assert pixel(image, 0, 120) == (0, 0, 0) and pixel(image, 75, 135) == (0, 0, 0)   # x = 0: skipped, as there
    assert pixel(image, 150, 30) == (0, 0, 0)


def test_keypoints_are_scaled_from_their_frame_to_the_canvas() -> None:
    frame = pose({0: (50, 25)})
    image = render_pose(frame, 200, 200, source_size=(100, 100))
    assert pixel(image, 100, 50) == NOSE_RGB and pixel(image, 50, 25) == (0, 0, 0)
    seq = PoseSequence(np.stack([frame.keypoints, frame.keypoints + 10]), np.stack([frame.scores] * 2), 100, 100, 16)
    frames = render_sequence(seq, POSE_CANVAS_SCALE * 100, POSE_CANVAS_SCALE * 100)
    assert frames.shape == (2, 200, 200, 3)
    np.testing.assert_array_equal(frames[0], image)
    assert pixel(frames[1], 120, 70) == NOSE_RGB
