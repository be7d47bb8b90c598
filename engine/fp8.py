"""FP8 (e4m3) linears for Hopper: weights per output channel, activations per token.

    weight  W [out, in] bf16 ─ scale_w[o] = max|W[o, :]| / 448 ─▶ W8 = clamp(W / scale_w, ±448) e4m3
    input   x [tokens, in]   ─ scale_x[t] = max|x[t, :]| / 448 ─▶ x8 likewise
    y = (x8 · W8ᵀ) · scale_x[t] · scale_w[o] + bias          one `torch._scaled_mm` with row-wise scales

448 is e4m3's largest finite value. The activation quantization is a separate pass here; measured
on an H200 (docs/BENCHMARKS.md) that pass wipes out FP8's gain unless it fuses into the op that
produces x (the modulated norm, the GELU), which `torch.compile` does for these elementwise +
row-max patterns. Where `_scaled_mm` with row-wise scales is not available (the CPU, GPUs before
sm89, older torch) `FP8Linear` says so once and computes the same quantized product in the input
dtype, so results stay comparable and nothing fails. `quantize_model` converts a loaded DiT's
block linears at load; the weights can be cached on disk by the caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .wan_dit import WanSelfAttention

__all__ = ["E4M3_MAX", "FP8Linear", "cache_candidates", "find_cache", "fp8_supported", "quantize_model",
           "quantize_per_channel", "quantize_per_token", "save_cache"]

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn
_EPS = 1e-12                # an all-zero row gets scale eps, not 0 (no division by zero)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (W8 e4m3 [out, in], scale float32 [out, 1]) with W ≈ W8 · scale."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / E4M3_MAX
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., in] -> (x8 e4m3 [..., in], scale float32 [..., 1]) with x ≈ x8 · scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """(usable, why not): `_scaled_mm` with row-wise scales needs CUDA on sm89+ (Ada, Hopper)."""
    if device.type != "cuda":
        return False, f"FP8 linears need a CUDA GPU of compute capability 8.9+ (this is {device.type})"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no _scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"FP8 linears need compute capability 8.9+ (this GPU is {major}.{minor})"
    return True, ""


class FP8Linear(nn.Module):
    """A Linear with e4m3 weights and per-output-channel scales; inputs quantized per token."""

    keep_dtype = True           # loading.cast_floating leaves the scales in float32
    weight8: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                 use_scaled_mm: bool):
        super().__init__()
        self.out_features, self.in_features = weight8.shape
        self.register_buffer("weight8", weight8)
        self.register_buffer("scale", scale.float().reshape(1, -1))        # [1, out] for _scaled_mm
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.use_scaled_mm = use_scaled_mm

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_scaled_mm: bool) -> FP8Linear:
        return cls.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                               use_scaled_mm=use_scaled_mm)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, use_scaled_mm: bool) -> FP8Linear:
        weight8, scale = quantize_per_channel(weight)
        return cls(weight8, scale, bias, use_scaled_mm=use_scaled_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, x_scale = quantize_per_token(x.reshape(-1, shape[-1]))
        if self.use_scaled_mm:
            out = torch._scaled_mm(x8, self.weight8.t(), scale_a=x_scale, scale_b=self.scale,
                                   bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype)
        else:   # the same quantized product, computed in the input dtype (CPU, older GPUs)
            out = F.linear(x8.to(x.dtype), self.weight8.to(x.dtype)) * (x_scale * self.scale).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
        return cast(torch.Tensor, out).reshape(*shape[:-1], self.out_features)


def _fuse_qkv(attn: WanSelfAttention, use_scaled_mm: bool) -> None:
    """q, k, v -> one FP8Linear `qkv` over the stacked weights: one GEMM, and the shared input is
    quantized once instead of three times (per-channel scales make the stacking exact)."""
    q, k, v = attn.q, attn.k, attn.v
    weight = torch.cat([q.weight, k.weight, v.weight]).detach()
    bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias]).detach()
    attn.qkv = FP8Linear.from_weight(weight, bias, use_scaled_mm=use_scaled_mm)
    del attn.q, attn.k, attn.v


def _block_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """Every nn.Linear inside `model.blocks`, except SLA's small proj_l (not worth quantizing)."""
    blocks = cast(nn.Module, model.blocks)
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and "proj_l" not in f"{name}.{child_name}":
                yield module, child_name, child


def quantize_model(model: nn.Module, device: torch.device) -> str:
    """Replace the DiT's block linears by FP8Linear in place (self-attention's q, k, v fused into
    one). Returns the path taken: "fp8" on `_scaled_mm`, or "fp8-emulated" with the reason logged
    once (same numbers, no speed-up). Works on a `meta` model too (the cache's module tree)."""
    usable, why = fp8_supported(device)
    if not usable:
        log.warning("quant_linear=fp8: %s; computing the FP8 product in bf16 instead (no speed-up)", why)
    for module in list(cast(nn.Module, model.blocks).modules()):
        if isinstance(module, WanSelfAttention) and module.qkv is None:
            _fuse_qkv(module, usable)
    for parent, name, linear in _block_linears(model):
        setattr(parent, name, FP8Linear.from_linear(linear, use_scaled_mm=usable))
    return "fp8" if usable else "fp8-emulated"


# -- the on-disk cache of converted weights ------------------------------------------------------
def cache_candidates(source: Path, digest: str, cache_dir: Path | None) -> list[Path]:
    """Where the FP8 copy of `source` lives: beside it, else in `cache_dir` (a read-only
    checkpoint folder). The source's content digest is in the name, so a replaced file never
    matches an old copy."""
    name = f"{source.name}.fp8-{digest[:16]}.safetensors"
    return [source.with_name(name)] + ([Path(cache_dir) / name] if cache_dir is not None else [])


def find_cache(source: Path, digest: str, cache_dir: Path | None) -> Path | None:
    return next((p for p in cache_candidates(source, digest, cache_dir) if p.is_file()), None)


def save_cache(model: nn.Module, source: Path, digest: str, cache_dir: Path | None) -> Path | None:
    """Write the converted model's whole state (FP8 blocks, bf16 rest: about half the bf16 file)
    to the first writable candidate, atomically. None (and a warning) when no place is writable:
    the next load converts again."""
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for target in cache_candidates(source, digest, cache_dir):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(tmp))
            os.replace(tmp, target)
            log.info("quant_linear=fp8: converted weights of %s cached in %s", source.name, target)
            return target
        except OSError as e:
            log.debug("cannot write the FP8 cache %s: %s", target, e)
        finally:
            tmp.unlink(missing_ok=True)
    log.warning("quant_linear=fp8: no writable place for the converted weights of %s; "
                "the next load converts again", source)
    return None
