"""Generate stage: one manifest row → frames.npy in the row's work folder, on the worker's Engine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from engine.family import Engine, LoadSpec
from tasks.manifest import ManifestRow

__all__ = ["GenerateOutput", "generate", "gpu_label", "run_generate"]


@dataclass
class GenerateOutput:
    frames_path: Path
    width: int
    height: int
    frames: int
    fps: int
    timings: dict[str, float]
    peak_vram_gb: float
    text_cache_hit: bool
    gpu: str
    warnings: list[str] = field(default_factory=list)


def gpu_label() -> str:
    import torch
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", str(idx)).split(",")
        return f"cuda:{visible[idx] if idx < len(visible) else idx} {torch.cuda.get_device_name(idx)}"
    # A worker pinned with CUDA_VISIBLE_DEVICES but running on CPU (tests, tiny preset) says which.
    pin = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cpu (CUDA_VISIBLE_DEVICES={pin})" if pin else "cpu"


def run_generate(row: ManifestRow, work_dir: Path, engine: Engine, spec: LoadSpec, *,
                 inputs: Mapping[str, Path] | None = None, expected_rows: int = 1) -> GenerateOutput:
    """expected_rows: rows this worker will run on this model from here on (compile decision)."""
    engine.pipeline(spec).prepare(expected_rows)
    result = engine.generate(spec, row.request(inputs))
    work_dir.mkdir(parents=True, exist_ok=True)
    frames_path = work_dir / "frames.npy"
    np.save(frames_path, result.frames)
    return GenerateOutput(
        frames_path=frames_path, width=result.width, height=result.height,
        frames=result.num_frames, fps=result.fps, timings=result.timings,
        peak_vram_gb=result.peak_vram_gb, text_cache_hit=result.text_cache_hit, gpu=gpu_label(),
        warnings=result.warnings)


# No retries: a bad request or CUDA OOM does not get better by repeating it on the same GPU.
generate = task(name="generate", task_run_name="generate-{row.id}",
                cache_policy=NO_CACHE)(run_generate)
