"""PoseFrame / PoseSequence: layout, validity, npz and JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pose.keypoints import (
    BODY,
    FACE,
    FEET,
    LEFT_HAND,
    NUM_KEYPOINTS,
    RIGHT_HAND,
    SCORE_THRESHOLD,
    PoseFrame,
    PoseSequence,
)


def _sequence(frames: int = 3) -> PoseSequence:
    rng = np.random.default_rng(7)
    keypoints = rng.uniform(0, 100, (frames, NUM_KEYPOINTS, 2))
    scores = rng.uniform(0, 1, (frames, NUM_KEYPOINTS))
    return PoseSequence(keypoints, scores, width=120, height=90, fps=16.0)


def test_layout_slices_cover_134_points_in_openpose_order() -> None:
    parts = [BODY, FEET, FACE, LEFT_HAND, RIGHT_HAND]
    assert [(p.start, p.stop) for p in parts] == [(0, 18), (18, 24), (24, 92), (92, 113), (113, 134)]
    assert SCORE_THRESHOLD == 0.35


def test_shapes_are_checked_and_stored_as_float32() -> None:
    frame = PoseFrame(np.zeros((134, 2), np.float64), np.zeros(134))
    assert frame.keypoints.dtype == np.float32 and frame.scores.dtype == np.float32
    with pytest.raises(ValueError, match=r"keypoints must have shape \[134×2\]"):
        PoseFrame(np.zeros((133, 2)), np.zeros(133))
    with pytest.raises(ValueError, match=r"scores must have shape \[2×134\]"):
        PoseSequence(np.zeros((2, 134, 2)), np.zeros((3, 134)), 10, 10, 16)


def test_a_point_counts_above_the_threshold_with_finite_coordinates() -> None:
    keypoints = np.zeros((134, 2))
    keypoints[3] = np.nan
    scores = np.full(134, 0.9)
    scores[1], scores[2] = SCORE_THRESHOLD, 0.36
    valid = PoseFrame(keypoints, scores).valid()
    assert not valid[1] and valid[2] and not valid[3] and valid[0]


def test_npz_round_trip(tmp_path: Path) -> None:
    seq = _sequence()
    seq.save_npz(tmp_path / "poses.npz")
    back = PoseSequence.load_npz(tmp_path / "poses.npz")
    np.testing.assert_array_equal(back.keypoints, seq.keypoints)
    np.testing.assert_array_equal(back.scores, seq.scores)
    assert (back.width, back.height, back.fps, len(back)) == (120, 90, 16.0, 3)


def test_npz_of_another_format_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", format=np.array("something/else"), keypoints=np.zeros(1))
    with pytest.raises(ValueError, match="not a turbo-batch-pose/1 file"):
        PoseSequence.load_npz(tmp_path / "other.npz")


def test_json_is_openpose_style_with_zeros_for_points_that_do_not_count(tmp_path: Path) -> None:
    seq = _sequence(2)
    seq.save_json(tmp_path / "poses.json")
    document = json.loads((tmp_path / "poses.json").read_text())
    assert (document["width"], document["height"], document["fps"]) == (120, 90, 16.0)
    assert len(document["frames"]) == 2 and document["frames"][1]["frame"] == 1
    person = document["frames"][1]["people"][0]
    lengths = {name: len(values) // 3 for name, values in person.items()}
    assert lengths == {"pose_keypoints_2d": 18, "foot_keypoints_2d": 6, "face_keypoints_2d": 68,
                       "hand_left_keypoints_2d": 21, "hand_right_keypoints_2d": 21}
    valid = seq.valid()[1]
    for name, part in (("pose_keypoints_2d", BODY), ("hand_right_keypoints_2d", RIGHT_HAND)):
        triples = np.array(person[name]).reshape(-1, 3)
        for (x, y, score), point, raw_score, ok in zip(triples, seq.keypoints[1, part], seq.scores[1, part],
                                                       valid[part]):
            if ok:
                assert (x, y, score) == pytest.approx((point[0], point[1], raw_score), abs=0.01)
            else:
                assert (x, y, score) == (0, 0, 0)
