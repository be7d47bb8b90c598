"""Model presets and the generation request.

Everything here is plain frozen dataclasses: the engine never sees argparse, Prefect or manifest
objects. `WanConfig.from_name()` picks a preset; `GenerationRequest.validated()` checks a request
against it and raises `RequestError` naming the field and the allowed values.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from .errors import RequestError


class AttentionType(enum.StrEnum):
    ORIGINAL = "original"   # dense SDPA
    SLA = "sla"             # TurboDiffusion sparse-linear attention (Triton; torch reference on CPU)
    SAGESLA = "sagesla"     # SLA on SpargeAttn's int8/fp8 kernels (spas_sage_attn)
    AUTO = "auto"           # the best one available on the device


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256_384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10_240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512
    eps: float = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)   # (time, height, width)


# W×H per resolution and aspect ratio: TurboDiffusion's VIDEO_RES_SIZE_INFO.
WAN_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640),
             "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960),
             "4:3": (960, 720), "3:4": (720, 960)},
}
# The tiny preset keeps the aspect ratios at sizes a 2-core CPU generates in seconds
# (multiples of 16 = VAE stride 8 × patch 2).
TINY_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (112, 64), "9:16": (64, 112), "1:1": (80, 80),
             "4:3": (96, 64), "3:4": (64, 96)},
    "720p": {"16:9": (160, 96), "9:16": (96, 160), "1:1": (128, 128),
             "4:3": (128, 96), "3:4": (96, 128)},
}


@dataclass(frozen=True)
class CheckpointNames:
    """File names inside the checkpoints folder, as TurboDiffusion publishes them."""
    dit: str = ""
    dit_quant: str = ""
    vae: str = "Wan2.1_VAE.pth"
    text_encoder: str = "models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer: str = "google/umt5-xxl"


@dataclass(frozen=True)
class WanConfig:
    """One model preset: DiT shape plus the text encoder, VAE and file names that go with it."""
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    fps: int = 16
    max_frames: int = 125           # RoPE table len_t = 32 latent frames
    default_resolution: str = "480p"
    umt5: UMT5Config = field(default_factory=UMT5Config)
    vae: VAEConfig = field(default_factory=VAEConfig)
    files: CheckpointNames = field(default_factory=CheckpointNames)
    sizes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: WAN_SIZES)
    random_init: bool = False       # tiny preset: seeded random weights, no files
    param_billions: float = 0.0     # for cost estimates in shard planning

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_name(cls, name: str) -> WanConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise RequestError("model", name, "one of " + ", ".join(sorted(PRESETS))) from None

    def size(self, resolution: str, aspect_ratio: str) -> tuple[int, int]:
        """(width, height) in pixels."""
        if resolution not in self.sizes:
            raise RequestError("resolution", resolution, " | ".join(self.sizes))
        table = self.sizes[resolution]
        if aspect_ratio not in table:
            raise RequestError("aspect_ratio", aspect_ratio, " | ".join(table))
        return table[aspect_ratio]


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(
        name="wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
        files=CheckpointNames(dit="TurboWan2.1-T2V-1.3B-480P.pth",
                              dit_quant="TurboWan2.1-T2V-1.3B-480P-quant.pth"),
        param_billions=1.3),
    "wan2.1-t2v-14b": WanConfig(
        name="wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
        default_resolution="720p",
        files=CheckpointNames(dit="TurboWan2.1-T2V-14B-720P.pth",
                              dit_quant="TurboWan2.1-T2V-14B-720P-quant.pth"),
        param_billions=14.0),
    # Same classes, tiny dimensions, seeded random weights: output is noise. For trying the tool
    # without checkpoints and for tests.
    "tiny-t2v": WanConfig(
        name="tiny-t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2,
        text_dim=32, text_len=32, freq_dim=32,
        umt5=UMT5Config(vocab_size=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                        num_layers=2, num_buckets=8, text_len=32),
        vae=VAEConfig(dim=8),
        sizes=TINY_SIZES, random_init=True, param_billions=0.001),
}
# The 14B files come per resolution; the 480P one is picked with dit_file/explicit path.
TURBOWAN_14B_480P = "TurboWan2.1-T2V-14B-480P.pth"


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
    quant_linear: str = "auto"      # auto (from the file) | true | false
    sampler: str = "sde"            # sde (TurboDiffusion default) | ode

    def validated(self, config: WanConfig) -> GenerationRequest:
        """Return the request with normalised values, or raise RequestError on the first bad field."""
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
            raise RequestError("sigma_max", self.sigma_max, "a positive finite number (default 80)")
        attn = str(self.attention_type).lower()
        if attn not in set(AttentionType):
            raise RequestError("attention_type", self.attention_type,
                               " | ".join(a.value for a in AttentionType))
        topk = _as_float("sla_topk", self.sla_topk)
        if not 0 < topk <= 1:
            raise RequestError("sla_topk", self.sla_topk, "a fraction in (0, 1] (default 0.1)")
        quant = str(self.quant_linear).lower()
        if quant not in ("auto", "true", "false"):
            raise RequestError("quant_linear", self.quant_linear, "auto | true | false")
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


def latent_shape(config: WanConfig, num_frames: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent for a video of num_frames×height×width."""
    st, sh, sw = config.vae.stride
    return (config.vae.z_dim, 1 + (num_frames - 1) // st, height // sh, width // sw)
