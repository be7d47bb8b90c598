"""Text-to-video: prompt → umT5 → rCM sampler over the Wan DiT → Wan VAE → uint8 frames.

`get_pipeline()` returns a warm pipeline from the process-wide cache; `generate()` runs one
request. The umT5 encoder loads lazily, only for prompts missing from the embedding cache, so a
shard whose prompts are all cached never loads it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import loading
from .attention import AttentionSpec, resolve_attention
from .cache import ModelCache, default_budget_bytes
from .config import AttentionType, GenerationRequest, WanConfig, latent_shape
from .errors import CheckpointError, ModelMemoryError, RequestError
from .int8 import convert_int8_for_runtime, swap_block_linears_for_int8
from .sampler import rcm_sample
from .umt5 import HashTokenizer, TextEncoder, UMT5Encoder, load_tokenizer
from .wan_dit import WanDiT
from .wan_vae import WanVAE

log = logging.getLogger(__name__)

WEIGHT_SEED = 20260101   # seed of the tiny preset's random weights; part of its identity
ALLOW_RANDOM_ENV = "TURBO_ALLOW_RANDOM_WEIGHTS"


class EmbeddingStore(Protocol):
    """What the pipeline needs of a text-embedding cache (prompts.embedding_cache fits)."""
    def get(self, encoder_id: str, prompt: str) -> torch.Tensor | None: ...
    def put(self, encoder_id: str, prompt: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class ModelFiles:
    """Resolved checkpoint paths; None for a part built from seeded random weights."""
    dit: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None

    def identity(self) -> tuple[str, ...]:
        return tuple(loading.file_identity(p) if p and p.is_file() else str(p)
                     for p in (self.dit, self.vae, self.text_encoder, self.tokenizer))


def resolve_files(
    config: WanConfig,
    checkpoints_dir: str | os.PathLike[str] | None = None,
    *,
    quant_linear: str = "auto",
    dit: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    text_encoder: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> ModelFiles:
    """Find each file under the checkpoints folder by TurboDiffusion's names; explicit paths win.

    quant_linear: "true" wants the -quant DiT, "false" the bf16 one, "auto" the bf16 one when
    present, else the -quant one. Missing files raise CheckpointError naming every missing path.
    """
    if config.random_init and not any((checkpoints_dir, dit, vae, text_encoder, tokenizer)):
        return ModelFiles()
    root = Path(checkpoints_dir or os.environ.get("CHECKPOINTS_DIR") or "checkpoints")
    names = config.files

    def pick_dit() -> Path:
        if dit:
            return Path(dit)
        plain, quant = root / names.dit, root / names.dit_quant
        if quant_linear == "true":
            return quant
        if quant_linear == "false" or plain.is_file() or not names.dit_quant:
            return plain
        return quant if quant.is_file() else plain

    files = ModelFiles(
        dit=pick_dit(),
        vae=Path(vae) if vae else root / names.vae,
        text_encoder=Path(text_encoder) if text_encoder else root / names.text_encoder,
        tokenizer=Path(tokenizer) if tokenizer else (root / names.tokenizer if names.tokenizer else None),
    )
    missing = [str(p) for p in (files.dit, files.vae, files.text_encoder) if not p.is_file()]
    if files.tokenizer is not None and not files.tokenizer.is_dir():
        missing.append(f"{files.tokenizer}/ (umT5 tokenizer folder)")
    if missing:
        raise CheckpointError(root, f"missing checkpoint files for {config.name}: " + ", ".join(missing)
                              + " (see README, section Checkpoints)")
    return files


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
    attention_type: str
    int8_path: str
    text_cache_hit: bool
    warnings: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WanT2VPipeline:
    def __init__(
        self,
        config: WanConfig,
        files: ModelFiles,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention: AttentionSpec,
        embedding_cache: EmbeddingStore | None = None,
        random_weights: bool = False,
        offload_text_encoder: bool | None = None,
    ):
        self.config, self.files, self.device, self.dtype = config, files, device, dtype
        self.attention = attention
        self.embedding_cache = embedding_cache
        self.random_weights = random_weights or files.dit is None
        self.offload_text_encoder = (config.param_billions >= 5) if offload_text_encoder is None \
            else offload_text_encoder
        self._text_encoder: TextEncoder | None = None
        self.text_encoder_loads = 0
        self.dit, self.int8_path = self._load_dit()
        self.compiled = False
        self.vae = self._load_vae()

    # -- loading -------------------------------------------------------------------------------
    def _load_dit(self) -> tuple[WanDiT, str]:
        cfg, spec = self.config, self.attention
        if self.random_weights:
            return loading.build_random(lambda: WanDiT(cfg, spec), seed=WEIGHT_SEED,
                                        device=self.device, dtype=self.dtype), "bf16"
        assert self.files.dit is not None
        state = loading.read_state_dict(self.files.dit)
        quantized = any(k.endswith(".int8_weight") for k in state)

        def build() -> WanDiT:
            model = WanDiT(cfg, spec)
            if quantized:
                swap_block_linears_for_int8(model)
            return model

        path = ["none"]

        def convert(model: torch.nn.Module) -> None:
            path[0] = convert_int8_for_runtime(model, self.device) if quantized else "none"

        dit = loading.load_module(build, self.files.dit, device=self.device, dtype=self.dtype,
                                  state=state, convert=convert)
        return dit, path[0]  # type: ignore[return-value]

    def _build(self, make: Callable[[], torch.nn.Module], path: Path | None, seed_offset: int):
        """From the file when there is one, else seeded random weights through the same class."""
        if path is None:
            return loading.build_random(make, seed=WEIGHT_SEED + seed_offset, device=self.device,
                                        dtype=self.dtype)
        return loading.load_module(make, path, device=self.device, dtype=self.dtype)

    def _load_vae(self) -> WanVAE:
        vcfg = self.config.vae
        return prepare_vae_for_device(self._build(lambda: WanVAE(vcfg), self.files.vae, 1))

    def _load_text_encoder(self) -> TextEncoder:
        ucfg = self.config.umt5
        encoder = self._build(lambda: UMT5Encoder(ucfg), self.files.text_encoder, 2)
        tokenizer = load_tokenizer(self.files.tokenizer) if self.files.tokenizer else \
            HashTokenizer(ucfg.vocab_size)
        self.text_encoder_loads += 1
        return TextEncoder(encoder, tokenizer, self.config.text_len)

    @property
    def text_encoder_id(self) -> str:
        if self.files.text_encoder is None:
            return f"{self.config.name}:random:{WEIGHT_SEED + 2}"
        return loading.file_identity(self.files.text_encoder) + ":" + str(self.files.tokenizer)

    def prepare(self, expected_rows: int) -> None:
        """Compile the DiT's blocks when enough rows will run to pay for it.

        Regional compile costs about 16 s at 1.3B-480p on an H100 (the first row of each shape)
        and saves roughly a quarter of each denoise; on a 5-row shard it is a net loss (measured
        with bench/pools.py). TURBO_COMPILE=1 forces it, 0 disables it; by default it runs when
        at least TURBO_COMPILE_MIN_ROWS rows (30, or 8 for presets of 5B+ parameters) are coming.
        """
        mode = os.environ.get("TURBO_COMPILE", "auto")
        if self.compiled or self.device.type != "cuda" or mode == "0":
            return
        default_min = 8 if self.config.param_billions >= 5 else 30
        min_rows = int(os.environ.get("TURBO_COMPILE_MIN_ROWS", default_min))
        if mode == "1" or expected_rows >= min_rows:
            self.dit.compile_blocks()
            self.compiled = True

    # -- text --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], list[list[str]], list[bool]]:
        """Embeddings [text_len, dim] per prompt, their warnings, and whether each hit the cache."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        warns: list[list[str]] = [[] for _ in prompts]
        todo: list[int] = []
        for i, p in enumerate(prompts):
            cached = self.embedding_cache.get(self.text_encoder_id, p) if self.embedding_cache else None
            if cached is not None:
                out[i], hits[i] = cached, True
            else:
                todo.append(i)
        if todo:
            if self._text_encoder is None:
                self._text_encoder = self._load_text_encoder()
            self._text_encoder.encoder.to(self.device)
            for i in todo:
                emb, w = self._text_encoder.encode([prompts[i]])
                out[i], warns[i] = emb[0].detach(), list(w)
                if self.embedding_cache is not None:
                    self.embedding_cache.put(self.text_encoder_id, prompts[i], out[i].cpu())
            if self.offload_text_encoder:
                self._text_encoder.offload()
        return [t for t in out if t is not None], warns, hits

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        req = request.validated(self.config)
        width, height = self.config.size(req.resolution, req.aspect_ratio)
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            return self._generate(req, width, height)
        except torch.cuda.OutOfMemoryError as e:
            # Free what this row allocated and the warm models, so the next row starts clean.
            get_model_cache().clear()
            raise ModelMemoryError(
                f"CUDA out of memory generating {width}x{height}x{req.num_frames} on "
                f"{self.config.name}: {e}".splitlines()[0]) from e

    @torch.inference_mode()
    def _generate(self, req: GenerationRequest, width: int, height: int) -> GenerationResult:
        dev = self.device
        t0 = time.perf_counter()
        [emb], [warns], [hit] = self.encode_prompts([req.prompt])
        context = emb.to(dev, self.dtype)[None]
        _sync(dev)
        t1 = time.perf_counter()

        shape = (1, *latent_shape(self.config, req.num_frames, width, height))
        gen = torch.Generator().manual_seed(req.seed)

        def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.dit(x.to(self.dtype), timestep, context)

        latents = rcm_sample(velocity, shape, sigma_max=req.sigma_max, num_steps=req.num_steps,
                             generator=gen, device=dev, ode=req.sampler == "ode")
        _sync(dev)
        t2 = time.perf_counter()
        frames = self.vae.decode_to_uint8(latents.to(self.dtype))
        frames_np = frames.cpu().numpy()
        t3 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0
        return GenerationResult(
            frames=frames_np, fps=self.config.fps, width=width, height=height,
            num_frames=req.num_frames, seed=req.seed,
            timings={"text_s": t1 - t0, "denoise_s": t2 - t1, "vae_s": t3 - t2, "total_s": t3 - t0},
            peak_vram_gb=peak, attention_type=self.attention.type.value, int8_path=self.int8_path,
            text_cache_hit=hit, warnings=warns)


def prepare_vae_for_device(vae: WanVAE) -> WanVAE:
    """On CUDA: channels-last convolutions and cuDNN autotuning (the decode runs the same few
    conv shapes once per latent frame, so the one-time search pays back within a video)."""
    if vae.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        vae.use_channels_last()
    return vae


def estimate_bytes(config: WanConfig) -> int:
    """Weights of the DiT and VAE in bf16 (the text encoder is offloaded or counted by the caller)."""
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    per_block = 8 * d * d + 2 * d * f + 6 * d
    return int((n * per_block + 3 * d * d + d * config.text_dim) * 2 + 260e6 * (config.vae.dim / 96) ** 2)


# -- the process-wide cache -------------------------------------------------------------------
_CACHE: ModelCache[WanT2VPipeline] | None = None


def get_model_cache() -> ModelCache[WanT2VPipeline]:
    global _CACHE
    if _CACHE is None:
        _CACHE = ModelCache(default_budget_bytes())
    return _CACHE


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def get_pipeline(
    model: str,
    *,
    checkpoints_dir: str | os.PathLike[str] | None = None,
    attention_type: str = "auto",
    sla_topk: float = 0.1,
    quant_linear: str = "auto",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    embedding_cache: EmbeddingStore | None = None,
    random_weights: bool = False,
    files: ModelFiles | None = None,
) -> WanT2VPipeline:
    """A warm pipeline for this model and configuration, loading it on first use."""
    config = WanConfig.from_name(model)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if random_weights and not config.random_init and os.environ.get(ALLOW_RANDOM_ENV) != "1":
        raise RequestError("random_weights", True,
                           f"only for benchmarks: set {ALLOW_RANDOM_ENV}=1 to allow it")
    if files is None:
        files = ModelFiles() if random_weights else resolve_files(
            config, checkpoints_dir, quant_linear=quant_linear)
    spec = AttentionSpec(type=resolve_attention(attention_type, device), topk=float(sla_topk))
    key = (config.name, files.identity(), str(dtype), str(device), spec, quant_linear, random_weights)
    pipe = get_model_cache().get(
        key,
        lambda: WanT2VPipeline(config, files, device=device, dtype=dtype, attention=spec,
                               embedding_cache=embedding_cache, random_weights=random_weights),
        nbytes=estimate_bytes(config) if device.type == "cuda" else 0,
        name=config.name)
    pipe.embedding_cache = embedding_cache or pipe.embedding_cache
    return pipe


__all__ = ["AttentionType", "GenerationResult", "ModelFiles", "WanT2VPipeline", "get_pipeline",
           "get_model_cache", "resolve_files"]
