"""Image conditioning for image-to-video, as TurboDiffusion's `wan2.2_i2v_infer.py` prepares it.

    image file ─ EXIF orientation, any mode (16-bit, grayscale, palette, CMYK, alpha) ─▶ RGB
               ─ adaptive size (the preset's area, the image's aspect, multiples of 16) ─▶ (w, h)
               ─ resize with antialiasing, [-1, 1] ─▶ [1, 3, 1, H, W], then F−1 zero frames
    VAE encode ─▶ latents [1, 16, T, H/8, W/8];  y = cat(mask [1, 4, T, …] = 1 on frame 0, latents)
    the DiT sees cat(x, y): 16 + 20 = 36 channels

Pure functions: the i2v pipeline calls them; the fetch stage has already checked the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import RequestError

__all__ = ["MAX_IMAGE_PIXELS", "MAX_SIDE", "SIZE_STRIDE", "adaptive_size", "first_frame_mask",
           "image_to_tensor", "load_rgb"]

SIZE_STRIDE = 16            # VAE stride 8 × patch 2: every side a multiple of this
MAX_SIDE = 2048             # the DiT's RoPE tables cover 128 patches of 16 px a side
MAX_IMAGE_PIXELS = 64_000_000   # a larger image is refused (decompression-bomb guard)


def adaptive_size(target: tuple[int, int], image: tuple[int, int]) -> tuple[int, int]:
    """(w, h) with the area of `target` (w, h) and the aspect of `image` (w, h), each side a
    multiple of 16 (rounded as TurboDiffusion rounds, to the nearest), stretched, never cropped.
    Extreme aspects are clamped to 16..2048 px a side (the model's range), which then keeps the
    aspect as far as that allows rather than the area."""
    area = target[0] * target[1]
    aspect = image[1] / image[0]                          # h / w
    ideal_w, ideal_h = math.sqrt(area / aspect), math.sqrt(area * aspect)
    lo, hi = 1, MAX_SIDE // SIZE_STRIDE
    w = min(hi, max(lo, round(ideal_w / SIZE_STRIDE)))
    h = min(hi, max(lo, round(ideal_h / SIZE_STRIDE)))
    return w * SIZE_STRIDE, h * SIZE_STRIDE


def load_rgb(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied). 16-bit images are scaled, not
    clipped; palette and alpha images are composited over white; CMYK is converted."""
    with Image.open(path) as opened:
        if opened.width * opened.height > max_pixels:
            raise RequestError("image", str(path), f"at most {max_pixels} pixels "
                                                   f"(this one is {opened.width}×{opened.height})")
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.width < 2 or image.height < 2:
        raise RequestError("image", str(path), f"at least 2×2 pixels (this one is {image.width}×{image.height})")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
        gray = np.clip(np.rint(wide / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1], resized with antialiasing (as torchvision's Resize)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels / 255.0, size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False)
    return (resized.clamp(0, 1) - 0.5) / 0.5


def first_frame_mask(latent_t: int, latent_h: int, latent_w: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None) -> torch.Tensor:
    """[1, 4, T, H, W]: 1 on latent frame 0 (the given image), 0 elsewhere."""
    mask = torch.zeros(1, 4, latent_t, latent_h, latent_w, dtype=dtype, device=device)
    mask[:, :, 0] = 1.0
    return mask
