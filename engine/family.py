"""The pipeline family: one protocol for every mode, and the `Engine` that owns warm models.

    Engine(settings, device=…)           created at the edge (a worker, the CLI run); owns the cache
      .load_spec(model, quant_linear)    -> LoadSpec: resolved files, device cuda:N, dtype
      .pipeline(spec)                    -> a warm Pipeline (loaded once per spec.cache_key())
      .model_identity(spec)              -> files by name, size and content digest (row identity)
    load(spec, settings)                 -> the mode's Pipeline (engine/t2v.py, engine/i2v.py; dance next)
    Pipeline.generate(request)           -> GenerationResult (uint8 frames, timings, warnings)

Requests are frozen and typed per mode (engine/requests.py). Per-request settings (attention
backend, SLA top-k, steps, seed) apply at run time and never select or reload a model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch

from . import loading
from .cache import ModelCache, device_budget_bytes
from .config import WanConfig
from .digest import path_digest
from .errors import ModelMemoryError, RequestError
from .registry import ModelFiles, ModelSpec, get_model, resolve_files
from .requests import GenerationRequest
from .settings import EngineSettings

__all__ = [
    "WEIGHT_SEED",
    "EmbeddingStore",
    "Engine",
    "GenerationResult",
    "GroupedPipeline",
    "LoadSpec",
    "Pipeline",
    "estimate_bytes",
    "load",
]

log = logging.getLogger(__name__)

WEIGHT_SEED = 20260101   # seed of random weights (tiny presets, benchmarks); part of their identity


class EmbeddingStore(Protocol):
    """What a pipeline needs of a text-embedding cache (prompts.embedding_cache fits)."""
    def get(self, encoder_id: str, prompt: str) -> torch.Tensor | None: ...
    def put(self, encoder_id: str, prompt: str, tensor: torch.Tensor) -> object: ...


@dataclass
class GenerationResult:
    frames: np.ndarray                      # uint8 [T, H, W, 3]
    fps: int
    width: int
    height: int
    num_frames: int
    seed: int
    timings: dict[str, float]               # text_s, denoise_s, vae_s, total_s
    peak_vram_gb: float
    attention_type: str                     # the backend that ran (auto resolved)
    int8_path: str
    text_cache_hit: bool
    warnings: list[str] = field(default_factory=list)
    # Two-expert models (i2v): where the experts lived, what moving them cost this row (also in
    # timings: switch_s, expert_in_s), how many times an expert came onto the GPU for this row,
    # and the group of rows that shared those loads (the sequential policy).
    expert_policy: str = ""
    expert_loads: int = 0
    expert_group: int = 0
    sampler: str = ""                       # e.g. unipc-40-official-shift5 (dance); "" = rCM


@dataclass(frozen=True)
class LoadSpec:
    """Everything that selects loaded weights; nothing per-request."""
    model: ModelSpec
    files: ModelFiles                       # empty: seeded random weights
    device: torch.device                    # resolved: cuda:N, never bare "cuda"
    dtype: torch.dtype
    int8_kernels: bool = False
    fp8: bool = False                       # block linears converted to e4m3 at load (engine/fp8.py)

    def cache_key(self) -> tuple:
        stats = tuple((role, loading.file_identity(p) if p.is_file() else str(p)) for role, p in self.files)
        return (self.model.name, stats, str(self.dtype), self.int8_kernels, self.fp8, str(self.device))


class Pipeline(Protocol):
    """One loaded model of one mode."""
    load_spec: LoadSpec
    text_encoder_loads: int

    def prepare(self, expected_rows: int) -> None:
        """Warm-up decisions that depend on how many rows follow (compiling)."""

    def needs_prepare(self, expected_rows: int) -> bool:
        """Whether prepare(expected_rows) could change anything; False lets the engine service
        answer a shard's planning call without queueing behind the row on the GPU."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request of this pipeline's mode."""

    def rows_per_group(self, expected_rows: int) -> int:
        """How many rows the shard should hand over together (start all, then finish all):
        1, except for two-expert models under the sequential policy."""


class GroupedPipeline(Pipeline, Protocol):
    """A pipeline whose rows can pause between phases (engine/i2v.py, sequential policy)."""

    def start(self, request: GenerationRequest) -> object:
        """Everything up to the second expert; returns the paused row."""

    def finish(self, pending: object) -> GenerationResult:
        """The rest of a row `start` returned."""


def load(spec: LoadSpec, settings: EngineSettings, *, embedding_cache: EmbeddingStore | None = None,
         budget_bytes: int | None = None) -> Pipeline:
    """Build the pipeline of the spec's mode (no caching: see Engine.pipeline). `budget_bytes`
    (the GPU's VRAM budget) picks where a two-expert model keeps its experts."""
    if spec.model.mode == "t2v":
        from .t2v import WanT2VPipeline
        return WanT2VPipeline(spec, settings, embedding_cache=embedding_cache)
    if spec.model.mode == "i2v":
        from .i2v import WanI2VPipeline
        return WanI2VPipeline(spec, settings, embedding_cache=embedding_cache, budget_bytes=budget_bytes)
    if spec.model.mode == "dance":
        from .dance import SteadyDancerPipeline
        return SteadyDancerPipeline(spec, settings, embedding_cache=embedding_cache)
    raise RequestError("mode", spec.model.mode, "t2v | i2v | dance")


# The activations and decode buffers of a 14B DiT at 720p × 81 frames beside its weights: peak
# 35.95 GB with 28.6 GB of weights, measured on an H200 (docs/BENCHMARKS.md), with headroom.
WORKING_BYTES_720P = 8 * 2**30


def resident_dits(spec: ModelSpec, settings: EngineSettings, budget_bytes: int | None) -> int:
    """How many of the spec's DiTs sit on the GPU at once under the expert policy."""
    if len(spec.dits) == 1:
        return 1
    from .experts import choose_policy
    policy = choose_policy(settings.expert_policy, budget_bytes=budget_bytes,
                           expert_bytes=estimate_bytes(spec.config, 1), working_bytes=WORKING_BYTES_720P,
                           expected_rows=1)
    return len(spec.dits) if policy == "resident" else 1


def estimate_bytes(config: WanConfig, dits: int = 1) -> int:
    """Weights of the DiT(s) and VAE in bf16 (the text encoder is offloaded or counted by the caller)."""
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    per_block = 8 * d * d + 2 * d * f + 6 * d
    return int(dits * (n * per_block + 3 * d * d + d * config.text_dim) * 2
               + 260e6 * (config.vae.dim / 96) ** 2)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cuda -> cuda:<current>; None -> the current GPU, or the CPU without one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Engine:
    """What a worker owns: its settings, its device, its warm-model cache and its text cache."""

    def __init__(self, settings: EngineSettings, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, embedding_cache: EmbeddingStore | None = None,
                 random_weights: bool = False):
        self.settings = settings
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.embedding_cache = embedding_cache
        self.random_weights = random_weights     # benchmarks: real-size presets, no files
        self.cache: ModelCache[Pipeline] = ModelCache(
            device_budget_bytes(self.device, settings.vram_budget_gb))
        self._load_s: dict[tuple, float] = {}    # load seconds not yet reported by a row

    def load_spec(self, model: str, quant_linear: str = "auto", lora: str | None = None) -> LoadSpec:
        """`lora`: a LoRA file (a name in the checkpoints folder, or a path) merged into the DiT at
        load (dance's step-distill LoRA); part of the loaded weights' identity."""
        spec = get_model(model)
        if self.random_weights and not spec.random_init:
            if not self.settings.allow_random_weights:
                raise RequestError("random_weights", True,
                                   "only for benchmarks: set TURBO_ALLOW_RANDOM_WEIGHTS=1 to allow it")
            files = ModelFiles()
        else:
            overrides = {}
            if lora:
                if not any(f.role == "lora" for f in spec.files):
                    raise RequestError("lora", lora, f"no LoRA: {spec.name} takes none")
                root = self.settings.checkpoints_dir or Path("checkpoints")
                overrides["lora"] = Path(lora) if Path(lora).is_absolute() else root / lora
            files = resolve_files(spec, self.settings.checkpoints_dir,
                                  quant_linear="false" if quant_linear == "fp8" else quant_linear,
                                  overrides=overrides)
        return LoadSpec(model=spec, files=files, device=self.device, dtype=self.dtype,
                        int8_kernels=self.settings.int8_kernels, fp8=quant_linear == "fp8")

    def pipeline(self, spec: LoadSpec) -> Pipeline:
        """The warm pipeline for this spec, loading it on first use."""
        budget = self.cache.budget_bytes
        dits = resident_dits(spec.model, self.settings, budget)
        nbytes = estimate_bytes(spec.model.config, dits) if spec.device.type == "cuda" else 0
        def timed_load() -> Pipeline:
            t0 = time.perf_counter()
            pipeline = load(spec, self.settings, embedding_cache=self.embedding_cache, budget_bytes=budget)
            self._load_s[spec.cache_key()] = self._load_s.get(spec.cache_key(), 0.0) + time.perf_counter() - t0
            return pipeline

        return self.cache.get(spec.cache_key(), timed_load, nbytes=nbytes, name=spec.model.name)

    def warm_pipeline(self, spec: LoadSpec) -> Pipeline | None:
        """The spec's pipeline if it is loaded, else None; loads nothing."""
        return self.cache.peek(spec.cache_key())

    def take_load_seconds(self, spec: LoadSpec) -> float:
        """Seconds spent loading `spec` since the last call (0.0 when it stayed warm): the row that
        asks first is the one that paid, whichever call (planning, generate) did the loading."""
        return self._load_s.pop(spec.cache_key(), 0.0)

    def generate(self, spec: LoadSpec, request: GenerationRequest) -> GenerationResult:
        """Generate on the warm pipeline; CUDA out of memory frees every warm model, then fails the row."""
        try:
            return self.pipeline(spec).generate(request)
        except ModelMemoryError:
            self.cache.clear()     # the next row starts clean (it reloads what it needs)
            raise

    def start(self, spec: LoadSpec, request: GenerationRequest) -> object:
        """The first phase of a grouped row (a GroupedPipeline's `start`)."""
        try:
            return self._grouped(spec).start(request)
        except ModelMemoryError:
            self.cache.clear()
            raise

    def finish(self, spec: LoadSpec, pending: object) -> GenerationResult:
        """The rest of a row `start` paused."""
        try:
            return self._grouped(spec).finish(pending)
        except ModelMemoryError:
            self.cache.clear()
            raise

    def _grouped(self, spec: LoadSpec) -> GroupedPipeline:
        pipeline = self.pipeline(spec)
        if not hasattr(pipeline, "start"):
            raise TypeError(f"{spec.model.name} runs its rows whole (generate), not in phases")
        return cast(GroupedPipeline, pipeline)

    def model_identity(self, spec: LoadSpec) -> str:
        """What the row hash records of the weights: each file's name, size and content digest."""
        if spec.files.random:
            return f"{spec.model.name}/random-init-seed-{WEIGHT_SEED}"
        parts = [spec.model.name]
        for role, path in spec.files:
            size = path.stat().st_size if path.is_file() else 0
            parts.append(f"{role}={path.name}:{size}:sha256:{path_digest(path, self.settings.digest_cache_dir)}")
        return "|".join(parts)
