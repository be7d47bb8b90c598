"""Generation requests: one frozen type per mode.

    GenerationRequest       the fields every mode shares (prompt, size, steps, seed, attention …)
    ├── T2VRequest          text only
    ├── I2VRequest          + the conditioning image (a local file, fetched by the inputs stage)
    └── DanceRequest        + the reference image and the rendered pose video

`validated(config)` returns the request with normalised values, or raises `RequestError` naming
the field and its allowed values. Attention settings (`attention_type`, `sla_topk`) are applied
at forward time on the loaded model: they are request fields, not part of the model's identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Self

from .config import AttentionType, WanConfig
from .errors import RequestError

__all__ = ["REQUEST_TYPES", "DanceRequest", "GenerationRequest", "I2VRequest", "T2VRequest"]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    resolution: str = "480p"
    aspect_ratio: str = "16:9"
    num_frames: int = 81
    num_steps: int = 4
    seed: int = 0
    sigma_max: float = 80.0
    attention_type: str = "auto"
    sla_topk: float = 0.1
    quant_linear: str = "auto"      # auto (from the file) | true (int8 file) | false (bf16) | fp8
    sampler: str = "sde"            # sde (TurboDiffusion default) | ode

    def validated(self, config: WanConfig) -> Self:
        """The request with normalised values (same type), or RequestError on the first bad field."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", self.prompt, "a non-empty string")
        config.size(self.resolution, self.aspect_ratio)
        frames = _as_int("num_frames", self.num_frames)
        if frames < 1 or frames > config.max_frames or (frames - 1) % 4:
            raise RequestError("num_frames", self.num_frames,
                               f"4k+1 between 1 and {config.max_frames} (e.g. 33, 81, 121)")
        steps = _as_int("num_steps", self.num_steps)
        if steps not in (1, 2, 3, 4):
            raise RequestError("num_steps", self.num_steps, "1, 2, 3 or 4")
        seed = _as_int("seed", self.seed)
        if not 0 <= seed < 2**63:
            raise RequestError("seed", self.seed, "an integer in [0, 2^63)")
        sigma = _as_float("sigma_max", self.sigma_max)
        if not (math.isfinite(sigma) and sigma > 0):
            default = type(self).__dataclass_fields__["sigma_max"].default
            raise RequestError("sigma_max", self.sigma_max, f"a positive finite number (default {default:g})")
        attn = str(self.attention_type).lower()
        if attn not in set(AttentionType):
            raise RequestError("attention_type", self.attention_type,
                               " | ".join(a.value for a in AttentionType))
        topk = _as_float("sla_topk", self.sla_topk)
        if not 0 < topk <= 1:
            raise RequestError("sla_topk", self.sla_topk, "a fraction in (0, 1] (default 0.1)")
        quant = str(self.quant_linear).lower()
        if quant not in ("auto", "true", "false", "fp8"):
            raise RequestError("quant_linear", self.quant_linear,
                               "auto | true | false | fp8 (e4m3 linears made at load from the bf16 file)")
        if self.sampler not in ("sde", "ode"):
            raise RequestError("sampler", self.sampler, "sde | ode")
        return replace(self, num_frames=frames, num_steps=steps, seed=seed, sigma_max=sigma,
                       attention_type=attn, sla_topk=topk, quant_linear=quant)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise RequestError(name, value, "an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise RequestError(name, value, "an integer")


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise RequestError(name, value, "a number")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(name, value, "a number") from None


@dataclass(frozen=True)
class T2VRequest(GenerationRequest):
    """Text to video."""


@dataclass(frozen=True)
class I2VRequest(GenerationRequest):
    """Image to video: the first frame follows `image`."""
    image: str = ""
    adaptive_resolution: bool = True
    boundary: float = 0.9           # switch from the high- to the low-noise expert below this t
    sigma_max: float = 200.0        # TurboDiffusion's i2v defaults
    resolution: str = "720p"

    def validated(self, config: WanConfig) -> Self:
        if not self.image:
            raise RequestError("image", self.image, "a local image file (fetched by the inputs stage)")
        boundary = _as_float("boundary", self.boundary)
        if not 0 < boundary < 1:
            raise RequestError("boundary", self.boundary, "a number in (0, 1) (default 0.9)")
        if not isinstance(self.adaptive_resolution, bool):
            raise RequestError("adaptive_resolution", self.adaptive_resolution, "true | false")
        return replace(super().validated(config), boundary=boundary)


@dataclass(frozen=True)
class DanceRequest(GenerationRequest):
    """Pose-driven video: the person in `image` moves like the poses the pose stage extracted
    (npz files of aligned keypoints, and of their randomly distorted copies for pose guidance).

    guidance: "auto" (fast with a LoRA merged, else official), "official" (text CFG
    `guide_scale`, pose CFG `pose_guide_scale` inside step fractions 0.1–0.4), "fast" (cfg 1).
    shift: None = 5, or 3 at 480p sizes (SteadyDancer's defaults)."""
    image: str = ""
    poses: str = ""
    negative_poses: str = ""
    num_steps: int = 40
    resolution: str = "576p"
    guidance: str = "auto"
    guide_scale: float = 5.0
    pose_guide_scale: float = 1.5
    shift: float | None = None
    attention_type: str = "original"

    def validated(self, config: WanConfig) -> Self:
        for name in ("image", "poses"):
            if not getattr(self, name):
                raise RequestError(name, getattr(self, name), "a local file (made by the fetch and pose stages)")
        steps = _as_int("num_steps", self.num_steps)
        if not 1 <= steps <= 100:
            raise RequestError("num_steps", self.num_steps, "1 to 100 (40 official, 4 with the step-distill LoRA)")
        if str(self.attention_type).lower() not in ("original", "auto"):
            raise RequestError("attention_type", self.attention_type,
                               "original (SteadyDancer runs dense attention only)")
        if self.guidance not in ("auto", "official", "fast"):
            raise RequestError("guidance", self.guidance, "auto | official | fast")
        scales = {n: _as_float(n, getattr(self, n)) for n in ("guide_scale", "pose_guide_scale")}
        for name, value in scales.items():
            if not (math.isfinite(value) and value >= 0):
                raise RequestError(name, getattr(self, name), "a finite number ≥ 0")
        shift = None if self.shift is None else _as_float("shift", self.shift)
        if shift is not None and not (math.isfinite(shift) and shift > 0):
            raise RequestError("shift", self.shift, "a positive number (default 5; 3 at 480p)")
        base = replace(self, num_steps=4, attention_type="original")   # rCM's 1–4 step rule is not ours
        return replace(GenerationRequest.validated(base, config), num_steps=steps, shift=shift,
                       guide_scale=scales["guide_scale"], pose_guide_scale=scales["pose_guide_scale"])


REQUEST_TYPES: dict[str, type[GenerationRequest]] = {
    "t2v": T2VRequest, "i2v": I2VRequest, "dance": DanceRequest}
