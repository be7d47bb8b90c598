"""SteadyDancer-14B DiT: Wan2.1-I2V-14B with pose conditioning, in the original Wan2.1 checkpoint layout.

Reads top-down: pose modules (LayerNorm2D → FactorConv3d → DYModule → FrameAttentionAlign) → patch and
image embeddings → attention layers → block → SteadyDancerDiT.

`SteadyDancerDiT.state_dict()` has exactly the 1345 keys, shapes and order of the SteadyDancer-14B
checkpoint (checkpoint_keys.md §6; checked on meta by tests/engine/test_dance_dit.py): Conv3d-shaped
patch embeddings, no SLA `proj_l` (the model was trained with dense attention only), CLIP `img_emb` and
`k_img/v_img/norm_k_img` in every cross-attention, and the 42 pose keys right after `patch_embedding.bias`.

The math is MCG-NJU/SteadyDancer's `wan/modules/model_dancer.py` (commit 866a721) as
`wan/image2video_dancer.py` calls it; the test runs the official module and compares in fp32. The
precision policy is WanDiT's instead of the official bf16 autocast: norms, modulation, the time embedding
and the head in fp32, the rest in the module dtype. Two generalisations, identical at batch 1: every input
carries a batch dim (the official forward takes one sample), and the alignment unit attends over the
frames of each sample only (the official one attends over B·T "frames").

Per forward (x = noisy latent, pose = VAE latent of the rendered pose frames):
    fused   = pose + temporal(pose) + spatial(pose)                   Synergistic Pose Modulation
    aligned = align(fused, x)                                          frame-wise attention to x
    tokens  = [fuse_embed(x ‖ y ‖ fused ‖ aligned), patch_embed(ref_x), ref_c_embed(ref_c[:16])]
              (the two reference latents are two extra frames after the T video frames; RoPE over T+2)
    context = [img_emb(clip_x) + img_emb(clip_c) (257 tokens), text_embedding(text padded to text_len)]
    40 Wan blocks → head on the first T frames only → velocity [B, 16, T, H, W]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import cross_attention
from .config import AttentionType, DancerConfig, WanConfig
from .errors import RequestError
from .wan_dit import (
    DiTCommon,
    WanAttentionBlock,
    WanCrossAttention,
    WanHead,
    WanLayerNorm,
    WanRMSNorm,
    patchify,
    unpatchify,
)

__all__ = ["DYModule", "DancerConfig", "FactorConv3d", "FrameAttentionAlign", "LayerNorm2D", "SteadyDancerDiT"]


# ---------------------------------------------------------------------------------------------
# Pose modules (official names: small_archs.py, mobilenetv2_dcd.py). Norms in fp32.
# ---------------------------------------------------------------------------------------------


class LayerNorm2D(nn.Module):
    """LayerNorm over the channels of [N, C, H, W] (biased variance), affine params shaped [1, C, 1, 1]."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean, var = xf.mean(dim=1, keepdim=True), xf.var(dim=1, keepdim=True, unbiased=False)
        xf = (xf - mean) / torch.sqrt(var + self.eps)
        return (xf * self.weight.float() + self.bias.float()).to(x.dtype)


class _GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class FactorConv3d(nn.Module):
    """(2+1)D conv: depthwise 1×k×k spatial conv (no bias) → SiLU → k×1×1 temporal conv. Same-size padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3):
        super().__init__()
        pad = (kernel - 1) // 2
        self.spatial = nn.Conv3d(in_channels, in_channels, (1, kernel, kernel), padding=(0, pad, pad),
                                 groups=in_channels, bias=False)
        self.temporal = nn.Conv3d(in_channels, out_channels, (kernel, 1, 1), padding=(pad, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))      # [B, C, T, H, W] -> [B, C_out, T, H, W]


def _hsigmoid(x: torch.Tensor) -> torch.Tensor:
    # DCD's Hsigmoid divides by 3, not 6: it ranges over [0, 2]. Kept as trained.
    return F.relu6(x + 3.0) / 3.0


class _SqueezeExcite(nn.Module):
    """DCD's SEModule_small: x * hsigmoid(fc(x)); its Linear sits at `fc.0` like the official Sequential."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _hsigmoid(self.fc(x))


class DYModule(nn.Module):
    """Dynamic 1×1 conv per frame (DCD, "dynamic convolution decomposition"), the spatial pose branch.

    out = conv_p(Φ(x)·z + z) + scale(x)·conv(x), with z = bn1(conv_q(x)) in a `dim`-channel latent space and
    Φ, scale predicted from the globally pooled frame. Only the official inp == oup case (16 → 16, dim 4).
    """

    def __init__(self, channels: int, fc_squeeze: int = 8):
        super().__init__()
        # DCD's sizing rule for inp == oup: halve until dim² <= 2·channels, at least 4.
        reduction = 2
        while (channels // reduction) ** 2 > 2 * channels:
            reduction *= 2
        self.dim = max(4, channels // reduction)
        squeeze = max(4, max(channels, self.dim**2) // fc_squeeze)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv_q = nn.Conv2d(channels, self.dim, 1, bias=False)
        self.fc = nn.Sequential(nn.Linear(channels, squeeze, bias=False), _SqueezeExcite(squeeze))
        self.fc_phi = nn.Linear(squeeze, self.dim**2, bias=False)
        self.fc_scale = nn.Linear(squeeze, channels, bias=False)
        self.conv_p = nn.Conv2d(self.dim, channels, 1, bias=False)
        self.bn1 = _GroupNorm(4, self.dim)
        self.bn2 = _GroupNorm(4, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, C, H, W] (N = frames) -> [N, C, H, W]
        n, _, h, w = x.shape
        pooled = self.fc(x.mean(dim=(2, 3)))                                   # [N, squeeze]
        phi = self.fc_phi(pooled).view(n, self.dim, self.dim)
        static = _hsigmoid(self.fc_scale(pooled))[:, :, None, None] * self.conv(x)
        z = self.bn1(self.conv_q(x)).flatten(2)                                # [N, dim, H*W]
        z = self.bn2(phi @ z) + z
        return self.conv_p(z.view(n, self.dim, h, w)) + static


class FrameAttentionAlign(nn.Module):
    """Frame-wise Attention Alignment Unit (official PoseRefNetNoBNV3): the pose features attend to the noisy
    latent across frames. Queries come from the latent, keys/values from the pose, one sequence of T frames per
    spatial position (the official module hands nn.MultiheadAttention [T, H·W, C] with batch_first=False)."""

    def __init__(self, pose_channels: int, latent_channels: int, hidden: int, heads: int):
        super().__init__()
        self.proj_p = nn.Conv2d(pose_channels, hidden, 1)
        self.proj_r = nn.Conv2d(latent_channels, hidden, 1)
        self.proj_p_back = nn.Conv2d(hidden, pose_channels, 1)
        self.cross_attn = nn.MultiheadAttention(hidden, heads)   # inference only: the trained dropout is off
        self.ffn_pose = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1))
        self.norm1 = LayerNorm2D(hidden)
        self.norm2 = LayerNorm2D(hidden)

    def forward(self, pose: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        # pose [B, C_p, T, H, W], latent [B, C_x, T, H, W] -> [B, C_p, T, H, W]
        b, _, t, h, w = pose.shape
        p, r = self.proj_p(_frames(pose)), self.proj_r(_frames(latent))       # [B*T, hidden, H, W]

        def sequences(z: torch.Tensor) -> torch.Tensor:   # [B*T, C, H, W] -> [T, B*H*W, C]
            return z.view(b, t, -1, h * w).permute(1, 0, 3, 2).reshape(t, b * h * w, -1)

        out = self.cross_attn(sequences(r), sequences(p), sequences(p), need_weights=False)[0]
        out = out.view(t, b, h * w, -1).permute(1, 0, 3, 2).reshape(b * t, -1, h, w)
        out = self.norm1(out)
        out = self.norm2(out + self.ffn_pose(out))
        return _unframes(self.proj_p_back(out), b)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (b-major, like einops '(b t) c h w')."""
    return x.transpose(1, 2).flatten(0, 1)


def _unframes(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


class PatchEmbed3d(nn.Conv3d):
    """Wan's Conv3d patch embedding (kernel = stride = patch), run as patchify + Linear on the same weight:
    returns tokens [B, T'*H'*W', dim] in (t h w) order, exactly Conv3d(x).flatten(2).transpose(1, 2)."""

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = cast(tuple[int, int, int], self.kernel_size)
        return F.linear(patchify(x, patch), self.weight.flatten(1), self.bias)


class MLPProj(nn.Module):
    """CLIP features -> context tokens: LayerNorm, Linear, GELU (exact), Linear, LayerNorm (eps 1e-5, affine)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(WanLayerNorm(in_dim, 1e-5, elementwise_affine=True), nn.Linear(in_dim, in_dim),
                                  nn.GELU(), nn.Linear(in_dim, dim), WanLayerNorm(dim, 1e-5, elementwise_affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.proj(x))


# ---------------------------------------------------------------------------------------------
# Attention layers and block (original Wan2.1 layout: dense self-attention without proj_l)
# ---------------------------------------------------------------------------------------------


class I2VCrossAttention(WanCrossAttention):
    """Cross-attention to [CLIP tokens ‖ text tokens]: the text attention (q, k, v, o) plus an image one
    (k_img, v_img, norm_k_img), summed before `o`. All tokens are attended, zero-padded text included."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_tokens: int):
        super().__init__(dim, num_heads, eps)
        self.image_tokens = image_tokens
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        image, text = context[:, :self.image_tokens], context[:, self.image_tokens:]
        q = self.norm_q(self.q(x)).unflatten(-1, heads)                       # [B, L, H, Dh]
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        v = self.v(text).unflatten(-1, heads)
        k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads)
        v_img = self.v_img(image).unflatten(-1, heads)
        out = cross_attention(q, k, v) + cross_attention(q, k_img, v_img)
        return self.o(out.flatten(2))


def dancer_block(config: WanConfig, image_tokens: int) -> WanAttentionBlock:
    """WanAttentionBlock in the original layout: dense self-attention (no SLA proj_l), image + text
    cross-attention."""
    return WanAttentionBlock(config, None, cross_attn=I2VCrossAttention(config.dim, config.num_heads, config.eps,
                                                                        image_tokens))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SteadyDancerDiT(DiTCommon, nn.Module):
    """SteadyDancer-14B DiT. forward(x, timestep, context, y=, pose=, ref_x=, ref_c=, clip_fea_x=, clip_fea_c=)
    -> velocity (float32). Dense attention only; `sdpa_backends` restricts SDPA's kernels (None: torch picks)."""

    def __init__(self, config: WanConfig, dancer: DancerConfig = DancerConfig(), *,
                 sdpa_backends: Sequence[SDPBackend] | None = None):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"{config.name}: dim {config.dim} must split into {config.num_heads} even-sized heads")
        self.config, self.dancer = config, dancer
        self.sdpa_backends = tuple(sdpa_backends) if sdpa_backends else None
        dim, pose_dim, patch = config.dim, dancer.pose_dim, config.patch_size
        # Condition reconciliation: ref_x, then [x ‖ y ‖ fused pose ‖ aligned pose], then ref_c.
        self.patch_embedding = PatchEmbed3d(config.in_dim, dim, patch)
        self.patch_embedding_fuse = PatchEmbed3d(config.in_dim + 2 * pose_dim, dim, patch)
        self.patch_embedding_ref_c = PatchEmbed3d(pose_dim, dim, patch)
        # Synergistic pose modulation: spatial (per frame), temporal, and alignment to the noisy latent.
        self.condition_embedding_spatial = DYModule(pose_dim)
        self.condition_embedding_temporal = nn.Sequential(
            FactorConv3d(pose_dim, pose_dim), nn.SiLU(), FactorConv3d(pose_dim, pose_dim), nn.SiLU(),
            FactorConv3d(pose_dim, pose_dim), nn.SiLU())
        self.condition_embedding_align = FrameAttentionAlign(pose_dim, config.out_dim, dancer.align_dim,
                                                             dancer.align_heads)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(dancer_block(config, dancer.clip_tokens) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self.img_emb = MLPProj(dancer.clip_dim, dim)
        # As in WanDiT: RoPE tables are a plain cache, not state; the weight-streaming hook (engine/experts.py)
        # is called with -1 before everything outside the blocks and with i before block i.
        self._rope_cache: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.wait_for_weights: Callable[[int], None] | None = None

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *, y: torch.Tensor,
                pose: torch.Tensor, ref_x: torch.Tensor, ref_c: torch.Tensor, clip_fea_x: torch.Tensor,
                clip_fea_c: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising call, batch B (each row independent; stack rows for CFG).

        x           [B, 16, T, H, W]    noisy latent (H, W in latents, multiples of the patch)
        timestep    [B]                 t*1000 (the flow-matching scheduler's timesteps)
        context     [B, L, 4096]        umT5 embeddings, zero-padded to text_len here if L is shorter
        y           [B, 20, T, H, W]    first-frame mask (4) ‖ VAE latent of [image, zero frames] (16)
        pose        [B, 16, T, H, W]    VAE latent of the rendered pose video; the pose-CFG pass gives the
                                        negative (misaligned) pose latent here, nothing else changes
        ref_x       [B, 36, 1, H, W]    VAE(reference image) ‖ ones mask (4) ‖ VAE(reference image)
        ref_c       [B, ≥16, 1, H, W]   VAE latent of the first pose frame; only the first 16 channels are
                                        read (the official pipeline passes latent ‖ zero mask ‖ latent)
        clip_fea_x  [B, 257, 1280]      CLIP features of the reference image
        clip_fea_c  [B, 257, 1280]      CLIP features of the first pose frame, or None; the two are summed
                                        after `img_emb`, as the official model does
        -> velocity [B, 16, T, H, W] float32 (the reference frames are cut)
        """
        cfg, patch = self.config, self.config.patch_size
        _, _, t, h, w = x.shape
        if pose.shape[2:] != x.shape[2:] or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"pose {tuple(pose.shape)} and y {tuple(y.shape)} must match x {tuple(x.shape)} "
                             "in T, H, W")
        if clip_fea_x.shape[1] != self.dancer.clip_tokens:
            raise ValueError(f"clip_fea_x has {clip_fea_x.shape[1]} tokens, not {self.dancer.clip_tokens}")
        grid_hw = (h // patch[1], w // patch[2])
        dtype = self.dtype
        wait = self.wait_for_weights
        with self._sdpa_context():
            if wait is not None:
                wait(-1)
            noisy, pose = x.to(dtype), pose.to(dtype)
            spatial = _unframes(self.condition_embedding_spatial(_frames(pose)), pose.shape[0])
            fused = pose + self.condition_embedding_temporal(pose) + spatial
            aligned = self.condition_embedding_align(fused, noisy)
            tokens = torch.cat([
                self.patch_embedding_fuse(torch.cat([noisy, y.to(dtype), fused, aligned], dim=1)),
                self.patch_embedding(ref_x.to(dtype)),
                self.patch_embedding_ref_c(ref_c[:, :self.dancer.pose_dim].to(dtype)),
            ], dim=1)                                                   # [B, (T'+2)*H'*W', dim], refs last in time
            video_tokens = (t // patch[0]) * math.prod(grid_hw)
            cos, sin = self.rope_tables((tokens.shape[1] // math.prod(grid_hw), *grid_hw), x.device)

            e, e0 = self.time_conditioning(timestep)
            if context.shape[1] < cfg.text_len:
                context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
            image = self.img_emb(clip_fea_x.to(dtype))
            if clip_fea_c is not None:
                image = image + self.img_emb(clip_fea_c.to(dtype))
            context = torch.cat([image, self.text_embedding(context.to(dtype))], dim=1)

            for i, block in enumerate(self.blocks):
                if wait is not None:
                    wait(i)
                tokens = block(tokens, e0, cos, sin, context)
            self.wait_for_weights = None

            out = self.head(tokens[:, :video_tokens], e)                # the head is per token: skip the refs
        return unpatchify(out, (t // patch[0], *grid_hw), patch)

    def _sdpa_context(self) -> contextlib.AbstractContextManager[Any]:
        return sdpa_kernel(list(self.sdpa_backends)) if self.sdpa_backends else contextlib.nullcontext()

    def set_attention(self, kind: AttentionType, topk: float) -> None:
        """WanDiT's per-request hook. SteadyDancer was trained with dense attention: only `original` runs."""
        if kind is not AttentionType.ORIGINAL:
            raise RequestError("attention_type", kind.value, "original (SteadyDancer has no SLA weights)")

