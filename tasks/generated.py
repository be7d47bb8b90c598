"""What the generate stage hands on: the frames file and the numbers of one generation.

No Prefect and no torch at import: the engine service (service/server.py) writes these in its
own process, and the light shard process (service/client.py) reads them back."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.family import GenerationResult

__all__ = ["GenerateOutput", "gpu_label", "save_generation"]


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
    expert_policy: str = ""          # two-expert models: where the experts lived (engine/experts.py)
    expert_loads: int = 0            # experts moved onto the GPU for this row (or its group)
    expert_group: int = 0            # rows that shared those moves (the sequential policy)
    sampler: str = ""                # dance: which UniPC run (steps, guidance, shift)
    model_load_s: float = 0.0        # loading the model for this row (0: it was warm)
    queue_wait_s: float = 0.0        # waiting for the engine service's GPU (another row ran)
    service_s: float = 0.0           # time inside the engine (service) for this row

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "frames_path": str(self.frames_path)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateOutput:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in names}, "frames_path": Path(data["frames_path"])})


def gpu_label() -> str:
    import torch
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", str(idx)).split(",")
        return f"cuda:{visible[idx] if idx < len(visible) else idx} {torch.cuda.get_device_name(idx)}"
    # A worker pinned with CUDA_VISIBLE_DEVICES but running on CPU (tests, tiny preset) says which.
    pin = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cpu (CUDA_VISIBLE_DEVICES={pin})" if pin else "cpu"


def save_generation(result: GenerationResult, work_dir: Path, *, model_load_s: float = 0.0,
                    queue_wait_s: float = 0.0, service_s: float = 0.0) -> GenerateOutput:
    """The frames to `work_dir/frames.npy` (uint8 T×H×W×3) and the row's numbers."""
    import numpy as np
    work_dir.mkdir(parents=True, exist_ok=True)
    frames_path = work_dir / "frames.npy"
    np.save(frames_path, result.frames)
    return GenerateOutput(
        frames_path=frames_path, width=result.width, height=result.height,
        frames=result.num_frames, fps=result.fps, timings=result.timings,
        peak_vram_gb=result.peak_vram_gb, text_cache_hit=result.text_cache_hit, gpu=gpu_label(),
        warnings=result.warnings, expert_policy=result.expert_policy, expert_loads=result.expert_loads,
        expert_group=result.expert_group, sampler=result.sampler, model_load_s=model_load_s,
        queue_wait_s=queue_wait_s, service_s=service_s)
