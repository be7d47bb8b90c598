"""Shared fixtures of the pose tests: ONNX stand-ins for DWPose and a synthetic driving video."""

from __future__ import annotations

from pathlib import Path

import pytest

from pose.detector import DWPose
from tests.pose.graphs import write_driving_video, write_dwpose_stand_ins


@pytest.fixture(scope="session")
def stand_in_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dwpose_stand_ins(tmp_path_factory.mktemp("dwpose"))


@pytest.fixture(scope="session")
def detector(stand_in_folder: Path) -> DWPose:
    return DWPose.from_folder(stand_in_folder)


@pytest.fixture(scope="session")
def driving_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 30 fps, 320×240: a 40×100 white box moving right at 40 px/s."""
    return write_driving_video(tmp_path_factory.mktemp("video") / "square.mp4")

