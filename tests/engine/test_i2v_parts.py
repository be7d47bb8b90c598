"""Image-to-video building blocks (the i2v pipeline composes them): the expert switch of the
rCM schedule, adaptive sizes, image conversion and the first-frame mask."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from engine.conditioning import MAX_SIDE, adaptive_size, first_frame_mask, image_to_tensor, load_rgb
from engine.errors import RequestError
from engine.sampler import expert_schedule, rcm_timesteps


def test_t_values_at_sigma_max_200():
    assert [round(t, 3) for t in rcm_timesteps(200.0, 4)[:-1]] == [0.995, 0.934, 0.853, 0.609]


@pytest.mark.parametrize("sigma, steps, want", [
    (200.0, 1, ["high"]), (200.0, 2, ["high", "high"]), (200.0, 3, ["high", "high", "low"]),
    (200.0, 4, ["high", "high", "low", "low"]),
    (80.0, 1, ["high"]), (80.0, 2, ["high", "high"]), (80.0, 3, ["high", "high", "low"]),
    (80.0, 4, ["high", "high", "low", "low"]),
])
def test_the_expert_switches_once_at_the_first_step_below_the_boundary(sigma, steps, want):
    assert expert_schedule(sigma, steps, boundary=0.9) == want


def test_a_low_boundary_keeps_the_high_expert_longer():
    assert expert_schedule(200.0, 4, boundary=0.7) == ["high", "high", "high", "low"]
    assert expert_schedule(200.0, 4, boundary=0.5) == ["high"] * 4


@pytest.mark.parametrize("image, want", [
    ((1000, 1000), (960, 960)),      # 1:1 at 720p 16:9's area (1280×720 = 921,600 px)
    ((2100, 900), (1472, 624)),      # 21:9
    ((900, 2100), (624, 1472)),      # 9:21
    ((4000, 3), (MAX_SIDE, 32)),     # extreme: the width clamped to the model's range, never 0
    ((3, 4000), (32, MAX_SIDE)),
])
def test_adaptive_size_keeps_the_area_follows_the_aspect_multiples_of_16(image, want):
    w, h = adaptive_size((1280, 720), image)
    assert (w, h) == want and w % 16 == 0 and h % 16 == 0
    if image[0] < 4 * image[1] and image[1] < 4 * image[0]:
        assert abs(w * h - 1280 * 720) / (1280 * 720) < 0.05


def _save(tmp_path, image: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6          # rotate 90° clockwise to view
    path = _save(tmp_path, image, "rot.jpg", exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_modes_convert_correctly(tmp_path):
    sixteen = Image.new("I;16", (8, 8))
    sixteen.putdata([65535] * 32 + [0] * 32)
    rgb = load_rgb(_save(tmp_path, sixteen, "deep.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((0, 7)) == (0, 0, 0)
    assert load_rgb(_save(tmp_path, Image.new("L", (8, 8), 128), "gray.png")).getpixel((1, 1)) == (128,) * 3
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    assert load_rgb(_save(tmp_path, pal, "pal.png")).getpixel((0, 0)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))             # red in CMYK
    r, g, b = load_rgb(_save(tmp_path, cmyk, "c.jpg", quality=100)).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))             # fully transparent
    assert load_rgb(_save(tmp_path, clear, "a.png")).getpixel((3, 3)) == (255, 255, 255)


def test_tiny_and_huge_images_are_refused(tmp_path):
    with pytest.raises(RequestError, match="2×2"):
        load_rgb(_save(tmp_path, Image.new("RGB", (1, 1)), "dot.png"))
    with pytest.raises(RequestError, match="at most 100 pixels"):
        load_rgb(_save(tmp_path, Image.new("RGB", (20, 20)), "big.png"), max_pixels=100)


def test_image_tensor_and_mask():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    t = image_to_tensor(image, 32, 16)
    assert t.shape == (1, 3, 16, 32) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0], torch.ones(16, 32)) and torch.allclose(t[0, 1], -torch.ones(16, 32))
    mask = first_frame_mask(5, 4, 6)
    assert mask.shape == (1, 4, 5, 4, 6) and mask[:, :, 0].min() == 1 and mask[:, :, 1:].max() == 0
