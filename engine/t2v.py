"""Text-to-video: prompt → umT5 → rCM sampler over the Wan DiT → Wan VAE → uint8 frames.

`WanT2VPipeline` is the t2v member of the pipeline family (engine/family.py): built once per
`LoadSpec` by the `Engine` that owns it, then `generate()` per request. The umT5 encoder loads
lazily, only for prompts missing from the embedding cache, so a shard whose prompts are all
cached never loads it. The request's attention backend and SLA top-k are applied to the loaded
DiT before each run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import torch

from . import loading
from .attention import AttentionSpec, resolve_attention
from .config import latent_shape
from .errors import ModelMemoryError
from .family import WEIGHT_SEED, EmbeddingStore, GenerationResult, LoadSpec
from .int8 import convert_int8_for_runtime, swap_block_linears_for_int8
from .requests import GenerationRequest, T2VRequest
from .sampler import rcm_sample
from .settings import EngineSettings
from .umt5 import HashTokenizer, TextEncoder, UMT5Encoder, load_tokenizer
from .wan_dit import WanDiT, adapt_checkpoint
from .wan_vae import WanVAE

__all__ = ["WanT2VPipeline", "prepare_vae_for_device"]

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WanT2VPipeline:
    def __init__(self, load_spec: LoadSpec, settings: EngineSettings, *,
                 embedding_cache: EmbeddingStore | None = None,
                 offload_text_encoder: bool | None = None):
        self.load_spec, self.settings = load_spec, settings
        self.config = load_spec.model.config
        self.files, self.device, self.dtype = load_spec.files, load_spec.device, load_spec.dtype
        # The build-time backend: the kernels are built whenever installed, whatever the request.
        self.attention = AttentionSpec(type=resolve_attention("auto", self.device))
        self.embedding_cache = embedding_cache
        self.offload_text_encoder = (self.config.param_billions >= 5) if offload_text_encoder is None \
            else offload_text_encoder
        self._text_encoder: TextEncoder | None = None
        self.text_encoder_loads = 0
        self.dit, self.int8_path = self._load_dit()
        self.compiled = False
        self.vae = self._load_vae()

    # -- loading -------------------------------------------------------------------------------
    def _load_dit(self) -> tuple[WanDiT, str]:
        cfg, spec = self.config, self.attention
        path = self.files.get("dit")
        if path is None:
            return cast(WanDiT, loading.build_random(lambda: WanDiT(cfg, spec), seed=WEIGHT_SEED,
                                                     device=self.device, dtype=self.dtype)), "bf16"
        state = adapt_checkpoint(loading.read_state_dict(path))
        quantized = any(k.endswith(".int8_weight") for k in state)

        def build() -> WanDiT:
            model = WanDiT(cfg, spec)
            if quantized:
                swap_block_linears_for_int8(model)
            return model

        int8_path = ["none"]

        def convert(model: torch.nn.Module) -> None:
            if quantized:
                int8_path[0] = convert_int8_for_runtime(model, self.device,
                                                        prefer_int8_kernels=self.load_spec.int8_kernels)

        dit = loading.load_module(build, path, device=self.device, dtype=self.dtype,
                                  state=state, convert=convert)
        return dit, int8_path[0]  # type: ignore[return-value]

    def _build(self, make: Callable[[], torch.nn.Module], path: Path | None, seed_offset: int):
        """From the file when there is one, else seeded random weights through the same class."""
        if path is None:
            return loading.build_random(make, seed=WEIGHT_SEED + seed_offset, device=self.device,
                                        dtype=self.dtype)
        return loading.load_module(make, path, device=self.device, dtype=self.dtype)

    def _load_vae(self) -> WanVAE:
        vcfg = self.config.vae
        return prepare_vae_for_device(self._build(lambda: WanVAE(vcfg), self.files.get("vae"), 1))

    def _load_text_encoder(self) -> TextEncoder:
        ucfg = self.config.umt5
        encoder = self._build(lambda: UMT5Encoder(ucfg), self.files.get("text_encoder"), 2)
        folder = self.files.get("tokenizer")
        tokenizer = load_tokenizer(folder) if folder else HashTokenizer(ucfg.vocab_size)
        self.text_encoder_loads += 1
        return TextEncoder(encoder, tokenizer, self.config.text_len)

    @property
    def text_encoder_id(self) -> str:
        path = self.files.get("text_encoder")
        if path is None:
            return f"{self.config.name}:random:{WEIGHT_SEED + 2}"
        return loading.file_identity(path) + ":" + str(self.files.get("tokenizer"))

    def prepare(self, expected_rows: int) -> None:
        """Compile the DiT's blocks when enough rows will run to pay for it.

        Regional compile costs about 16 s at 1.3B-480p on an H100 (the first row of each shape)
        and saves roughly a quarter of each denoise; on a 5-row shard it is a net loss (measured
        with bench/pools.py). TURBO_COMPILE=1 forces it, 0 disables it; by default it runs when
        at least TURBO_COMPILE_MIN_ROWS rows (30, or 8 for presets of 5B+ parameters) are coming.
        """
        mode = self.settings.compile
        if self.compiled or self.device.type != "cuda" or mode == "0":
            return
        default_min = 8 if self.config.param_billions >= 5 else 30
        min_rows = self.settings.compile_min_rows or default_min
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
                embedding = emb[0].detach()
                out[i], warns[i] = embedding, list(w)
                if self.embedding_cache is not None:
                    self.embedding_cache.put(self.text_encoder_id, prompts[i], embedding.cpu())
            if self.offload_text_encoder:
                self._text_encoder.offload()
        return [t for t in out if t is not None], warns, hits

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        if not isinstance(request, T2VRequest):
            raise TypeError(f"{self.config.name} is a t2v model: it takes a T2VRequest, "
                            f"not {type(request).__name__}")
        req = request.validated(self.config)
        width, height = self.config.size(req.resolution, req.aspect_ratio)
        dev = self.device
        # Per request, on the loaded weights: which backend runs, and SLA's top-k.
        self.dit.set_attention(resolve_attention(req.attention_type, dev), req.sla_topk)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            return self._generate(req, width, height)
        except torch.cuda.OutOfMemoryError as e:
            # The owner (Engine.generate) frees every warm model on this error.
            raise ModelMemoryError(
                f"CUDA out of memory generating {width}x{height}x{req.num_frames} on "
                f"{self.config.name}: {e}".splitlines()[0]) from e

    @torch.inference_mode()
    def _generate(self, req: T2VRequest, width: int, height: int) -> GenerationResult:
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
            peak_vram_gb=peak, attention_type=self.dit.attention.type.value, int8_path=self.int8_path,
            text_cache_hit=hit, warnings=warns)


def prepare_vae_for_device(vae: WanVAE) -> WanVAE:
    """On CUDA: channels-last convolutions and cuDNN autotuning (the decode runs the same few
    conv shapes once per latent frame, so the one-time search pays back within a video)."""
    if vae.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        vae.use_channels_last()
    return vae
