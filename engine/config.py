"""Model shapes: the Wan DiT, umT5 and VAE dimensions, and the pixel sizes per resolution.

Everything here is plain frozen dataclasses: the engine never sees argparse, Prefect or manifest
objects. Which models exist, with which checkpoint files, is the registry's (engine/registry.py);
`WanConfig.from_name()` looks a model's shape up there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import RequestError

__all__ = ["DANCE_SIZES", "TINY_DANCE_SIZES", "TINY_SIZES", "WAN_SIZES", "AttentionType", "UMT5Config",
           "VAEConfig", "WanConfig", "latent_shape"]


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

# SteadyDancer: a max area (the output follows the reference's aspect), 1024×576 as its README runs it.
DANCE_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "576p": {"16:9": (1024, 576), "9:16": (576, 1024)},
    "480p": {"16:9": (832, 480), "9:16": (480, 832)},
}
TINY_DANCE_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "576p": {"16:9": (96, 64), "9:16": (64, 96)},
    "480p": {"16:9": (80, 48), "9:16": (48, 80)},
}


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
    sizes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: WAN_SIZES)
    random_init: bool = False       # tiny presets: seeded random weights unless their files are given
    param_billions: float = 0.0     # for cost estimates in shard planning

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_name(cls, name: str) -> WanConfig:
        """The DiT shape of a registered model (engine/registry.py)."""
        from .registry import get_model
        return get_model(name).config

    def size(self, resolution: str, aspect_ratio: str) -> tuple[int, int]:
        """(width, height) in pixels."""
        if resolution not in self.sizes:
            raise RequestError("resolution", resolution, " | ".join(self.sizes))
        table = self.sizes[resolution]
        if aspect_ratio not in table:
            raise RequestError("aspect_ratio", aspect_ratio, " | ".join(table))
        return table[aspect_ratio]


def latent_shape(config: WanConfig, num_frames: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent for a video of num_frames×height×width."""
    st, sh, sw = config.vae.stride
    return (config.vae.z_dim, 1 + (num_frames - 1) // st, height // sh, width // sw)


# -- the dance preset's extra parts (here, not beside their modules: the registry and the manifest
# read them in processes that never import torch) --
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass(frozen=True)
class CLIPConfig:
    """`clip_xlm_roberta_vit_h_14()`'s dimensions. The text fields only shape the checked keys."""
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32            # in the file; inference runs num_layers - 1 (use_31_block)
    embed_dim: int = 1024           # visual.head and textual.head output
    norm_eps: float = 1e-5
    vocab_size: int = 250_002       # XLM-RoBERTa large
    max_text_len: int = 514
    type_size: int = 1
    text_dim: int = 1024
    text_layers: int = 24

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def seq_len(self) -> int:
        """Tokens out: one per patch plus the class token (257 at 224 px)."""
        return self.grid ** 2 + 1

    @property
    def mlp_dim(self) -> int:
        return self.dim * self.mlp_ratio

    @property
    def used_layers(self) -> int:
        return self.num_layers - 1


# Tests: 4×4 patches + class token = 17 tokens, 3 blocks in the file (2 run).
TINY_CLIP = CLIPConfig(image_size=56, patch_size=14, dim=32, num_heads=4, num_layers=3, embed_dim=16,
                       vocab_size=40, max_text_len=12, text_dim=24, text_layers=2)


@dataclass(frozen=True)
class DancerConfig:
    """What SteadyDancer adds to the Wan2.1-I2V shape (`WanConfig` with in_dim 36). Defaults = the 14B checkpoint."""
    pose_dim: int = 16        # in_dim_c: VAE latent channels of the pose video (and of ref_c)
    clip_dim: int = 1280      # CLIP ViT-H/14 penultimate features (checkpoint_keys.md §5)
    clip_tokens: int = 257    # 1 class + 16×16 patch tokens; cross-attention splits the context here
    align_dim: int = 128      # frame-wise attention alignment unit: hidden width and heads
    align_heads: int = 8
