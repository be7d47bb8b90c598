"""Retarget driving poses onto the reference person, as SteadyDancer's `preprocess/pose_align.py` does.

Bone-length ratios (reference ÷ driving frame `align_frame`) are measured in height-normalised
units (pixels ÷ frame height, so both frames count as 1 tall). Every driving frame is then rebuilt
along the kinematic chain from the neck, each bone keeping its direction and taking its ratio's
length, translated so the align frame's neck lands on the reference's neck, and written in the
reference's pixels. Face and feet are only translated (SteadyDancer does not rescale the face and
has no feet). Scores are kept, so a point under the threshold stays invalid.

Where SteadyDancer measures a bone with an invisible end it measures to its -1 placeholder; here
such a bone's ratio is unknown (NaN). A two-sided ratio (arms, legs) is the mean of the sides
that are known; an unknown ratio becomes 1 and an infinite one (a zero-length driving bone) the
mean of the finite ratios, as SteadyDancer does.
"""

from __future__ import annotations

import numpy as np

from pose.keypoints import LEFT_HAND, NECK, RIGHT_HAND, PoseFrame, PoseSequence, valid_mask

__all__ = ["CHAIN", "align_poses", "limb_scales"]

# (points moved, parent, ratio): points = new parent + ratio × (old points − old parent), in this order,
# so every bone hangs off its already-moved parent. Indices are OpenPose's (pose/keypoints.py).
CHAIN: tuple[tuple[list[int] | slice, int, str], ...] = (
    ([0], NECK, "neck"),                        # nose
    ([14, 16], 0, "face_left"),                 # SteadyDancer's "left" face side: right eye, right ear
    ([15, 17], 0, "face_right"),
    ([2, 5], NECK, "shoulder"),
    ([3], 2, "arm_upper"), ([4], 3, "arm_lower"), (RIGHT_HAND, 4, "hand"),
    ([6], 5, "arm_upper"), ([7], 6, "arm_lower"), (LEFT_HAND, 7, "hand"),
    ([8, 11], NECK, "body_len"),                # hips
    ([9], 8, "leg_upper"), ([10], 9, "leg_lower"),
    ([12], 11, "leg_upper"), ([13], 12, "leg_lower"),
)


def align_poses(reference: PoseFrame, ref_size: tuple[int, int], driving: PoseSequence,
                align_frame: int = 0) -> PoseSequence:
    """`driving` retargeted to `reference` (found in a `ref_size` = (width, height) image), in its pixels."""
    if not 0 <= align_frame < len(driving):
        raise IndexError(f"align_frame {align_frame} is outside the {len(driving)} driving frames")
    ref_w, ref_h = ref_size
    scales = limb_scales(reference, ref_size, driving.frame(align_frame), (driving.width, driving.height))
    old = driving.keypoints.astype(np.float64) / driving.height          # height-normalised units
    new = old.copy()
    for points, parent, ratio in CHAIN:
        new[:, points] = new[:, parent, None] + scales[ratio] * (old[:, points] - old[:, parent, None])
    offset = reference.keypoints[NECK].astype(np.float64) / ref_h - old[align_frame, NECK]
    return PoseSequence((new + offset) * ref_h, driving.scores.copy(), ref_w, ref_h, driving.fps)


def limb_scales(reference: PoseFrame, ref_size: tuple[int, int], driving: PoseFrame,
                driving_size: tuple[int, int]) -> dict[str, float]:
    """SteadyDancer's ten ratios, reference ÷ driving, keyed by its names (`scale_` dropped)."""
    ref = _Lengths(reference, ref_size[1])
    drv = _Lengths(driving, driving_size[1])

    def ratio(*bones: tuple[int, int]) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(sum(ref.bone(*b) for b in bones)) / sum(drv.bone(*b) for b in bones))

    with np.errstate(divide="ignore", invalid="ignore"):
        body_len = float(np.float64(ref.to_mid_hip()) / drv.to_mid_hip())
    scales = {
        "neck": ratio((0, 1)),
        "face_left": ratio((16, 14), (14, 0)),
        "face_right": ratio((17, 15), (15, 0)),
        "shoulder": ratio((2, 5)),
        "arm_upper": _mean(ratio((2, 3)), ratio((5, 6))),
        "arm_lower": _mean(ratio((3, 4)), ratio((6, 7))),
        "body_len": body_len,
        "leg_upper": _mean(ratio((8, 9)), ratio((11, 12))),
        "leg_lower": _mean(ratio((9, 10)), ratio((12, 13))),
    }
    # SteadyDancer's hand-length ratio loop runs 0 times: the hand takes the arms' mean.
    scales["hand"] = _mean(scales["arm_upper"], scales["arm_lower"])
    scales = {name: 1.0 if np.isnan(value) else value for name, value in scales.items()}
    finite = [value for value in scales.values() if np.isfinite(value)]
    fallback = float(np.mean(finite)) if finite else 1.0
    return {name: value if np.isfinite(value) else fallback for name, value in scales.items()}


class _Lengths:
    """Bone lengths of one frame in height-normalised units; NaN where an end point does not count."""

    def __init__(self, frame: PoseFrame, height: int):
        self.points = frame.keypoints.astype(np.float64) / height
        self.valid = valid_mask(frame.keypoints, frame.scores)

    def bone(self, a: int, b: int) -> float:
        if not (self.valid[a] and self.valid[b]):
            return float("nan")
        return float(np.linalg.norm(self.points[a] - self.points[b]))

    def to_mid_hip(self) -> float:
        if not self.valid[[NECK, 8, 11]].all():
            return float("nan")
        return float(np.linalg.norm(self.points[NECK] - (self.points[8] + self.points[11]) / 2))


def _mean(*values: float) -> float:
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")
