"""Pose extraction for SteadyDancer-style pose-driven image-to-video (docs/POSE.md).

Reference image + driving video → DWPose keypoints (rtmlib on onnxruntime) → poses retargeted
to the reference person → positive and negative pose frames drawn as SteadyDancer draws them.
`extract_poses` runs the whole stage; the modules hold one step each.
"""

from pose.align import align_poses
from pose.detector import DWPose
from pose.errors import PoseInputError, PoseModelError
from pose.extract import PoseResult, extract_poses
from pose.keypoints import SCORE_THRESHOLD, PoseFrame, PoseSequence
from pose.negative import negative_poses
from pose.render import POSE_CANVAS_SCALE, render_pose, render_sequence
from pose.video import DrivingVideo, read_driving_video

__all__ = ["POSE_CANVAS_SCALE", "SCORE_THRESHOLD", "DWPose", "DrivingVideo", "PoseFrame", "PoseInputError",
           "PoseModelError", "PoseResult", "PoseSequence", "align_poses", "extract_poses", "negative_poses",
           "read_driving_video", "render_pose", "render_sequence"]
