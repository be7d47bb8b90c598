"""extract_poses end to end: real ffmpeg decode, real rtmlib on the stand-ins, align, negatives, renders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pose.detector import DWPose
from pose.errors import PoseInputError
from pose.extract import extract_poses
from pose.keypoints import PoseFrame
from pose.video import read_driving_video
from tests.pose.graphs import person_image, write_driving_video

WIDTH, HEIGHT = 96, 160   # the generation size; poses are drawn at twice this


def _empty_frames(video: Path, num_frames: int = 32) -> list[int]:
    """The output frames (16 fps) that decode black: nobody there."""
    frames = read_driving_video(video, num_frames=num_frames).frames
    return [index for index, frame in enumerate(frames) if frame.max() < 100]


def _reference_pose(detector: DWPose, reference: Path) -> PoseFrame:
    image = np.asarray(Image.open(reference).convert("RGB").resize((WIDTH, HEIGHT)))
    frame = detector.detect(image)
    assert frame is not None
    return frame


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "ref.png"
    Image.fromarray(person_image(192, 320, (66, 40, 125, 279))).save(path)
    return path


def test_extract_poses_gives_aligned_negative_and_rendered_poses(reference: Path, driving_video: Path,
                                                                 detector: DWPose) -> None:
    result = extract_poses(reference, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=32)
    assert (result.pose_frames, result.pose_fps, result.warnings) == (32, 16.0, [])
    assert set(result.timings) == {"decode_s", "detect_s", "align_s", "render_s"}
    assert (result.driving.width, result.driving.height, len(result.driving)) == (320, 240, 32)
    assert (result.aligned.width, result.aligned.height, len(result.aligned)) == (WIDTH, HEIGHT, 32)
    assert result.positive_frames.shape == result.negative_frames.shape == (32, 2 * HEIGHT, 2 * WIDTH, 3)
    ref_pose = _reference_pose(detector, reference)
    # frame 0 is aligned onto the reference: same neck; the driving box moves right, so do the aligned poses
    assert result.aligned.keypoints[0, 1] == pytest.approx(ref_pose.keypoints[1], abs=1.0)
    assert np.all(np.diff(result.aligned.keypoints[:, 1, 0]) > 0)
    np.testing.assert_allclose(result.negative.keypoints[:, 1], result.aligned.keypoints[:, 1], atol=1e-3)
    # the rendered neck→nose limb is red, as in SteadyDancer's frames
    red = (result.positive_frames[0, ..., 0] > 100) & (result.positive_frames[0, ..., 1:].max(axis=-1) == 0)
    assert red.any() and not np.array_equal(result.positive_frames, result.negative_frames)


def test_negatives_can_stay_undrawn(reference: Path, driving_video: Path, detector: DWPose) -> None:
    drawn = extract_poses(reference, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=9)
    lean = extract_poses(reference, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=9,
                         render_negative=False)
    assert lean.negative_frames.shape[0] == 0
    np.testing.assert_array_equal(lean.positive_frames, drawn.positive_frames)
    np.testing.assert_array_equal(lean.negative.keypoints, drawn.negative.keypoints)


def test_loop_fill_detects_each_source_frame_once(reference: Path, driving_video: Path, detector: DWPose) -> None:
    result = extract_poses(reference, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=40,
                           fill="loop")
    np.testing.assert_array_equal(result.driving.keypoints[32:], result.driving.keypoints[:8])
    assert result.warnings == ["the driving video has 32 frames at 16 fps; 8 more were filled by fill=loop"]


def test_no_person_in_the_reference(tmp_path: Path, driving_video: Path, detector: DWPose) -> None:
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((320, 192, 3), np.uint8)).save(black)
    with pytest.raises(PoseInputError, match="no person found in the reference image") as caught:
        extract_poses(black, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=32)
    assert caught.value.column == "image"


def test_an_unreadable_reference(tmp_path: Path, driving_video: Path, detector: DWPose) -> None:
    text = tmp_path / "ref.png"
    text.write_text("not a png")
    with pytest.raises(PoseInputError, match="image: not a readable image"):
        extract_poses(text, driving_video, detector, width=WIDTH, height=HEIGHT, num_frames=32)


def test_nobody_in_most_driving_frames_names_them(reference: Path, tmp_path: Path, detector: DWPose) -> None:
    video = write_driving_video(tmp_path / "empty.mp4", hidden=range(10, 60))   # a person in the first 1/3 s only
    empty = _empty_frames(video)
    assert 20 < len(empty) < 32
    listed = ", ".join(str(i) for i in empty[:20])
    with pytest.raises(PoseInputError) as caught:
        extract_poses(reference, video, detector, width=WIDTH, height=HEIGHT, num_frames=32)
    assert str(caught.value) == (f"driving_video: no person in {len(empty)} of 32 frames (more than half) "
                                 f"(frames {listed}, …)")
    assert caught.value.column == "driving_video" and caught.value.frames == empty


def test_nobody_in_the_align_frame(reference: Path, tmp_path: Path, detector: DWPose) -> None:
    video = write_driving_video(tmp_path / "late.mp4", hidden=range(0, 4))
    with pytest.raises(PoseInputError, match="no person in frame 0, the frame the poses are aligned on") as caught:
        extract_poses(reference, video, detector, width=WIDTH, height=HEIGHT, num_frames=32)
    empty = _empty_frames(video)
    assert caught.value.frames == empty and 0 in empty and 3 not in empty
    result = extract_poses(reference, video, detector, width=WIDTH, height=HEIGHT, num_frames=32, align_frame=3)
    assert result.aligned.keypoints[3, 1] == pytest.approx(_reference_pose(detector, reference).keypoints[1], abs=1.0)
    assert result.warnings[0].startswith(f"no person in {len(empty)} of 32 driving frames")


def test_a_few_empty_frames_take_the_nearest_pose(reference: Path, tmp_path: Path, detector: DWPose) -> None:
    video = write_driving_video(tmp_path / "gap.mp4", hidden=range(28, 32))   # about 0.13 s gone
    empty = _empty_frames(video)
    assert len(empty) == 2 and empty[1] == empty[0] + 1
    first, second = empty
    result = extract_poses(reference, video, detector, width=WIDTH, height=HEIGHT, num_frames=32)
    assert result.warnings == [f"no person in 2 of 32 driving frames ({first}, {second}); each took the pose of "
                               f"the nearest frame with one"]
    np.testing.assert_array_equal(result.driving.keypoints[first], result.driving.keypoints[first - 1])
    np.testing.assert_array_equal(result.driving.keypoints[second], result.driving.keypoints[second + 1])


def test_importing_pose_does_not_import_prefect_or_torch() -> None:
    code = ("import sys, pose; bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'torch')]; "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
