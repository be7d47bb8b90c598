"""Wan2.1 causal 3-D VAE: video [B, 3, F, H, W] in [-1, 1] <-> latents [B, 16, T, H/8, W/8].

The module tree reproduces `Wan2.1_VAE.pth` exactly (keys, shapes and order, checked by
tests/engine/test_vae.py), so the file loads strictly with `load_state_dict(assign=True)`.

Time is causal: every 3-D conv pads only on the left in time, so frame t never sees frames after t.
The video is processed in chunks (encoder: frame 1, then 4 frames at a time; decoder: one latent
frame at a time), and each time-kernel conv keeps the last `CACHE_T` frames of its input in a
feature cache so that chunked processing equals processing the whole clip at once.

Cache layout: one slot per caching module, numbered once at construction (`cache_slot`). A cache is
a plain `list[Tensor | None]`; a slot is `None` before the first chunk and afterwards holds a tensor
that later chunks update in place (`copy_`), so steady-state decoder steps allocate no cache memory
and run with the same shapes: the shape a CUDA graph capture of `WanVAE._decode_frame` needs
(engine/vae_speed.py captures one).

Convolutions run as cuDNN 3-D convs by default; `WanVAE.set_conv_impl("taps")` runs the causal
ones (and the per-frame 2-D ones) as 2-D convs over frame slices instead: same numbers up to float
rounding, a different set of cuDNN kernels.

Nothing here is a buffer: the module is safe to build on `meta` and load with `assign=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig

__all__ = ["CONV_IMPLS", "LATENT_MEAN", "LATENT_STD", "WanVAE", "denormalize_latents", "normalize_latents"]

CACHE_T = 2  # frames of history a causal time-kernel-3 conv needs

# Per-channel statistics of the 16 latent channels (Wan2.1 `WanVAE`): latents given to and taken
# from the DiT are (mu - mean) / std.
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

FeatureCache = list[Tensor | None]
# One decoder step as _decode_chunks calls it: (latent frame index, z_frame, cache) -> frames.
FrameStep = Callable[[int, Tensor, FeatureCache], Tensor]
CL3D = torch.channels_last_3d
CONV_IMPLS = ("conv3d", "taps")  # see WanVAE.set_conv_impl


def _zeros_like_layout(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros of `shape` in x's memory layout (channels-last-3d or contiguous)."""
    fmt = CL3D if not x.is_contiguous() and x.is_contiguous(memory_format=CL3D) else torch.contiguous_format
    return torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)


def _nearest_up2(x: Tensor) -> Tensor:
    """Nearest ×2 in H and W, one copy, keeping channels-last layout (interpolate's 3-D nearest
    kernel works on NCDHW and would force two layout conversions per call)."""
    if not x.is_contiguous(memory_format=CL3D) or x.is_contiguous():
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
    b, c, t, h, w = x.shape
    pixels = x.permute(0, 2, 3, 4, 1)                                  # [B, T, H, W, C], contiguous
    up = pixels[:, :, :, None, :, None, :].expand(b, t, h, 2, w, 2, c).reshape(b, t, 2 * h, 2 * w, c)
    return up.permute(0, 4, 1, 2, 3)                                   # [B, C, T, 2H, 2W], channels-last


def _frames_are_images(x: Tensor) -> bool:
    """True for [1, C, T, H, W] in channels-last-3d: in NDHWC memory the frames of one video are a
    contiguous NHWC batch of images, so any run of consecutive frames, viewed [n, C, H, W]
    (_as_images), is a channels-last input for 2-D convs with no copy."""
    return x.shape[0] == 1 and x.is_contiguous(memory_format=CL3D)


def _as_images(x: Tensor) -> Tensor:
    """[1, C, T, H, W] -> [T, C, H, W] (a view)."""
    return x[0].transpose(0, 1)


def _as_frames(y: Tensor) -> Tensor:
    """[T, C, H, W] -> [1, C, T, H, W] channels-last-3d (a view when y is channels-last, as cuDNN's
    outputs for channels-last inputs are; CPU 1×1 convs may answer NCHW and get one copy).

    Through [1, T, H, W, C] so that even the batch dim has its channels-last-3d stride: with a
    stray stride there, elementwise ops on single frames fell back to NCDHW outputs.
    """
    y = y.contiguous(memory_format=torch.channels_last)
    return y.permute(0, 2, 3, 1).unsqueeze(0).permute(0, 4, 1, 2, 3)


def _tap_major(weight: Tensor) -> Tensor:
    """The same [O, C, kt, kh, kw] values stored as [kt, O, kh, kw, C], so that each time tap
    weight[:, :, k] is a channels-last 2-D kernel (a view, no copy per call)."""
    return weight.permute(2, 0, 3, 4, 1).contiguous().permute(1, 4, 0, 2, 3)


def _channel_stats(like: Tensor) -> tuple[Tensor, Tensor]:
    """LATENT_MEAN / LATENT_STD shaped [1, 16, 1, 1, 1] on like's device and dtype."""
    mean = torch.tensor(LATENT_MEAN, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(mu: Tensor) -> Tensor:
    """Raw posterior mean [B, 16, T, h, w] -> the DiT's latent space."""
    mean, std = _channel_stats(mu)
    return (mu - mean) / std


def denormalize_latents(latents: Tensor) -> Tensor:
    """Inverse of `normalize_latents`."""
    mean, std = _channel_stats(latents)
    return latents * std + mean


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding (2 × padding_t) sits entirely before the first frame.

    With a cache, the padding is the previous chunk's last frames instead of zeros (zeros before
    the very first chunk). Spatial padding is ordinary symmetric zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0):
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, pad_h, pad_w))
        self.time_pad = 2 * pad_t
        self.cache_slot = -1  # set by _number_cache_slots when time_pad > 0
        self.conv_impl = "conv3d"  # set by WanVAE.set_conv_impl

    @property
    def uses_cache(self) -> bool:
        return self.time_pad > 0

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        if self.time_pad:
            if cache is None:
                raise ValueError("CausalConv3d with a time kernel needs a feature cache")
            past = cache[self.cache_slot]
            if past is None:  # first chunk: history is zeros; keep its last frames from now on
                past = _zeros_like_layout(x, (x.shape[0], x.shape[1], self.time_pad, *x.shape[3:]))
                x = torch.cat([past, x], dim=2)
                cache[self.cache_slot] = x[:, :, -self.time_pad:].clone()
            else:
                x = torch.cat([past, x], dim=2)
                past.copy_(x[:, :, -self.time_pad:])
        if self.conv_impl == "taps" and _frames_are_images(x):
            return self._conv_taps(x)
        return super().forward(x)

    def _conv_taps(self, x: Tensor) -> Tensor:
        """This conv as a sum over its time taps k of a 2-D conv on frames k .. k + T_out - 1.

        x is [1, C, T, H, W] channels-last-3d (time padding already in place); each run of
        consecutive frames is an NHWC image batch (_frames_are_images), so no input is copied.
        The weights are stored tap-major (_tap_major) so weight[:, :, k] is not copied either.
        """
        taps = self.kernel_size[0]
        num_out = x.shape[2] - taps + 1
        padding = self.padding[1:]
        out = F.conv2d(_as_images(x[:, :, :num_out]), self.weight[:, :, 0], self.bias, padding=padding)
        for k in range(1, taps):
            out += F.conv2d(_as_images(x[:, :, k:k + num_out]), self.weight[:, :, k], padding=padding)
        return _as_frames(out)                                               # [1, O, T_out, H, W]


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels (dim 1), times sqrt(C) and a learned `gamma`.

    `gamma` is [C, 1, 1, 1] for video blocks and [C, 1, 1] for the attention block (file shapes);
    it is broadcast over whatever trails the channel dim.
    """

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1) if images else torch.ones(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.gamma.view(-1, *([1] * (x.ndim - 2)))
        return F.normalize(x, dim=1) * self.scale * gamma


class ResidualBlock(nn.Module):
    """RMSNorm-SiLU-conv-RMSNorm-SiLU-(dropout)-conv plus a 1×1×1 shortcut when channels change.

    `residual` stays an nn.Sequential only for its state-dict indices (0, 2, 3, 6); forward calls
    the layers by name.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_channels), nn.SiLU(),
            CausalConv3d(in_channels, out_channels, 3, padding=1),
            RMSNorm(out_channels), nn.SiLU(), nn.Identity(),  # index 5: dropout in training
            CausalConv3d(out_channels, out_channels, 3, padding=1))
        self.shortcut = (CausalConv3d(in_channels, out_channels, 1)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        # [B, C, T, H, W] -> [B·T, H·W, C]: one sequence of pixels per frame
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)             # each [B·T, 1, H·W, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        # [B·T, H·W, C] -> [B, C, T, H, W]
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def _frame_conv2d(conv: nn.Conv2d, x: Tensor, stride: int = 1, padding: int = 0,
                  conv_impl: str = "conv3d") -> Tensor:
    """Apply a Conv2d to every frame of [B, C, T, H, W]: as a (1, k, k) Conv3d (no reshapes), or
    with conv_impl "taps" as the 2-D conv itself on the frames viewed as images (batch 1,
    channels-last only; otherwise as conv3d)."""
    if conv_impl == "taps" and _frames_are_images(x):
        return _as_frames(F.conv2d(_as_images(x), conv.weight, conv.bias, stride=stride, padding=padding))
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride),
                    padding=(0, padding, padding))


class Resample(nn.Module):
    """Spatial ×2 up/down sampling, optionally with ×2 in time.

    upsample2d:   nearest ×2 in H, W, then 3×3 conv C -> C/2.
    upsample3d:   first a causal (3, 1, 1) `time_conv` C -> 2C whose two halves become two
                  consecutive output frames (T -> 2T), then as upsample2d. The first chunk of a
                  clip skips the time conv (its one frame stays one frame: 1 + 4k frames out).
    downsample2d: zero-pad right/bottom by 1, 3×3 conv stride 2.
    downsample3d: as downsample2d, then `time_conv` (3, 1, 1) stride 2 over the previous chunk's
                  last frame + this chunk. The first chunk skips it (its one frame stays).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r}: allowed {', '.join(self.MODES)}")
        self.mode = mode
        self.cache_slot = -1
        self.conv_impl = "conv3d"  # set by WanVAE.set_conv_impl (for the per-frame 2-D conv)
        # `resample` is a Sequential so the conv's key is `resample.1`; forward calls the conv
        # itself (as a per-frame conv3d) and does the upsampling / padding of index 0 inline.
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(channels, channels // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(channels, channels, 3, stride=2))
        self.time_conv: nn.Module
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(channels, channels * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    @property
    def uses_cache(self) -> bool:
        # upsample3d's time_conv owns its own slot (a CausalConv3d); downsample3d keeps one here.
        return self.mode == "downsample3d"

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        conv = cast(nn.Conv2d, self.resample[1])
        if self.mode.startswith("upsample"):
            x = _frame_conv2d(conv, _nearest_up2(x), padding=1, conv_impl=self.conv_impl)
        else:
            x = _frame_conv2d(conv, F.pad(x, (0, 1, 0, 1)), stride=2, conv_impl=self.conv_impl)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        slot = cast(CausalConv3d, self.time_conv).cache_slot
        if cache[slot] is None:
            # First chunk: no time conv. Later chunks see zero history, as Wan's first real call.
            cache[slot] = _zeros_like_layout(x, (*x.shape[:2], CACHE_T, *x.shape[3:]))
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)                          # [B, 2C, T, H, W]
        # channel halves are frame 2t and 2t+1: [B, 2, C, T, H, W] -> [B, C, T, 2, H, W] -> [B, C, 2T, H, W]
        if not y.is_contiguous() and y.is_contiguous(memory_format=CL3D):
            # channels-last: [B, T, H, W, 2C] -> [B, T, H, W, 2, C] -> [B, T, 2, H, W, C] -> [B, C, 2T, H, W]
            y = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)
            # contiguous() first: for t == 1 (every steady-state decoder step) a plain reshape
            # returned a view with the frame stride inside the pixel, not channels-last-3d, and
            # the layers after it lost the layout (interpolate's NCDHW path, a conversion per conv).
            return y.contiguous().view(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _halve_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        past = cache[self.cache_slot]
        if past is None:  # first chunk: keep its last frame, no time conv
            cache[self.cache_slot] = x[:, :, -1:].clone()
            return x
        x_in = torch.cat([past, x], dim=2)
        past.copy_(x[:, :, -1:])
        return self.time_conv(x_in)


def _number_cache_slots(root: nn.Module) -> int:
    """Give every caching module under root a distinct cache slot; return the number of slots."""
    count = 0
    for module in root.modules():
        if getattr(module, "uses_cache", False):
            module.cache_slot = count  # type: ignore[assignment]
            count += 1
    return count


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(channels, channels), AttentionBlock(channels),
                         ResidualBlock(channels, channels))


def _head(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_channels), nn.SiLU(),
                         CausalConv3d(in_channels, out_channels, 3, padding=1))


def _run_blocks(blocks: nn.Sequential, x: Tensor, cache: FeatureCache) -> Tensor:
    for block in blocks:
        x = block(x) if isinstance(block, AttentionBlock) else block(x, cache)
    return x


def _run_head(head: nn.Sequential, x: Tensor, cache: FeatureCache) -> Tensor:
    norm, _, conv = head
    return conv(F.silu(norm(x)), cache)


# ---------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """[B, 3, t, H, W] chunk -> [B, 2·z_dim, t', H/8, W/8] (mu and log-variance)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]   # 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                temporal = config.temporal_downsample[level]
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], config.z_dim * 2)
        self.num_cache_slots = _number_cache_slots(self)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run_blocks(self.downsamples, x, cache)
        x = _run_blocks(self.middle, x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """[B, z_dim, 1, h, w] latent frame -> [B, 3, 1 or 4, 8h, 8w] video frames."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1], *mult[::-1])]  # 384, 384, 384, 192, 96
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous Resample's 2-D conv halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(mult) - 1:
                temporal = temporal_upsample[level]
                blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)
        self.num_cache_slots = _number_cache_slots(self)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run_blocks(self.middle, x, cache)
        x = _run_blocks(self.upsamples, x, cache)
        return _run_head(self.head, x, cache)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE with the `Wan2.1_VAE.pth` layout. Runs in the module's dtype (bf16 on GPU,
    fp32 on CPU); inputs are cast to it, outputs come back as float32 (uint8 for frames)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

        self.channels_last = False
        self.conv_impl = "conv3d"

    def use_channels_last(self) -> WanVAE:
        """Run convolutions in channels-last-3d (NDHWC) layout.

        cuDNN's bf16 3-D convolutions on Hopper are NDHWC kernels: in the default layout every
        conv call converted its input and output (12 % of an H100 480p decode, measured with
        bench/profile_engine.py). Results are the same up to float rounding.
        """
        self.channels_last = True
        self._layout_weights()
        return self

    def set_conv_impl(self, conv_impl: str) -> WanVAE:
        """How convolutions run: "conv3d" (default) or "taps".

        "taps": a causal kt×kh×kw CausalConv3d becomes the sum over its kt time taps of a 2-D conv
        on frame slices, and the resamplers' per-frame convs run as 2-D convs, on cuDNN's 2-D NHWC
        kernels (which may beat its 3-D ones). It applies to batch-1 channels-last-3d inputs (see
        use_channels_last); anything else still runs conv3d. Same numbers up to float rounding.
        The causal convs' weights are re-laid-out in memory (shapes and values unchanged), so
        call this again after loading new weights.
        """
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl {conv_impl!r}: allowed {', '.join(CONV_IMPLS)}")
        self.conv_impl = conv_impl
        for m in self.modules():
            if isinstance(m, CausalConv3d | Resample):
                m.conv_impl = conv_impl
        self._layout_weights()
        return self

    def _layout_weights(self) -> None:
        """Weight memory layout for channels_last and conv_impl (values and shapes unchanged)."""
        for m in self.modules():
            if isinstance(m, CausalConv3d) and m.conv_impl == "taps":
                m.weight.data = _tap_major(m.weight.data)
            elif isinstance(m, nn.Conv3d):
                fmt = CL3D if self.channels_last else torch.contiguous_format
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
            elif isinstance(m, nn.Conv2d) and self.channels_last:
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=CL3D) if self.channels_last else x

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # 1. Encode --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 8
        -> normalized latents [B, 16, k+1, H/8, W/8] (float32, posterior mean)."""
        self._check_video(video)
        video = self._layout(video.to(device=self.device, dtype=self.dtype))
        cache: FeatureCache = [None] * self.encoder.num_cache_slots
        num_frames = video.shape[2]
        # Frame 0 alone, then 4-frame chunks: each chunk gives one latent frame.
        chunks = [video[:, :, :1]] + [video[:, :, i:i + 4] for i in range(1, num_frames, 4)]
        hidden = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu, _log_var = self.conv1(hidden).chunk(2, dim=1)
        return normalize_latents(mu.float())

    # 2. Decode --------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """normalized latents [B, 16, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] float32 in [-1, 1]."""
        self._check_latents(latents)
        b, _, t, h, w = latents.shape
        video = torch.empty(b, 3, 4 * (t - 1) + 1, 8 * h, 8 * w, device=self.device)
        for start, frames in self._decode_chunks(latents):
            video[:, :, start:start + frames.shape[2]] = frames.clamp(-1, 1)
        return video

    @torch.inference_mode()
    def decode_to_uint8(self, latents: Tensor) -> Tensor:
        """normalized latents [1, 16, T, h, w] -> frames [F, 8h, 8w, 3] uint8 on the CPU.

        Each decoded chunk is converted to uint8 on the device as soon as it exists; only the
        uint8 frames are copied to the host.
        """
        return self._decode_to_uint8(latents, self._eager_step)

    def _decode_to_uint8(self, latents: Tensor, step: FrameStep) -> Tensor:
        """decode_to_uint8 with a given decoder step (engine/vae_speed.py passes faster ones)."""
        self._check_latents(latents)
        if latents.shape[0] != 1:
            raise ValueError(f"decode_to_uint8 takes one video (batch 1), got batch {latents.shape[0]}")
        _, _, t, h, w = latents.shape
        frames_u8 = torch.empty(4 * (t - 1) + 1, 8 * h, 8 * w, 3, dtype=torch.uint8, device=self.device)
        for start, frames in self._decode_chunks(latents, step):
            # [1, 3, n, H, W] -> [n, H, W, 3] in 0..255
            pixels = frames[0].float().clamp_(-1, 1).add_(1).mul_(127.5).round_()
            frames_u8[start:start + frames.shape[2]] = pixels.permute(1, 2, 3, 0)
        return frames_u8.cpu()

    def _decode_chunks(self, latents: Tensor, step: FrameStep | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield (first output frame index, frames [B, 3, n, H, W]) per latent frame.

        The frames may live in a buffer that the next step overwrites (a CUDA graph's output):
        use them before asking for the next chunk.
        """
        step = step or self._eager_step
        z = denormalize_latents(latents.to(device=self.device, dtype=self.dtype))
        x = self._layout(self.conv2(self._layout(z)))
        cache = self.new_decoder_cache()
        for t in range(x.shape[2]):
            # latent frame 0 -> output frame 0; latent frame t > 0 -> output frames 4t-3 .. 4t
            yield (0 if t == 0 else 4 * t - 3), step(t, x[:, :, t:t + 1], cache)

    def new_decoder_cache(self) -> FeatureCache:
        return [None] * self.decoder.num_cache_slots

    def _eager_step(self, t: int, z_frame: Tensor, cache: FeatureCache) -> Tensor:
        return self._decode_frame(z_frame, cache)

    def _decode_frame(self, z_frame: Tensor, cache: FeatureCache) -> Tensor:
        """One decoder step: z_frame [B, 16, 1, h, w] (after conv2) -> [B, 3, 1 or 4, 8h, 8w].

        The first call on a fresh cache fills the cache slots (and yields one frame); every later
        call has fixed shapes and only updates cache tensors in place, so it can be captured in
        a CUDA graph once the cache is warm.
        """
        return self.decoder(z_frame, cache)

    # Input checks -------------------------------------------------------------------------------

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        if (f - 1) % 4 or h % 8 or w % 8:
            raise ValueError(f"video frames must be 4k+1 and H, W multiples of 8, got F={f}, H={h}, W={w}")

    def _check_latents(self, latents: Tensor) -> None:
        z_dim = self.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be [B, {z_dim}, T, h, w], got shape {tuple(latents.shape)}")
