"""Pose-driven video (dance) with SteadyDancer-14B, as its `image2video_dancer.py` runs it.

    reference image ─ size: the preset's area, the image's aspect, multiples of 16 (floored) ─▶ (w, h)
    poses (npz from the pose stage: aligned and negative keypoints) ─ rendered on a 2× canvas in
        SteadyDancer's convention, resized to (w, h) ─▶ positive and negative pose frames
    VAE: y = mask ‖ enc(ref, F−1 zeros); ref_x = enc(ref) ‖ 1 ‖ enc(ref); ref_c = enc(pose 0) ‖ 0 ‖ …;
         pose latents of the positive and of the negative frames
    CLIP ViT-H: features of the reference and of the first pose frame (summed inside the DiT)
    umT5: the prompt, and Wan's negative prompt when text guidance runs
    flow UniPC (engine/flow_sampler.py): official = 40 steps, text CFG 5, pose CFG 1.5 inside step
        fractions (0.1, 0.4), shift 5 (3 at 480p sizes); fast = 4 steps, cfg 1, shift 5, with the
        step-distill LoRA merged at load
    VAE decode ─▶ uint8 frames

Attention is dense (SDPA): SteadyDancer was not trained for SLA.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import loading
from .conditioning import load_rgb
from .config import latent_shape
from .errors import CheckpointError, RequestError
from .family import WEIGHT_SEED, EmbeddingStore, GenerationResult, LoadSpec
from .flow_sampler import FAST, OFFICIAL, Guidance, guided_unipc_sample, unipc_scheduler
from .requests import DanceRequest, GenerationRequest
from .settings import EngineSettings
from .wan_pipeline import WanPipelineBase, memory_errors, sync

__all__ = ["NEGATIVE_PROMPT", "SteadyDancerPipeline", "dance_size"]

log = logging.getLogger(__name__)

# Wan2.1 I2V's default negative prompt (wan/configs: "镜头晃动，" + the shared one), the null text
# of SteadyDancer's text guidance.
NEGATIVE_PROMPT = ("镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
                   "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
                   "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                   "三条腿，背景人很多，倒着走")
POSE_CANVAS_SCALE = 2          # SteadyDancer renders poses at twice the generation size


def dance_size(area: int, image: tuple[int, int]) -> tuple[int, int]:
    """(w, h) as SteadyDancer picks it: the area of the preset size, the image's aspect, each latent
    side floored to an even number (pixels: multiples of 16)."""
    aspect = image[1] / image[0]
    lat_h = max(2, int(math.sqrt(area * aspect) // 8 // 2 * 2))
    lat_w = max(2, int(math.sqrt(area / aspect) // 8 // 2 * 2))
    return lat_w * 8, lat_h * 8


def read_dancer_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The official sharded folder (or its index file), else one file in a mapped single-file layout."""
    from .sharded import read_sharded_state_dict, read_single_file_dancer
    if path.is_dir() or path.name.endswith(".safetensors.index.json"):
        return read_sharded_state_dict(path)
    return read_single_file_dancer(path)


def _to_unit(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] float32 in [-1, 1]."""
    t = torch.from_numpy(np.array(frames, copy=True)).to(device).permute(3, 0, 1, 2).float()
    return t / 127.5 - 1.0


def _bicubic(video: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[3, F, H, W] -> [3, F, height, width], as torch's bicubic interpolate (the official resize)."""
    return F.interpolate(video.transpose(0, 1), size=(height, width), mode="bicubic").transpose(0, 1)


def _resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                     for f in frames])


class SteadyDancerPipeline(WanPipelineBase):
    build_attention = "original"
    def __init__(self, load_spec: LoadSpec, settings: EngineSettings, *,
                 embedding_cache: EmbeddingStore | None = None, offload_text_encoder: bool | None = None):
        super().__init__(load_spec, settings, embedding_cache=embedding_cache,
                         offload_text_encoder=offload_text_encoder)
        self.dit = self._load_dit()
        self.clip = self._load_clip()
        self.int8_path = "none"
        self.lora = self.files.get("lora")

    # -- loading -------------------------------------------------------------------------------
    def _load_dit(self):
        from .dance_dit import SteadyDancerDiT
        cfg, dancer = self.config, self.load_spec.model.dancer
        if dancer is None:
            raise CheckpointError(cfg.name, "a dance preset needs SteadyDancer's pose configuration")
        path = self.files.get("dit")
        if path is None:
            return loading.build_random(lambda: SteadyDancerDiT(cfg, dancer), seed=WEIGHT_SEED, device=self.device,
                                        dtype=self.dtype)
        state = read_dancer_checkpoint(path)
        lora = self.files.get("lora")
        if lora is not None:
            from .lora import merge_lora, read_lora
            state, report = merge_lora(state, read_lora(lora))
            log.info("%s: merged %s (%s)", cfg.name, lora.name, report)
        return loading.load_module(lambda: SteadyDancerDiT(cfg, dancer), path, device=self.device,
                                   dtype=self.dtype, state=state)

    def _load_clip(self):
        from .clip import CLIPVisionH, load_clip
        ccfg = self.load_spec.model.clip
        if ccfg is None:
            raise CheckpointError(self.config.name, "a dance preset needs a CLIP image encoder")
        path = self.files.get("clip")
        if path is None:
            return loading.build_random(lambda: CLIPVisionH(ccfg), seed=WEIGHT_SEED + 4, device=self.device,
                                        dtype=self.dtype)
        return load_clip(path, device=self.device, dtype=self.dtype, config=ccfg)

    # -- generation ----------------------------------------------------------------------------
    def guidance(self, req: DanceRequest) -> Guidance:
        if req.guidance == "fast" or (req.guidance == "auto" and self.lora is not None):
            return FAST
        return Guidance(text_scale=req.guide_scale, pose_scale=req.pose_guide_scale,
                        pose_window=OFFICIAL.pose_window)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if not isinstance(request, DanceRequest):
            raise TypeError(f"{self.config.name} is a dance model: it takes a DanceRequest, "
                            f"not {type(request).__name__}")
        req = request.validated(self.config)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with memory_errors(f"on {self.config.name}"):
            return self._generate(req)

    @torch.inference_mode()
    def _generate(self, req: DanceRequest) -> GenerationResult:
        from pose.keypoints import PoseSequence
        from pose.render import render_sequence
        dev, timings = self.device, {}
        t0 = time.perf_counter()
        image = load_rgb(req.image)
        preset = self.config.size(req.resolution, req.aspect_ratio)
        width, height = dance_size(preset[0] * preset[1], image.size)
        shift = req.shift if req.shift is not None else (3.0 if width * height <= 832 * 480 else 5.0)
        guidance = self.guidance(req)

        frames: dict[str, np.ndarray] = {}
        for name, path in (("positive", req.poses), ("negative", req.negative_poses)):
            if name == "negative" and guidance.pose_scale == 0.0:
                continue
            seq = PoseSequence.load_npz(Path(path))
            if len(seq.keypoints) < req.num_frames:
                raise RequestError("poses", path, f"{req.num_frames} pose frames (this file has "
                                                  f"{len(seq.keypoints)})")
            canvas = render_sequence(seq, width * POSE_CANVAS_SCALE, height * POSE_CANVAS_SCALE)
            frames[name] = _resize_frames(canvas[:req.num_frames], *image.size)   # to the reference's size
        timings["render_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        prompts = [req.prompt] + ([NEGATIVE_PROMPT] if guidance.text_scale != 1.0 else [])
        embeddings, warns, hits = self.encode_prompts(prompts)
        context = embeddings[0].to(dev, self.dtype)[None]
        context_null = embeddings[1].to(dev, self.dtype)[None] if len(embeddings) > 1 else None
        sync(dev)
        timings["text_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        # As the official script: CLIP sees the reference at its own size and the first pose
        # frame resized to it; the VAE gets both bicubically resized to (w, h).
        native = _to_unit(np.asarray(image)[None], dev)                      # [3, 1, H0, W0]
        ref_t = _bicubic(native, width, height)                               # [3, 1, h, w]
        pos_t = _bicubic(_to_unit(frames["positive"], dev), width, height)    # [3, F, h, w]
        clip_x = self.clip.encode(native.permute(1, 0, 2, 3).to(self.dtype))  # [1, 257, 1280]
        clip_c = self.clip.encode(_to_unit(frames["positive"][:1], dev).permute(1, 0, 2, 3).to(self.dtype))
        vae = self.vae
        zeros = torch.zeros(3, req.num_frames - 1, height, width, device=dev)
        image_lat = vae.encode(torch.cat([ref_t, zeros], dim=1)[None])       # [1, 16, T, h/8, w/8]
        _, lt, lh, lw = latent_shape(self.config, req.num_frames, width, height)
        mask = torch.zeros(1, 4, lt, lh, lw, device=dev)
        mask[:, :, 0] = 1.0
        y = torch.cat([mask, image_lat], dim=1).to(self.dtype)
        ref_lat = vae.encode(ref_t[None])                                     # [1, 16, 1, h/8, w/8]
        ones, nothing = torch.ones_like(ref_lat[:, :4]), torch.zeros_like(ref_lat[:, :4])
        ref_x = torch.cat([ref_lat, ones, ref_lat], dim=1).to(self.dtype)
        pose0 = vae.encode(pos_t[:, :1][None])
        ref_c = torch.cat([pose0, nothing, pose0], dim=1).to(self.dtype)
        pose_lat = {"positive": vae.encode(pos_t[None]).to(self.dtype)}
        if "negative" in frames:
            neg_t = _bicubic(_to_unit(frames["negative"], dev), width, height)
            pose_lat["negative"] = vae.encode(neg_t[None]).to(self.dtype)
        sync(dev)
        timings["image_s"] = time.perf_counter() - t2

        gen = torch.Generator().manual_seed(req.seed)
        noise = torch.randn((1, *latent_shape(self.config, req.num_frames, width, height)), generator=gen).to(dev)
        step_s: dict[str, list[float]] = {"with_pose_cfg": [], "without_pose_cfg": []}
        last = [time.perf_counter()]

        def predict(branch: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ctx = context_null if branch == "null_text" else context
            pose = pose_lat["negative" if branch == "null_pose" else "positive"]
            return self.dit(x.to(self.dtype), t.expand(1).float(), ctx, y=y, pose=pose, ref_x=ref_x, ref_c=ref_c,
                            clip_fea_x=clip_x, clip_fea_c=clip_c)

        def on_step(_: int, branches: list[str]) -> None:
            sync(dev)
            now = time.perf_counter()
            step_s["with_pose_cfg" if "null_pose" in branches else "without_pose_cfg"].append(now - last[0])
            log.info("dance step %d/%d (%s): %.2f s", _ + 1, req.num_steps, "+".join(branches), now - last[0])
            last[0] = now

        unipc_scheduler(req.num_steps, shift)     # imports diffusers outside the timed steps
        t3 = time.perf_counter()
        last[0] = t3
        latents = guided_unipc_sample(predict, noise, steps=req.num_steps, shift=shift, guidance=guidance,
                                      on_step=on_step)
        sync(dev)
        t4 = time.perf_counter()
        timings["denoise_s"] = t4 - t3
        out = self.decode_to_uint8(latents.to(self.dtype)).cpu().numpy()
        timings["vae_s"] = time.perf_counter() - t4
        timings["total_s"] = time.perf_counter() - t0
        for key, values in step_s.items():
            if values:
                timings[f"step_{key}_s"] = float(np.median(values))
        return GenerationResult(
            frames=out, fps=self.config.fps, width=width, height=height, num_frames=req.num_frames,
            seed=req.seed, timings=timings, peak_vram_gb=self.peak_vram_gb(), attention_type="original",
            int8_path=self.int8_path, text_cache_hit=all(hits), warnings=[w for ws in warns for w in ws],
            sampler=f"unipc-{req.num_steps}-{'fast' if guidance is FAST else 'official'}-shift{shift:g}")
