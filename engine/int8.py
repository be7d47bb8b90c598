"""TurboDiffusion's W8A8 int8 linear layers, as stored in the `-quant` TurboWan checkpoints.

Format (turbodiffusion/ops/core.py::Int8Linear, ops/quant/quant.hpp): per Linear `int8_weight` int8
[out, in], `scale` float32 [ceil(out/128), ceil(in/128)] (one per 128x128 tile, row-major over
(out-tile, in-tile)), `bias` in the original weight dtype (bf16). Per tile: amax = max(|W|, 1e-8),
q = round_to_nearest(W * 128/amax) saturated to [-128, 127], scale = amax/128.

At runtime the int8 GEMM (`turbodiffusion.ops.int8_linear`) is slower than bf16 cuBLAS on H100
(0.5-0.7x, measured; docs/BENCHMARKS.md), so by default `convert_int8_for_runtime` dequantizes every layer
back into a plain nn.Linear; the int8 kernels are used only when asked for and available.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Int8Linear", "convert_int8_for_runtime", "dequantize_weight", "quantize_weight",
           "swap_block_linears_for_int8"]

log = logging.getLogger(__name__)

TILE = 128
INT8_MAX = 128.0      # TurboDiffusion divides amax by 128 (not 127); +128 then saturates to 127
AMAX_FLOOR = 1e-8
SKIP_NAME = "proj_l"  # SLA's projection stays in floating point

Int8LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // TILE), -(-cols // TILE)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float32 scale [ceil(out/128), ceil(in/128)])."""
    rows, cols = w.shape
    rt, ct = _tiles(rows, cols)
    # Zero padding does not change a tile's absmax, so ragged edge tiles need no special case.
    padded = F.pad(w.float(), (0, ct * TILE - cols, 0, rt * TILE - rows))
    tiles = padded.view(rt, TILE, ct, TILE)                               # [RT, 128, CT, 128]
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)             # [RT, CT]
    q = torch.round(tiles * (INT8_MAX / amax)[:, None, :, None]).clamp(-128, 127)
    int8 = q.to(torch.int8).view(rt * TILE, ct * TILE)[:rows, :cols].contiguous()
    return int8, amax / INT8_MAX


def dequantize_weight(int8_weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_weight: int8 [out, in] * per-tile scale -> [out, in] in `dtype`."""
    rows, cols = int8_weight.shape
    full = scale.float().repeat_interleave(TILE, dim=0).repeat_interleave(TILE, dim=1)[:rows, :cols]
    return (int8_weight.float() * full).to(dtype)


class Int8Linear(nn.Module):
    """Holds a `-quant` checkpoint's Linear: buffers int8_weight, scale, bias (in that state_dict order)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int8_weight: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(*_tiles(out_features, in_features), dtype=torch.float32))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype))
        else:
            self.bias = None
        self.kernel: Int8LinearFn | None = None   # set by convert_int8_for_runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            out = self.kernel(x, self.int8_weight, self.scale)
        else:   # correct anywhere, not fast: dequantize on the fly
            out = F.linear(x, dequantize_weight(self.int8_weight, self.scale, x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear with the dequantized weight, on the buffers' device."""
        weight = dequantize_weight(self.int8_weight, self.scale, dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(dtype), requires_grad=False)
        return linear


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)   # same key in parent._modules, so state_dict order is kept


def swap_block_linears_for_int8(model: nn.Module, quantize: bool = False) -> int:
    """Replace every nn.Linear inside `model.blocks` (except SLA's proj_l) by an Int8Linear.

    Mirrors TurboDiffusion's replace_linear_norm, so the model takes a `-quant` state_dict strictly.
    With quantize=True the current weights are quantized into the new buffers (for tests and
    conversions); otherwise the buffers are empty, to be filled by load_state_dict(assign=True).
    Returns the number of layers swapped.
    """
    blocks = cast(nn.Module, model.blocks)
    targets = [(name, m) for name, m in blocks.named_modules()
               if isinstance(m, nn.Linear) and SKIP_NAME not in name]
    for name, linear in targets:
        device = linear.weight.device
        with torch.device(device):
            layer = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               dtype=linear.weight.dtype)
        if quantize and device.type != "meta":
            int8, scale = quantize_weight(linear.weight.detach())
            layer.int8_weight.copy_(int8)
            layer.scale.copy_(scale)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        _replace(blocks, name, layer)
    return len(targets)


@functools.cache
def _int8_kernel() -> Int8LinearFn | None:
    try:
        module = importlib.import_module("turbodiffusion.ops")
    except Exception:   # not installed, or its CUDA extension failed to load
        return None
    return cast(Int8LinearFn, module.int8_linear)


def convert_int8_for_runtime(model: nn.Module, device: torch.device, prefer_int8_kernels: bool = False,
                             dtype: torch.dtype | None = None) -> str:
    """After loading a `-quant` checkpoint: pick how its Int8Linear layers run. Returns the path taken:

    "int8-kernel"  kept as Int8Linear on turbodiffusion.ops.int8_linear (asked for, on CUDA, installed);
    "dequantized"  each replaced by nn.Linear with the dequantized weight in `dtype`
                   (default bf16 on CUDA, fp32 elsewhere);
    "none"         the model has no Int8Linear.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not layers:
        return "none"
    device = torch.device(device)
    kernel = _int8_kernel() if prefer_int8_kernels and device.type == "cuda" else None
    if kernel is not None:
        for _, layer in layers:
            layer.kernel = kernel
        return "int8-kernel"
    if prefer_int8_kernels:
        log.info("int8 kernels unavailable on %s (turbodiffusion.ops not importable or not CUDA); dequantizing", device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name, layer in layers:
        _replace(model, name, layer.to_linear(dtype))
    return "dequantized"
