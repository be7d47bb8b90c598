"""align_poses / limb_scales against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pose.align import align_poses, limb_scales
from pose.keypoints import FACE, PoseFrame, PoseSequence
from tests.pose.figures import standing_figure

REF_SIZE = (400, 800)
CHAINED = np.r_[np.arange(18), np.arange(92, 134)]     # body and hands: rescaled along the chain


def frame(points: np.ndarray, scores: np.ndarray | None = None) -> PoseFrame:
    return PoseFrame(points, np.ones(134) if scores is None else scores)


def sequence(*frames: np.ndarray, size: tuple[int, int] = REF_SIZE, scores: np.ndarray | None = None) -> PoseSequence:
    stacked = np.stack(frames)
    return PoseSequence(stacked, np.ones(stacked.shape[:2]) if scores is None else scores, size[0], size[1], 16.0)


def test_a_driving_figure_twice_as_big_becomes_the_reference_at_the_reference_neck() -> None:
    ref = standing_figure()
    neck = ref[1]
    driving = 2 * (ref - neck) + neck + (-150, -300)    # twice the size, elsewhere in a same-size frame
    scales = limb_scales(frame(ref), REF_SIZE, frame(driving), REF_SIZE)
    assert scales == pytest.approx(dict.fromkeys(scales, 0.5))
    aligned = align_poses(frame(ref), REF_SIZE, sequence(driving))
    np.testing.assert_allclose(aligned.keypoints[0, CHAINED], ref[CHAINED], atol=1e-3)
    # the face is only moved (SteadyDancer does not rescale it): driving face + (reference neck − driving neck)
    np.testing.assert_allclose(aligned.keypoints[0, FACE], driving[FACE] + (ref[1] - driving[1]), atol=1e-3)
    assert (aligned.width, aligned.height, aligned.fps) == (400, 800, 16.0)


def test_a_pure_translation_keeps_the_motion_relative_to_the_align_frame() -> None:
    ref = standing_figure()
    moves = [np.array((30.0, -20.0)), np.array((45.0, -20.0)), np.array((30.0, 10.0))]
    aligned = align_poses(frame(ref), REF_SIZE, sequence(*(ref + m for m in moves)))
    for index, move in enumerate(moves):
        np.testing.assert_allclose(aligned.keypoints[index], ref + (move - moves[0]), atol=1e-3)


def test_align_frame_sets_the_ratios_and_the_neck_offset() -> None:
    ref = standing_figure()
    neck = ref[1]
    frames = [ref + (100, 0), 2 * (ref - neck) + neck]    # frame 1 is twice as big and not moved
    aligned = align_poses(frame(ref), REF_SIZE, sequence(*frames), align_frame=1)
    np.testing.assert_allclose(aligned.keypoints[1, CHAINED], ref[CHAINED], atol=1e-3)
    # frame 0 (reference size) is halved along the chain around its own neck, 100 px right of the reference's
    np.testing.assert_allclose(aligned.keypoints[0, CHAINED], 0.5 * (ref[CHAINED] - neck) + neck + (100, 0),
                               atol=1e-3)


def test_lengths_are_compared_in_units_of_frame_height() -> None:
    ref = standing_figure()
    # the same figure in a frame twice as large both ways: same relative size, so every ratio is 1
    driving = 2 * ref
    assert limb_scales(frame(ref), REF_SIZE, frame(driving), (800, 1600)) == pytest.approx(
        dict.fromkeys(["neck", "face_left", "face_right", "shoulder", "arm_upper", "arm_lower", "body_len",
                       "leg_upper", "leg_lower", "hand"], 1.0))
    aligned = align_poses(frame(ref), REF_SIZE, sequence(driving, size=(800, 1600)))
    np.testing.assert_allclose(aligned.keypoints[0], ref, atol=1e-3)


def test_an_unknown_ratio_is_1_and_one_known_side_is_enough() -> None:
    ref, driving = standing_figure(), standing_figure()
    driving[[16, 17]] += (0, -40)                 # longer face sides in the driving frame
    driving[3] = ref[2] + 2 * (ref[3] - ref[2])    # right upper arm twice as long, forearm as long
    driving[4] = driving[3] + (ref[4] - ref[3])
    ref_scores = np.ones(134)
    ref_scores[[16, 17]] = 0.1                    # ears invisible in the reference: face ratios unknown
    ref_scores[6] = 0.1                           # left elbow invisible: left upper arm and forearm unknown
    scales = limb_scales(frame(ref, ref_scores), REF_SIZE, frame(driving), REF_SIZE)
    assert scales["face_left"] == scales["face_right"] == 1.0
    assert scales["arm_upper"] == pytest.approx(0.5)          # the right side alone
    assert scales["arm_lower"] == pytest.approx(1.0)
    assert scales["hand"] == pytest.approx((0.5 + 1.0) / 2)   # arms' mean (SteadyDancer's hand loop runs 0 times)


def test_an_infinite_ratio_takes_the_mean_of_the_finite_ones() -> None:
    ref, driving = standing_figure(), standing_figure()
    driving[0] = driving[1]                       # nose on the neck: zero driving length
    driving[[8, 11]] = ref[1] + 2 * (ref[[8, 11]] - ref[1])   # torso twice as long: body_len 0.5
    scales = limb_scales(frame(ref), REF_SIZE, frame(driving), REF_SIZE)
    others = [v for k, v in scales.items() if k != "neck"]
    assert np.isfinite(scales["neck"]) and scales["neck"] == pytest.approx(np.mean(others))
    assert scales["body_len"] == pytest.approx(0.5)


def test_points_under_the_threshold_stay_invalid() -> None:
    ref = standing_figure()
    scores = np.ones((2, 134))
    scores[0, [4, 100, 30]] = 0.2
    scores[1, 10] = 0.0
    driving = sequence(ref + 5, ref + 9, scores=scores)
    aligned = align_poses(frame(ref), REF_SIZE, driving)
    np.testing.assert_array_equal(aligned.scores, driving.scores)
    np.testing.assert_array_equal(aligned.valid(), driving.valid())


def test_align_frame_outside_the_sequence_is_refused() -> None:
    with pytest.raises(IndexError, match="align_frame 3"):
        align_poses(frame(standing_figure()), REF_SIZE, sequence(standing_figure()), align_frame=3)
