"""Generate stage: one manifest row → frames.npy in the row's work folder, on the worker's Engine.

A row is one `generate` task run, or, for two-expert models under the sequential policy, two:
`generate-start` (up to the expert switch) for each row of a group, then `generate-finish`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from engine.family import Engine, GenerationResult, LoadSpec
from tasks.manifest import ManifestRow

__all__ = ["GenerateOutput", "generate", "generate_finish", "generate_start", "gpu_label", "rows_per_group",
           "run_generate", "run_generate_finish", "run_generate_start"]


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


def gpu_label() -> str:
    import torch
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", str(idx)).split(",")
        return f"cuda:{visible[idx] if idx < len(visible) else idx} {torch.cuda.get_device_name(idx)}"
    # A worker pinned with CUDA_VISIBLE_DEVICES but running on CPU (tests, tiny preset) says which.
    pin = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cpu (CUDA_VISIBLE_DEVICES={pin})" if pin else "cpu"


def rows_per_group(engine: Engine, spec: LoadSpec, expected_rows: int) -> int:
    """How many rows the shard starts before finishing them (>1 only under the sequential
    expert policy); loads the model and makes its warm-up decisions for the rows to come."""
    pipeline = engine.pipeline(spec)
    pipeline.prepare(expected_rows)
    return pipeline.rows_per_group(expected_rows)


def run_generate(row: ManifestRow, work_dir: Path, engine: Engine, spec: LoadSpec, *,
                 inputs: Mapping[str, Path] | None = None, expected_rows: int = 1) -> GenerateOutput:
    """expected_rows: rows this worker will run on this model from here on (compile decision)."""
    engine.pipeline(spec).prepare(expected_rows)
    return _save(engine.generate(spec, row.request(inputs)), work_dir)


def run_generate_start(row: ManifestRow, engine: Engine, spec: LoadSpec, *,
                       inputs: Mapping[str, Path] | None = None) -> object:
    """The first phase of a grouped row (conditioning, the high-noise steps): a paused row."""
    return engine.start(spec, row.request(inputs))


def run_generate_finish(row: ManifestRow, work_dir: Path, engine: Engine, spec: LoadSpec,
                        pending: object) -> GenerateOutput:
    """The rest of a row `run_generate_start` paused: its frames in the work folder."""
    return _save(engine.finish(spec, pending), work_dir)


def _save(result: GenerationResult, work_dir: Path) -> GenerateOutput:
    work_dir.mkdir(parents=True, exist_ok=True)
    frames_path = work_dir / "frames.npy"
    np.save(frames_path, result.frames)
    return GenerateOutput(
        frames_path=frames_path, width=result.width, height=result.height,
        frames=result.num_frames, fps=result.fps, timings=result.timings,
        peak_vram_gb=result.peak_vram_gb, text_cache_hit=result.text_cache_hit, gpu=gpu_label(),
        warnings=result.warnings, expert_policy=result.expert_policy, expert_loads=result.expert_loads,
        expert_group=result.expert_group, sampler=result.sampler)


# No retries: a bad request or CUDA OOM does not get better by repeating it on the same GPU.
generate = task(name="generate", task_run_name="generate-{row.id}",
                cache_policy=NO_CACHE)(run_generate)
# A paused row holds tensors: kept in memory between its two task runs, never persisted.
generate_start = task(name="generate-start", task_run_name="generate-start-{row.id}",
                      cache_policy=NO_CACHE, persist_result=False)(run_generate_start)
generate_finish = task(name="generate-finish", task_run_name="generate-finish-{row.id}",
                       cache_policy=NO_CACHE)(run_generate_finish)
