"""Negative (misaligned) poses for SteadyDancer's pose guidance, as `preprocess/utils_aug.pose_aug_diff`.

Per frame, a random scale in [0.7, 1.3] and a random aspect factor in [0.6, 1.4] (on x only)
are drawn; body and hands are scaled by (scale × aspect, scale) and moved back so the neck stays
where it was. SteadyDancer also draws offsets in ±0.2 but its code that applies them is commented
out, so none are applied here either. The face is not scaled, only moved by the same shift (as
there; feet, absent there, move with it). Scores are kept: invalid points stay invalid. The draws
come from numpy's default generator seeded with `seed` (SteadyDancer uses Python's unseeded `random`).
"""

from __future__ import annotations

import numpy as np

from pose.keypoints import BODY, LEFT_HAND, NECK, RIGHT_HAND, PoseSequence

__all__ = ["ASPECT_RANGE", "SCALE_RANGE", "negative_poses"]

SCALE_RANGE = (0.7, 1.3)
ASPECT_RANGE = (0.6, 1.4)


def negative_poses(seq: PoseSequence, seed: int) -> PoseSequence:
    """A randomly rescaled copy of `seq` (same size, fps and scores); the same seed gives the same poses."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(*SCALE_RANGE, len(seq))
    aspect = rng.uniform(*ASPECT_RANGE, len(seq))
    factors = np.stack([scale * aspect, scale], axis=-1)[:, None, :]      # [F, 1, 2]: x, y
    points = seq.keypoints.astype(np.float64)
    neck = points[:, NECK:NECK + 1]
    shift = neck - neck * factors                                          # keeps the neck in place
    out = points + shift                                                   # face and feet: shift only
    for part in (BODY, LEFT_HAND, RIGHT_HAND):
        out[:, part] = points[:, part] * factors + shift
    return PoseSequence(out, seq.scores.copy(), seq.width, seq.height, seq.fps)
