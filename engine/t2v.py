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

import torch

from .attention import resolve_attention
from .config import latent_shape
from .family import EmbeddingStore, GenerationResult, LoadSpec
from .requests import GenerationRequest, T2VRequest
from .sampler import rcm_sample
from .settings import EngineSettings
from .wan_pipeline import WanPipelineBase, memory_errors, sync

__all__ = ["WanT2VPipeline"]

log = logging.getLogger(__name__)


class WanT2VPipeline(WanPipelineBase):
    def __init__(self, load_spec: LoadSpec, settings: EngineSettings, *,
                 embedding_cache: EmbeddingStore | None = None,
                 offload_text_encoder: bool | None = None):
        super().__init__(load_spec, settings, embedding_cache=embedding_cache,
                         offload_text_encoder=offload_text_encoder)
        self.dit, self.int8_path = self.load_dit("dit")

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
        with memory_errors(f"generating {width}x{height}x{req.num_frames} on {self.config.name}"):
            return self._generate(req, width, height)

    @torch.inference_mode()
    def _generate(self, req: T2VRequest, width: int, height: int) -> GenerationResult:
        dev = self.device
        t0 = time.perf_counter()
        [emb], [warns], [hit] = self.encode_prompts([req.prompt])
        context = emb.to(dev, self.dtype)[None]
        sync(dev)
        t1 = time.perf_counter()

        shape = (1, *latent_shape(self.config, req.num_frames, width, height))
        gen = torch.Generator().manual_seed(req.seed)

        def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.dit(x.to(self.dtype), timestep, context)

        latents = rcm_sample(velocity, shape, sigma_max=req.sigma_max, num_steps=req.num_steps,
                             generator=gen, device=dev, ode=req.sampler == "ode")
        sync(dev)
        t2 = time.perf_counter()
        frames = self.decode_to_uint8(latents.to(self.dtype))
        frames_np = frames.cpu().numpy()
        t3 = time.perf_counter()
        peak = self.peak_vram_gb()
        return GenerationResult(
            frames=frames_np, fps=self.config.fps, width=width, height=height,
            num_frames=req.num_frames, seed=req.seed,
            timings={"text_s": t1 - t0, "denoise_s": t2 - t1, "vae_s": t3 - t2, "total_s": t3 - t0},
            peak_vram_gb=peak, attention_type=self.dit.attention.type.value, int8_path=self.int8_path,
            text_cache_hit=hit, warnings=warns)


