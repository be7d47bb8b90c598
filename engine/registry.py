"""Which models exist, what they generate, and which checkpoint files they are built from.

A `ModelSpec` is one preset: its mode (t2v, i2v, dance), the DiT shape (`WanConfig`), the roles of
its DiTs in sampling order (one for Wan2.1; A14B's high- and low-noise experts are two), and the
files per role, as TurboDiffusion publishes them. Extra encoders (CLIP, DWPose) are more roles.

    role            built into                       Wan2.1 t2v file
    dit             WanDiT                           TurboWan2.1-T2V-1.3B-480P.pth (or -quant.pth)
    vae             WanVAE                           Wan2.1_VAE.pth
    text_encoder    UMT5Encoder                      models_t5_umt5-xxl-enc-bf16.pth
    tokenizer       the umT5 tokenizer (a folder)    google/umt5-xxl/

SteadyDancer-14B (dance) reads its DiT from the official sharded folder
(`SteadyDancer-14B/diffusion_pytorch_model.safetensors.index.json` and its shards) or one single
file, plus CLIP ViT-H (`clip`), and an optional step-distill LoRA (`lora`, named by the row).

Wan2.2 A14B image-to-video has two DiT roles, `dit_high` (the high-noise expert, sampling starts
on it) and `dit_low`, each its own TurboWan2.2 file, and the Wan2.1 VAE and umT5 above.

`resolve_files()` finds each role's file under the checkpoints folder (explicit paths win) and
names every missing one in a single `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    CLIP_FILE,
    DANCE_SIZES,
    TINY_CLIP,
    TINY_DANCE_SIZES,
    TINY_SIZES,
    CLIPConfig,
    DancerConfig,
    UMT5Config,
    VAEConfig,
    WanConfig,
)
from .errors import CheckpointError, RequestError

__all__ = ["MODELS", "CheckpointFile", "ModelFiles", "ModelSpec", "get_model", "model_names",
           "resolve_files"]


@dataclass(frozen=True)
class CheckpointFile:
    role: str                 # what the engine builds from it (see the table above)
    name: str                 # file (or folder) name inside the checkpoints folder
    quant_name: str = ""      # the int8 alternative TurboDiffusion ships (`-quant`)
    folder: bool = False      # a directory (the tokenizer), not a file
    optional: bool = False    # built without it when absent (the tiny presets' tokenizer)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    mode: str                                 # t2v | i2v | dance
    config: WanConfig                         # the DiT shape, shared by all of its DiTs
    files: tuple[CheckpointFile, ...]
    dits: tuple[str, ...] = ("dit",)          # DiT roles in sampling order
    clip: CLIPConfig | None = None            # an image encoder (dance)
    dancer: DancerConfig | None = None        # SteadyDancer's pose conditioning (dance)

    @property
    def random_init(self) -> bool:
        return self.config.random_init

    def file(self, role: str) -> CheckpointFile:
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(f"{self.name} has no {role} checkpoint")


@dataclass(frozen=True)
class ModelFiles:
    """Resolved paths per role; an empty mapping means seeded random weights for every part."""
    paths: Mapping[str, Path] = field(default_factory=dict)

    def get(self, role: str) -> Path | None:
        return self.paths.get(role)

    def __iter__(self) -> Iterator[tuple[str, Path]]:
        return iter(sorted(self.paths.items()))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelFiles) and tuple(self) == tuple(other)

    @property
    def random(self) -> bool:
        return not self.paths


_TURBO = "TurboWan2.1-T2V-{}"
_TURBO_A14B = "TurboWan2.2-I2V-A14B-{}-720P{}.pth"
_WAN21_COMMON = (
    CheckpointFile("vae", "Wan2.1_VAE.pth"),
    CheckpointFile("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth"),
    CheckpointFile("tokenizer", "google/umt5-xxl", folder=True),
)

_TINY_CONFIG = WanConfig(name="tiny-t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2,
                         text_dim=32, text_len=32, freq_dim=32,
                         umt5=UMT5Config(vocab_size=512, dim=32, dim_attn=32, dim_ffn=64,
                                         num_heads=2, num_layers=2, num_buckets=8, text_len=32),
                         vae=VAEConfig(dim=8), sizes=TINY_SIZES, random_init=True,
                         param_billions=0.001)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        name="wan2.1-t2v-1.3b", mode="t2v",
        config=WanConfig(name="wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12,
                         num_layers=30, param_billions=1.3),
        files=(CheckpointFile("dit", _TURBO.format("1.3B-480P.pth"),
                              quant_name=_TURBO.format("1.3B-480P-quant.pth")), *_WAN21_COMMON)),
    ModelSpec(
        name="wan2.1-t2v-14b", mode="t2v",
        config=WanConfig(name="wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40,
                         num_layers=40, default_resolution="720p", param_billions=14.0),
        files=(CheckpointFile("dit", _TURBO.format("14B-720P.pth"),
                              quant_name=_TURBO.format("14B-720P-quant.pth")), *_WAN21_COMMON)),
    # Two 14B experts with 36 input channels (16 noisy latent + 4 mask + 16 image latent), no CLIP.
    ModelSpec(
        name="wan2.2-i2v-a14b", mode="i2v",
        config=WanConfig(name="wan2.2-i2v-a14b", dim=5120, ffn_dim=13824, num_heads=40,
                         num_layers=40, in_dim=36, default_resolution="720p", param_billions=14.0),
        files=(CheckpointFile("dit_high", _TURBO_A14B.format("high", ""),
                              quant_name=_TURBO_A14B.format("high", "-quant")),
               CheckpointFile("dit_low", _TURBO_A14B.format("low", ""),
                              quant_name=_TURBO_A14B.format("low", "-quant")),
               *_WAN21_COMMON),
        dits=("dit_high", "dit_low")),
    ModelSpec(
        name="steadydancer-14b", mode="dance",
        config=WanConfig(name="steadydancer-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                         in_dim=36, default_resolution="576p", sizes=DANCE_SIZES, param_billions=16.4),
        files=(CheckpointFile("dit", "SteadyDancer-14B/diffusion_pytorch_model.safetensors.index.json"),
               CheckpointFile("clip", CLIP_FILE), CheckpointFile("lora", "", optional=True), *_WAN21_COMMON),
        clip=CLIPConfig(), dancer=DancerConfig()),
    # Same classes, tiny dimensions: output is noise. Seeded random weights, or tiny files of
    # these names when the checkpoints folder holds them (tests save them in the real formats).
    ModelSpec(
        name="tiny-t2v", mode="t2v",
        config=_TINY_CONFIG,
        files=(CheckpointFile("dit", "TurboWan-tiny-t2v.pth", quant_name="TurboWan-tiny-t2v-quant.pth"),
               CheckpointFile("vae", "tiny-vae.pth"),
               CheckpointFile("text_encoder", "tiny-umt5.pth"),
               CheckpointFile("tokenizer", "tiny-tokenizer", folder=True, optional=True))),
    ModelSpec(
        name="tiny-i2v", mode="i2v",
        config=dataclasses.replace(_TINY_CONFIG, name="tiny-i2v", in_dim=36, default_resolution="720p"),
        files=(CheckpointFile("dit_high", "TurboWan-tiny-i2v-high.pth",
                              quant_name="TurboWan-tiny-i2v-high-quant.pth"),
               CheckpointFile("dit_low", "TurboWan-tiny-i2v-low.pth",
                              quant_name="TurboWan-tiny-i2v-low-quant.pth"),
               CheckpointFile("vae", "tiny-vae.pth"),
               CheckpointFile("text_encoder", "tiny-umt5.pth"),
               CheckpointFile("tokenizer", "tiny-tokenizer", folder=True, optional=True)),
        dits=("dit_high", "dit_low")),
    ModelSpec(
        name="tiny-dance", mode="dance",
        config=dataclasses.replace(_TINY_CONFIG, name="tiny-dance", in_dim=36, default_resolution="576p",
                                   sizes=TINY_DANCE_SIZES),
        files=(CheckpointFile("dit", "tiny-dance/diffusion_pytorch_model.safetensors.index.json"),
               CheckpointFile("clip", "tiny-clip.pth"), CheckpointFile("lora", "", optional=True),
               CheckpointFile("vae", "tiny-vae.pth"),
               CheckpointFile("text_encoder", "tiny-umt5.pth"),
               CheckpointFile("tokenizer", "tiny-tokenizer", folder=True, optional=True)),
        clip=TINY_CLIP, dancer=DancerConfig(clip_dim=TINY_CLIP.dim, clip_tokens=TINY_CLIP.seq_len,
                                            align_dim=16, align_heads=2)),
)}


def model_names() -> list[str]:
    return sorted(MODELS)


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise RequestError("model", name, "one of " + ", ".join(model_names())) from None


def resolve_files(
    spec: ModelSpec,
    checkpoints_dir: str | os.PathLike[str] | None,
    *,
    quant_linear: str = "auto",
    overrides: Mapping[str, str | os.PathLike[str]] | None = None,
) -> ModelFiles:
    """Each role's file under the checkpoints folder by TurboDiffusion's names; `overrides` win.

    quant_linear: "true" wants the -quant DiT, "false" the bf16 one, "auto" the bf16 one when
    present, else the -quant one. A tiny preset with no files in the folder (or no folder) gets
    seeded random weights. Missing files raise CheckpointError naming every missing path.
    """
    overrides = dict(overrides or {})
    root = Path(checkpoints_dir) if checkpoints_dir else None
    first = spec.file(spec.dits[0])
    if spec.random_init and not overrides and (root is None or not any(
            (root / name).is_file() for name in (first.name, first.quant_name) if name)):
        return ModelFiles()
    root = root or Path("checkpoints")
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for f in spec.files:
        if f.role in overrides:
            path = Path(overrides[f.role])
        elif f.role in spec.dits:
            path = _pick_dit(root, f, quant_linear)
        else:
            path = root / f.name
        present = path.is_dir() if f.folder else path.is_file()
        if present:
            paths[f.role] = path
        elif not f.optional or f.role in overrides:     # a file asked for by name must exist
            missing.append(f"{path}/ ({f.role} folder)" if f.folder else str(path))
    if missing:
        raise CheckpointError(root, f"missing checkpoint files for {spec.name}: " + ", ".join(missing)
                              + " (see README, section Checkpoints)")
    return ModelFiles(paths)


def _pick_dit(root: Path, f: CheckpointFile, quant_linear: str) -> Path:
    plain, quant = root / f.name, root / f.quant_name if f.quant_name else None
    if quant_linear == "true" and quant is not None:
        return quant
    if quant_linear == "false" or plain.is_file() or quant is None:
        return plain
    return quant if quant.is_file() else plain
