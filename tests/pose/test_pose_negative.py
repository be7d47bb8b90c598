"""negative_poses: random per-frame scale and aspect about the neck, reproducible per seed."""

from __future__ import annotations

import numpy as np

from pose.keypoints import BODY, FACE, NECK, RIGHT_HAND, PoseSequence
from pose.negative import negative_poses
from tests.pose.figures import standing_figure


def _sequence(frames: int = 40) -> PoseSequence:
    points = np.stack([standing_figure() + (3 * i, -i) for i in range(frames)])
    scores = np.ones((frames, 134))
    scores[:, 30] = 0.1
    return PoseSequence(points, scores, 400, 800, 16.0)


def test_the_neck_stays_and_the_factors_stay_in_bounds() -> None:
    seq = _sequence()
    negative = negative_poses(seq, seed=3)
    np.testing.assert_allclose(negative.keypoints[:, NECK], seq.keypoints[:, NECK], atol=1e-3)
    before = seq.keypoints - seq.keypoints[:, NECK:NECK + 1]
    after = negative.keypoints - negative.keypoints[:, NECK:NECK + 1]
    # every body and hand offset from the neck is scaled by (scale × aspect, scale)
    y_scale = after[:, 10, 1] / before[:, 10, 1]                 # right ankle, far below the neck
    x_scale = after[:, 4, 0] / before[:, 4, 0]                   # right wrist, left of the neck
    assert np.all((0.7 <= y_scale) & (y_scale <= 1.3))
    assert np.all((0.6 <= x_scale / y_scale) & (x_scale / y_scale <= 1.4))
    factors = np.stack([x_scale, y_scale], axis=-1)[:, None]
    for part in (BODY, RIGHT_HAND):
        np.testing.assert_allclose(after[:, part], before[:, part] * factors, atol=1e-2)
    assert len(np.unique(np.round(y_scale, 6))) == len(seq)     # drawn per frame
    # the face is only shifted (pose_aug_diff does not scale it): its shape is unchanged
    np.testing.assert_allclose(negative.keypoints[:, FACE] - negative.keypoints[:, FACE][:, :1],
                               seq.keypoints[:, FACE] - seq.keypoints[:, FACE][:, :1], atol=1e-3)


def test_same_seed_same_poses_and_scores_kept() -> None:
    seq = _sequence(8)
    a, b, c = negative_poses(seq, 11), negative_poses(seq, 11), negative_poses(seq, 12)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert not np.allclose(a.keypoints, c.keypoints)
    np.testing.assert_array_equal(a.scores, seq.scores)
    assert (a.width, a.height, a.fps, len(a)) == (400, 800, 16.0, 8)
