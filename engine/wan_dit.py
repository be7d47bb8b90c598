"""Wan2.1 text-to-video DiT in the TurboWan checkpoint layout.

Reads top-down: norms → RoPE → self-attention → cross-attention → block → head → WanDiT.
`WanDiT.state_dict()` has exactly the keys, shapes and order of the released TurboWan `.pth` files
(checked by tests/engine/test_dit.py on meta): `patch_embedding` is a Linear over (c, kt, kh, kw)-
flattened patches and every self-attention holds SLA's `proj_l`. The math follows TurboDiffusion's
`rcm/networks/wan2pt1.py` as the released pipeline runs it (FastRMSNorm/FastLayerNorm in fp32,
residual stream in the module dtype, modulation and time embedding in fp32, head in fp32).

Build under `torch.device("meta")` and `load_state_dict(..., assign=True)`: nothing here allocates at
construction except parameters, and the RoPE tables are a plain cache, not state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionSpec, SelfAttentionOp, cross_attention, dense_attention
from .config import AttentionType, WanConfig

__all__ = ["DiTCommon", "WanAttentionBlock", "WanCrossAttention", "WanDiT", "adapt_checkpoint", "apply_rope",
           "linear_fp32", "patchify", "rope_cos_sin", "sinusoidal_embedding", "unpatchify"]

# ---------------------------------------------------------------------------------------------
# Norms (fp32 compute, output in the input dtype)
# ---------------------------------------------------------------------------------------------


class WanRMSNorm(nn.Module):
    """RMSNorm over the full model dim (q/k norm). Weight applied in fp32, like TurboDiffusion's FastRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32. norm1/norm2/head.norm have no affine; norm3 has one."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, dim] float64: cos half then sin half, frequencies 10000^(-i/half)."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits head_dim between (t, h, w) rotary parts; 128 -> (44, 42, 42)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_cos_sin(head_dim: int, t: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for a (t, h, w) token grid: two [t*h*w, head_dim/2] float32 tensors.

    Token order is (t h w); each token's angle vector is [t-part | h-part | w-part], each part with
    frequencies 10000^(-2i/part_dim) of its own position index. Built in float64, stored in float32.
    """
    parts = []
    for size, part_dim, expand in ((t, rope_dims(head_dim)[0], (t, 1, 1)),
                                   (h, rope_dims(head_dim)[1], (1, h, 1)),
                                   (w, rope_dims(head_dim)[2], (1, 1, w))):
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim)
        angles = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)   # [size, part_dim/2]
        parts.append(angles.view(*expand, -1).expand(t, h, w, -1))
    angles = torch.cat(parts, dim=-1).reshape(t * h * w, head_dim // 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the table angles, in fp32. x: [B, L, H, D]; cos/sin [L, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))                 # [B, L, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def adapt_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one key remapping the loader does: a Conv3d-shaped `patch_embedding.weight`
    [dim, C, kt, kh, kw] (original Wan, merged and community files) becomes TurboWan's Linear
    [dim, C·kt·kh·kw]. Flattening Conv3d's (c, kt, kh, kw) is exactly `patchify`'s feature order,
    so it is a reshape of the same bytes. Everything else must already match (loading is strict)."""
    weight = state.get("patch_embedding.weight")
    if weight is not None and weight.ndim == 5:
        state = {**state, "patch_embedding.weight": weight.reshape(weight.shape[0], -1)}
    return state


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T'*H'*W', C*kt*kh*kw], tokens in (t h w) order, features in (c kt kh kw) order."""
    kt, kh, kw = patch_size
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // kt, kt, h // kh, kh, w // kw, kw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)                    # [B, T', H', W', C, kt, kh, kw]
    return x.reshape(b, (t // kt) * (h // kh) * (w // kw), c * kt * kh * kw)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, T'*H'*W', kt*kh*kw*C] (features in (kt kh kw c) order, the head's layout) -> [B, C, T, H, W]."""
    kt, kh, kw = patch_size
    t, h, w = grid
    b = x.shape[0]
    x = x.view(b, t, h, w, kt, kh, kw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                    # [B, C, T', kt, H', kh, W', kw]
    return x.reshape(b, -1, t * kt, h * kh, w * kw)


# ---------------------------------------------------------------------------------------------
# Attention layers
# ---------------------------------------------------------------------------------------------


class WanSelfAttention(nn.Module):
    """attention=None: plain dense SDPA and no `attn_op` (the original Wan2.1 layout, no SLA proj_l)."""

    def __init__(self, dim: int, num_heads: int, eps: float, attention: AttentionSpec | None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.attn_op = SelfAttentionOp(self.head_dim, attention) if attention is not None else None
        # Set by engine/fp8.py: q, k and v as one GEMM (their input is quantized once, not thrice).
        self.qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = self.norm_q(q).unflatten(-1, heads)               # [B, L, H, Dh]
        k = self.norm_k(k).unflatten(-1, heads)
        v = v.unflatten(-1, heads)
        attend = self.attn_op if self.attn_op is not None else dense_attention
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o(out.flatten(2))                        # [B, L, dim]


class WanCrossAttention(nn.Module):
    """Text cross-attention: dense, no RoPE, attends to all (zero-padded) text tokens like TurboDiffusion."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)       # [B, L, H, Dh]
        k = self.norm_k(self.k(context)).unflatten(-1, heads)  # [B, L_text, H, Dh]
        v = self.v(context).unflatten(-1, heads)
        return self.o(cross_attention(q, k, v).flatten(2))


# ---------------------------------------------------------------------------------------------
# Block and head
# ---------------------------------------------------------------------------------------------


class WanAttentionBlock(nn.Module):
    """`cross_attn`: another cross-attention layer in place of the text one (SteadyDancer's image + text)."""

    def __init__(self, config: WanConfig, attention: AttentionSpec | None, *, cross_attn: nn.Module | None = None):
        super().__init__()
        dim, eps = config.dim, config.eps
        # Registration order = state_dict order: modulation (own param) first, then the children.
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, eps, attention)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = cross_attn if cross_attn is not None else WanCrossAttention(dim, config.num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        # x [B, L, dim] in the module dtype; e [B, 6, dim] fp32; context [B, L_text, dim].
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).chunk(6, dim=1)

        # 1. Self-attention with adaLN modulation (modulated in fp32, run in the module dtype)
        h = (self.norm1(x).float() * (1 + scale1) + shift1).to(x.dtype)
        x = x + self.self_attn(h, cos, sin) * gate1.to(x.dtype)

        # 2. Cross-attention to the text (affine norm3, no modulation)
        x = x + self.cross_attn(self.norm3(x), context)

        # 3. Feed-forward with adaLN modulation
        h = (self.norm2(x).float() * (1 + scale2) + shift2).to(x.dtype)
        return x + self.ffn(h) * gate2.to(x.dtype)


class WanHead(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x [B, L, dim]; e [B, dim] fp32 -> [B, L, kt*kh*kw*out_dim] fp32 (TurboDiffusion runs it under fp32 autocast)
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        h = self.norm(x).float() * (1 + scale) + shift
        return linear_fp32(self.head, h)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DiTCommon:
    """What every Wan DiT here shares (WanDiT; SteadyDancerDiT in engine/dance_dit.py): the dtype, the
    RoPE cache, the time conditioning and regional compile. Needs `config`, `patch_embedding`,
    `time_embedding`, `time_projection`, `blocks` and `_rope_cache` on the module."""

    config: WanConfig
    patch_embedding: nn.Module
    time_embedding: nn.Sequential
    time_projection: nn.Sequential
    blocks: nn.ModuleList
    _rope_cache: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]]

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.Tensor, self.patch_embedding.weight).dtype

    def rope_tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*grid, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_cos_sin(self.config.head_dim, *grid, device=device)
        return self._rope_cache[key]

    def time_conditioning(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] timesteps (t*1000) -> (e [B, dim], e0 [B, 6, dim]), both fp32."""
        sin_emb = sinusoidal_embedding(self.config.freq_dim, timestep).float()
        first, second = cast(nn.Linear, self.time_embedding[0]), cast(nn.Linear, self.time_embedding[2])
        e = linear_fp32(second, F.silu(linear_fp32(first, sin_emb)))
        e0 = linear_fp32(cast(nn.Linear, self.time_projection[1]), F.silu(e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def compile_blocks(self, **kw: Any) -> None:
        """Regional compile: torch.compile each block in place (state_dict keys unchanged). Explicit call only."""
        for block in self.blocks:
            block.compile(**kw)


class WanDiT(DiTCommon, nn.Module):
    """Wan2.1 T2V diffusion transformer. forward(x, timestep, context) -> velocity (float32)."""

    def __init__(self, config: WanConfig, attention: AttentionSpec):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"{config.name}: dim {config.dim} must split into {config.num_heads} even-sized heads")
        self.config = config
        self.attention = attention
        dim = config.dim
        self.patch_embedding = nn.Linear(config.in_dim * math.prod(config.patch_size), dim)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(config, attention) for _ in range(config.num_layers))
        self.head = WanHead(config)
        # (t, h, w, device) -> (cos, sin). A plain dict: not state, not moved by .to(), built once per shape.
        self._rope_cache: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        # Set while this DiT's weights stream onto the GPU (engine/experts.py): called with -1
        # before the embeddings and with i before block i, so each part waits only for its own
        # copy. Cleared after the forward. Plain Python, outside the compiled blocks.
        self.wait_for_weights: Callable[[int], None] | None = None

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim, T, H, W], timestep [B] (t*1000), context [B, L_text, text_dim]
        -> [B, out_dim, T, H, W] fp32."""
        kt, kh, kw = self.config.patch_size
        _, _, t, h, w = x.shape
        grid = (t // kt, h // kh, w // kw)
        dtype = self.dtype
        wait = self.wait_for_weights
        if wait is not None:
            wait(-1)

        tokens = self.patch_embedding(patchify(x.to(dtype), self.config.patch_size))   # [B, L, dim]
        e, e0 = self.time_conditioning(timestep)
        context = self.text_embedding(context.to(dtype))                               # [B, L_text, dim]
        cos, sin = self.rope_tables(grid, x.device)

        for i, block in enumerate(self.blocks):
            if wait is not None:
                wait(i)
            tokens = block(tokens, e0, cos, sin, context)
        self.wait_for_weights = None

        out = self.head(tokens, e)                                                     # [B, L, kt*kh*kw*out]
        return unpatchify(out, grid, self.config.patch_size)

    def set_attention(self, kind: AttentionType, topk: float) -> None:
        """Backend and SLA top-k of every self-attention for the next forwards (per request).

        Call it outside compiled code; it only touches the ops whose settings change."""
        for op in self._attention_ops():
            op.set_runtime(kind, topk)
        self.attention = AttentionSpec(type=kind, topk=topk, blkq=self.attention.blkq,
                                       blkk=self.attention.blkk)

    def _attention_ops(self) -> list[SelfAttentionOp]:
        return [cast(SelfAttentionOp, cast(WanAttentionBlock, block).self_attn.attn_op) for block in self.blocks]
