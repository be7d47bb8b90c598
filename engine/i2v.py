"""Image-to-video with Wan2.2 A14B: two 14B experts, as TurboDiffusion's `wan2.2_i2v_infer.py` runs it.

    image ─ engine/conditioning.py ─▶ [-1, 1] frame + F−1 zero frames ─ VAE encode ─▶ latents
    y = cat(first-frame mask (4 ch), latents (16 ch));  the DiT sees cat(x, y): 36 channels
    prompt ─ umT5 (or the embedding cache) ─▶ context; the encoder is offloaded after encoding
    rCM steps (sigma_max 200): the high-noise expert until the first t below `boundary`, then
    the low-noise one (4 steps: t 0.995, 0.934 high; 0.853, 0.609 low) ─▶ VAE decode ─▶ uint8

A row runs in two phases, `start` (conditioning and the high-noise steps) and `finish` (the
low-noise steps and the decode), so that under the sequential policy the shard can start a group
of rows, then finish them, moving each expert onto the GPU once per group. `generate` is both
phases back to back. Where the experts live is engine/experts.py's.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import AttentionSpec, resolve_attention
from .conditioning import adaptive_size, first_frame_mask, image_to_tensor, load_rgb
from .config import latent_shape
from .errors import RequestError
from .experts import Activation, ExpertSet, choose_policy
from .family import WORKING_BYTES_720P, EmbeddingStore, GenerationResult, LoadSpec, estimate_bytes
from .requests import GenerationRequest, I2VRequest
from .sampler import RcmState, expert_schedule, rcm_start, rcm_step
from .settings import EngineSettings
from .wan_dit import WanDiT
from .wan_pipeline import WanPipelineBase, memory_errors, sync

__all__ = ["I2VPending", "WanI2VPipeline"]

log = logging.getLogger(__name__)

HIGH, LOW = "dit_high", "dit_low"
_ROLE = {"high": HIGH, "low": LOW}


@dataclass
class I2VPending:
    """A row between its phases: the sampler state and its conditioning (a few tens of MB)."""
    request: I2VRequest
    width: int
    height: int
    state: RcmState
    context: torch.Tensor
    y: torch.Tensor
    roles: list[str]                                  # the expert of each step
    group: int
    warnings: list[str]
    text_cache_hit: bool
    timings: dict[str, float] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)
    activations: dict[int, Activation] = field(default_factory=dict)   # step index -> what it cost


class WanI2VPipeline(WanPipelineBase):
    def __init__(self, load_spec: LoadSpec, settings: EngineSettings, *,
                 embedding_cache: EmbeddingStore | None = None, budget_bytes: int | None = None,
                 offload_text_encoder: bool | None = None):
        super().__init__(load_spec, settings, embedding_cache=embedding_cache,
                         offload_text_encoder=offload_text_encoder)
        roles = load_spec.model.dits
        if roles != (HIGH, LOW):
            raise ValueError(f"{self.config.name}: an i2v preset has the DiT roles {HIGH}, {LOW}, not {roles}")
        self.budget_bytes = budget_bytes
        self.int8_paths: dict[str, str] = {}
        self.experts = ExpertSet(roles, load=self._load_expert, policy=self._policy(1), device=self.device)
        self.experts.activate(HIGH)        # every request starts on it; the low expert loads when needed
        self._group, self._last_phase = 0, "finish"

    @property
    def policy(self) -> str:
        return self.experts.policy

    @property
    def int8_path(self) -> str:
        return ",".join(sorted(set(self.int8_paths.values()))) or "none"

    def _policy(self, expected_rows: int) -> str:
        return choose_policy(self.settings.expert_policy, budget_bytes=self.budget_bytes,
                             expert_bytes=estimate_bytes(self.config, 1), working_bytes=WORKING_BYTES_720P,
                             expected_rows=expected_rows)

    def _load_expert(self, role: str) -> WanDiT:
        dit, path = self.load_dit(role)
        self.int8_paths[role] = path
        if self.compiled:
            dit.compile_blocks()
        dit.set_attention(self.attention.type, self.attention.topk)
        log.info("%s: %s loaded (%s policy)", self.config.name, role, self.policy)
        return dit

    def loaded_dits(self) -> list[torch.nn.Module]:
        return list(self.experts.loaded())

    def prepare(self, expected_rows: int) -> None:
        """Compile when enough rows follow, and (auto policy) pick swap or sequential for them."""
        if self.policy == "swap" and self.settings.expert_policy == "auto":
            self.experts.policy = self._policy(expected_rows)     # sequential once a batch comes
        super().prepare(expected_rows)

    def needs_prepare(self, expected_rows: int) -> bool:
        """Under the auto policy, swap turns sequential once a batch comes (prepare below)."""
        return (self.policy == "swap" and self.settings.expert_policy == "auto") or super().needs_prepare(expected_rows)

    def rows_per_group(self, expected_rows: int) -> int:
        """TURBO_EXPERT_GROUP_ROWS under the sequential policy while more rows follow (the shard
        finishes a short last group when it ends), else 1."""
        return self.settings.expert_group_rows if self.policy == "sequential" and expected_rows > 1 else 1

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.finish(self.start(request))

    def start(self, request: GenerationRequest) -> I2VPending:
        """Validate, condition, and run the steps up to the switch to the low-noise expert."""
        if not isinstance(request, I2VRequest):
            raise TypeError(f"{self.config.name} is an i2v model: it takes an I2VRequest, "
                            f"not {type(request).__name__}")
        req = request.validated(self.config)
        if self._last_phase == "finish":
            self._group += 1
        self._last_phase = "start"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with memory_errors(f"on {self.config.name}"):
            pending = self._condition(req)
            self._run_steps(pending, "high")
        return pending

    def finish(self, pending: object) -> GenerationResult:
        """The low-noise steps and the decode of a row `start` returned."""
        if not isinstance(pending, I2VPending):
            raise TypeError(f"finish takes what start returned, not {type(pending).__name__}")
        self._last_phase = "finish"
        with memory_errors(f"on {self.config.name}"):
            self._run_steps(pending, "low")
            return self._decode(pending)

    def _size(self, req: I2VRequest, image_size: tuple[int, int]) -> tuple[int, int]:
        preset = self.config.size(req.resolution, req.aspect_ratio)
        return adaptive_size(preset, image_size) if req.adaptive_resolution else preset

    @torch.inference_mode()
    def _condition(self, req: I2VRequest) -> I2VPending:
        dev = self.device
        t0 = time.perf_counter()
        [emb], [warns], [hit] = self.encode_prompts([req.prompt])
        context = emb.to(dev, self.dtype)[None]
        sync(dev)
        t1 = time.perf_counter()
        try:
            image = load_rgb(req.image)
        except OSError as e:    # the inputs stage checked it; a file changed since is still this row's
            raise RequestError("image", req.image, f"a readable image ({type(e).__name__}: {e})") from e
        width, height = self._size(req, image.size)
        frame = image_to_tensor(image, width, height).to(dev)                  # [1, 3, H, W]
        video = torch.cat([frame[:, :, None], torch.zeros(1, 3, req.num_frames - 1, height, width,
                                                          device=dev)], dim=2)
        latents = self.vae.encode(video)                                       # [1, 16, T, h, w]
        del video
        _, lt, lh, lw = latent_shape(self.config, req.num_frames, width, height)
        mask = first_frame_mask(lt, lh, lw, dtype=latents.dtype, device=latents.device)
        y = torch.cat([mask, latents], dim=1).to(self.dtype)
        sync(dev)
        t2 = time.perf_counter()
        # The DiT's attention settings are per request, applied on the loaded weights.
        kind = resolve_attention(req.attention_type, dev)
        for dit in self.experts.loaded():
            dit.set_attention(kind, req.sla_topk)
        self.attention = AttentionSpec(type=kind, topk=req.sla_topk, blkq=self.attention.blkq,
                                       blkk=self.attention.blkk)
        gen = torch.Generator().manual_seed(req.seed)
        state = rcm_start((1, *latent_shape(self.config, req.num_frames, width, height)),
                          sigma_max=req.sigma_max, num_steps=req.num_steps, generator=gen, device=dev,
                          ode=req.sampler == "ode")
        roles = [_ROLE[r] for r in expert_schedule(req.sigma_max, req.num_steps, req.boundary)]
        return I2VPending(request=req, width=width, height=height, state=state, context=context, y=y,
                          roles=roles, group=self._group, warnings=warns, text_cache_hit=hit,
                          timings={"text_s": t1 - t0, "image_s": t2 - t1, "denoise_s": 0.0})

    @torch.inference_mode()
    def _run_steps(self, p: I2VPending, phase: str) -> None:
        """Run the row's steps of `phase` ("high": until the first low-noise step; "low": the rest)."""
        dev = self.device
        while not p.state.done:
            role = p.roles[p.state.step]
            if phase == "high" and role == LOW:
                return
            dit, activation = self.experts.activate(role)
            if activation.moved:
                p.activations[p.state.step] = activation
            t0 = time.perf_counter()
            rcm_step(p.state, self._velocity(dit, p))
            sync(dev)
            p.step_s.append(time.perf_counter() - t0)
            p.timings["denoise_s"] += p.step_s[-1]

    def _velocity(self, dit: WanDiT, p: I2VPending):
        def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return dit(torch.cat([x.to(self.dtype), p.y], dim=1), timestep, p.context)
        return velocity

    @torch.inference_mode()
    def _decode(self, p: I2VPending) -> GenerationResult:
        t0 = time.perf_counter()
        frames = self.decode_to_uint8(p.state.x0.to(self.dtype))
        frames_np: np.ndarray = frames.cpu().numpy()
        p.timings["vae_s"] = time.perf_counter() - t0
        switch_s, in_s = self._switch_costs(p)
        p.timings.update(switch_s=switch_s, expert_in_s=in_s)
        # Moves happen between steps (a streamed copy's stall is inside its step's time).
        p.timings["total_s"] = sum(p.timings[k] for k in ("text_s", "image_s", "denoise_s", "vae_s")) \
            + sum(a.host_s for a in p.activations.values())
        req = p.request
        return GenerationResult(
            frames=frames_np, fps=self.config.fps, width=p.width, height=p.height,
            num_frames=req.num_frames, seed=req.seed, timings=dict(p.timings),
            peak_vram_gb=self.peak_vram_gb(), attention_type=self.attention.type.value,
            int8_path=self.int8_path, text_cache_hit=p.text_cache_hit, warnings=p.warnings,
            expert_policy=self.policy, expert_loads=len(p.activations), expert_group=p.group)

    def _switch_costs(self, p: I2VPending) -> tuple[float, float]:
        """(high→low switch, bringing the first expert in) in seconds, for this row.

        A copy that streams behind the next forward costs its host time plus the stall it causes:
        that step's time over the median of the row's steps that followed no move (same shape, so
        the same cost). Without such a step the row's fastest step is the reference; a row of one
        step has none, and only the host time is counted."""
        clean = [s for i, s in enumerate(p.step_s) if i not in p.activations]
        reference = statistics.median(clean) if clean else (min(p.step_s) if len(p.step_s) > 1 else None)
        costs = {"switch": 0.0, "in": 0.0}
        for step, act in p.activations.items():
            cost = act.host_s
            if act.streamed and reference is not None and step < len(p.step_s):
                cost += max(0.0, p.step_s[step] - reference)
            costs["switch" if step > 0 else "in"] += cost
        return costs["switch"], costs["in"]
