"""Faster Wan VAE decoding, each part opt-in until measured (issue 11, item 4; bench/vae.py).

    decoder = FastDecoder(vae, DecodeSettings.from_name("taps+graphed"))
    frames = decoder.decode_to_uint8(latents)       # what WanVAE.decode_to_uint8 returns

The parts, freely combined:
- "taps": the VAE's convolutions as 2-D cuDNN convs over frame slices (WanVAE.set_conv_impl).
- "compiled": torch.compile of the steady-state decoder step (one latent frame), so inductor
  fuses RMSNorm, SiLU and the cache concatenation around the convolutions.
- "graphed": the steady-state step replayed as one CUDA graph. From the second latent frame on a
  step has fixed shapes and only updates its cache tensors in place (engine/wan_vae.py), so it is
  captured once per latent shape and reused by every later video of that shape (CUDA only;
  elsewhere the step runs eagerly).

Also the fast preview: `decode_preview` decodes 2× spatially downsampled latents (a quarter of
the pixels); the product upscales it with ffmpeg's lanczos. `upscale_lanczos` and `psnr` measure
what that costs against the full decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .wan_vae import CONV_IMPLS, FeatureCache, WanVAE

__all__ = ["DecodeSettings", "FastDecoder", "decode_preview", "downsample_latents", "psnr", "upscale_lanczos"]

DecoderStep = Callable[[Tensor, FeatureCache], Tensor]   # WanVAE._decode_frame's signature


@dataclass(frozen=True)
class DecodeSettings:
    """How FastDecoder decodes; the defaults are plain WanVAE.decode_to_uint8.

    Named by "+"-joined parts ("taps+compiled+graphed") or "eager" for none; see from_name.
    """

    conv_impl: str = "conv3d"   # "taps": WanVAE.set_conv_impl
    compile: bool = False       # torch.compile the steady-state decoder step
    graphs: bool = False        # replay the steady-state step as a CUDA graph (CUDA only)

    PARTS = ("taps", "compiled", "graphed")

    def __post_init__(self) -> None:
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl {self.conv_impl!r}: allowed {', '.join(CONV_IMPLS)}")

    @classmethod
    def from_name(cls, name: str) -> DecodeSettings:
        parts = set(name.split("+")) - {"eager"}
        unknown = parts - set(cls.PARTS)
        if unknown or not name:
            raise ValueError(f"decode variant {name!r}: use 'eager' or '+'-joined parts of "
                             f"{', '.join(cls.PARTS)} (e.g. 'taps+graphed')")
        return cls(conv_impl="taps" if "taps" in parts else "conv3d",
                   compile="compiled" in parts, graphs="graphed" in parts)

    @property
    def name(self) -> str:
        on = (self.conv_impl == "taps", self.compile, self.graphs)
        return "+".join(p for p, used in zip(self.PARTS, on) if used) or "eager"


class FastDecoder:
    """WanVAE.decode_to_uint8 with the speed-ups of `settings`.

    The first `eager_frames` latent frames of each video run eagerly (frame 0 fills the cache
    slots; from frame 1 on every step has the same shapes). The conv impl is VAE state: it is set
    on the shared VAE before each decode. Captured graphs read the weights where they lie: after
    weights move (load_state_dict, use_channels_last) the graphs are dropped and captured again.
    """

    def __init__(self, vae: WanVAE, settings: DecodeSettings = DecodeSettings(), *, eager_frames: int = 1):
        if eager_frames < 1:
            raise ValueError(f"eager_frames must be at least 1 (frame 0 fills the cache), got {eager_frames}")
        self.vae, self.settings, self.eager_frames = vae, settings, eager_frames
        self.graphs_enabled = settings.graphs and vae.device.type == "cuda"
        # dynamic=False: a few fixed latent shapes, each compiled for its own sizes.
        self._step: DecoderStep = (torch.compile(vae._decode_frame, dynamic=False) if settings.compile
                                   else vae._decode_frame)
        self._graphs: dict[tuple[object, ...], _GraphedStep] = {}
        self._weights: tuple[int, ...] = ()
        self._current: _GraphedStep | None = None   # the graph of the video being decoded

    @torch.inference_mode()
    def decode_to_uint8(self, latents: Tensor) -> Tensor:
        """normalized latents [1, 16, T, h, w] -> frames [F, 8h, 8w, 3] uint8 on the CPU."""
        if self.vae.conv_impl != self.settings.conv_impl:
            self.vae.set_conv_impl(self.settings.conv_impl)
        return self.vae._decode_to_uint8(latents, self._frame_step)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _frame_step(self, t: int, z_frame: Tensor, cache: FeatureCache) -> Tensor:
        if t < self.eager_frames:
            return self.vae._decode_frame(z_frame, cache)
        if not self.graphs_enabled:
            return self._step(z_frame, cache)
        if t == self.eager_frames:
            self._current = self._graph_for(z_frame, cache)
            self._current.load(cache)
            cache.clear()   # the graph's static copy carries the state from here on
        assert self._current is not None
        return self._current.replay(z_frame)

    def _graph_for(self, z_frame: Tensor, cache: FeatureCache) -> _GraphedStep:
        weights = tuple(p.data_ptr() for p in self.vae.decoder.parameters())
        if weights != self._weights:   # new or moved weights: the old graphs read freed memory
            self._graphs.clear()
            self._weights = weights
        key = (tuple(z_frame.shape), z_frame.stride(), z_frame.dtype, z_frame.device, self.vae.conv_impl)
        if key not in self._graphs:
            self._graphs[key] = _GraphedStep(self._step, z_frame, cache)
        return self._graphs[key]


class _GraphedStep:
    """One steady-state decoder step captured in a CUDA graph, with the static tensors it reads
    and writes: the input frame, the cache slots (updated in place by every replay) and the
    output frames (overwritten by the next replay)."""

    WARMUP_STEPS = 2   # cuDNN autotuning and the first compiled call happen before capture

    def __init__(self, step: DecoderStep, z_frame: Tensor, cache: FeatureCache):
        if any(slot is None for slot in cache):
            raise RuntimeError("capture needs a warm decoder cache (run latent frame 0 first)")
        self.z_frame = z_frame.clone()
        self.cache: list[Tensor] = [slot.clone() for slot in cache if slot is not None]
        device = z_frame.device
        # Warm up on a side stream, as capture requires. The steps mutate self.cache; load()
        # overwrites it with the live state before the first replay.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                step(self.z_frame, list(self.cache))
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        slots: FeatureCache = list(self.cache)
        # thread_local: other threads (an encoder, a loader) may allocate while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.frames = step(self.z_frame, slots)
        if any(a is not b for a, b in zip(slots, self.cache)):
            raise RuntimeError("the decoder step replaced a cache slot: it is not a steady-state step")

    def load(self, cache: FeatureCache) -> None:
        """Copy a video's live cache state into the static slots."""
        live = [slot for slot in cache if slot is not None]
        if len(live) != len(self.cache):
            raise RuntimeError("a video's decoder cache is not warm (run latent frame 0 first)")
        for static, slot in zip(self.cache, live):
            static.copy_(slot)

    def replay(self, z_frame: Tensor) -> Tensor:
        self.z_frame.copy_(z_frame)
        self.graph.replay()
        return self.frames


# ---------------------------------------------------------------------------------------------
# Fast preview
# ---------------------------------------------------------------------------------------------


class _Decoder(Protocol):   # WanVAE or FastDecoder
    def decode_to_uint8(self, latents: Tensor) -> Tensor: ...


def downsample_latents(latents: Tensor, factor: int = 2) -> Tensor:
    """[B, 16, T, h, w] -> [B, 16, T, ceil(h/f), ceil(w/f)] float32: the mean of each f×f block.

    Area averaging is the plain anti-aliased downsample: each latent pixel codes an 8×8 patch,
    and the block mean keeps each channel's local mean (the colour and brightness of the patch).
    At exactly 2× it equals bilinear without antialias; antialiased bilinear's wider triangle
    filter would only blur across blocks. Averaging commutes with the per-channel normalization.
    """
    _, _, t, h, w = latents.shape
    size = (t, math.ceil(h / factor), math.ceil(w / factor))
    return F.interpolate(latents.float(), size=size, mode="area")


def decode_preview(decoder: _Decoder, latents: Tensor, factor: int = 2) -> Tensor:
    """Decode at 1/factor resolution: latents [1, 16, T, h, w] -> frames [F, 8h/f, 8w/f, 3] uint8
    on the CPU (h, w multiples of f; otherwise rounded up). A quarter of the decoder's work at 2×."""
    return decoder.decode_to_uint8(downsample_latents(latents, factor))


def upscale_lanczos(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 frames [F, h, w, 3] -> [F, height, width, 3] with a Lanczos filter, as ffmpeg's
    `scale=...:flags=lanczos` would upscale a preview (OpenCV's 8-tap LANCZOS4; PIL's 6-tap
    LANCZOS, ffmpeg's own width, when OpenCV is missing)."""
    images = frames.numpy()
    try:
        import cv2
        out = [cv2.resize(img, (width, height), interpolation=cv2.INTER_LANCZOS4) for img in images]
    except ImportError:
        from PIL import Image
        out = [np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))
               for img in images]
    return torch.from_numpy(np.stack(out))


def psnr(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images or videos, in dB (inf when identical).
    Tensors may sit on the GPU (a 720p video is 224 M values)."""
    x, y = torch.as_tensor(a), torch.as_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    diff = (x.to(torch.int16) - y.to(torch.int16)).float()   # exact: squares < 2^24
    mse = float(diff.square().sum(dtype=torch.float64)) / max(diff.numel(), 1)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
