"""Faster VAE decoding (engine/vae_speed.py, WanVAE.set_conv_impl): every variant decodes what the
default decode does; the steady-state step the CUDA graph captures really is steady; the preview
and its measurement helpers. CUDA graphs and torch.compile on CUDA are checked in the gpu tests."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import wan_vae
from engine.config import WanConfig
from engine.vae_speed import (
    DecodeSettings,
    FastDecoder,
    decode_preview,
    downsample_latents,
    psnr,
    upscale_lanczos,
)
from engine.wan_vae import CL3D, WanVAE

TINY = WanConfig.from_name("tiny-t2v").vae
REPO = Path(__file__).resolve().parents[2]


def _random_vae(seed: int = 0) -> WanVAE:
    """Tiny VAE with every weight ~N(0, 0.2) (default init leaves the norms' gamma at 1)."""
    torch.manual_seed(seed)
    vae = WanVAE(TINY).eval().requires_grad_(False)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.2)
    return vae


def _latents(frames: int = 3, h: int = 4, w: int = 6, seed: int = 2, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


# ---------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eager", "taps", "compiled", "graphed", "taps+graphed", "taps+compiled+graphed"])
def test_settings_names_round_trip(name):
    assert DecodeSettings.from_name(name).name == name


def test_settings_defaults_are_the_plain_decode():
    assert DecodeSettings() == DecodeSettings.from_name("eager")
    assert DecodeSettings.from_name("graphed+taps") == DecodeSettings(conv_impl="taps", graphs=True)


@pytest.mark.parametrize("name", ["", "fast", "taps+cudnn"])
def test_settings_reject_unknown_names_and_list_the_parts(name):
    with pytest.raises(ValueError, match="taps, compiled, graphed"):
        DecodeSettings.from_name(name)
    with pytest.raises(ValueError, match="conv3d, taps"):
        DecodeSettings(conv_impl="winograd")


# ---------------------------------------------------------------------------------------------
# 2. Time-tap convolution
# ---------------------------------------------------------------------------------------------


def test_taps_decode_and_encode_match_conv3d():
    plain = _random_vae().use_channels_last()
    taps = _random_vae().use_channels_last().set_conv_impl("taps")
    latents = _latents()
    expected = plain.decode(latents)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(taps.decode(latents), expected, rtol=0, atol=2e-5)
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.testing.assert_close(taps.encode(video), plain.encode(video), rtol=0, atol=2e-5)


def test_taps_run_every_decoder_conv_as_conv2d(monkeypatch):
    """With channels-last, no conv falls back to conv3d: the layout survives every layer
    (it did not after the temporal upsample of a one-frame step before _double_time's fix)."""
    vae = _random_vae().use_channels_last().set_conv_impl("taps")
    calls = []
    conv3d = F.conv3d

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return conv3d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv3d", counted)
    vae.decode(_latents())
    assert calls == []


def test_taps_fall_back_to_conv3d_where_frames_are_not_images():
    """Batch 2 or the default NCDHW layout: same numbers through conv3d."""
    plain, taps = _random_vae(), _random_vae().set_conv_impl("taps")
    latents = _latents(batch=2)
    torch.testing.assert_close(taps.decode(latents), plain.decode(latents), rtol=0, atol=2e-5)


def test_conv_impl_keeps_the_checkpoint_layout():
    vae = _random_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.use_channels_last().set_conv_impl("taps")
    after = vae.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    vae.set_conv_impl("conv3d")
    assert vae.decoder.conv1.weight.is_contiguous(memory_format=CL3D)
    with pytest.raises(ValueError, match="conv3d, taps"):
        vae.set_conv_impl("fft")


def test_one_frame_upsample3d_stays_channels_last():
    """A steady-state step doubles one frame into two: the result must be channels-last-3d, not a
    view with the frame stride inside the pixel (taps: the CPU's conv3d answers NCDHW)."""
    up = wan_vae.Resample(8, "upsample3d").eval()
    conv = cast(wan_vae.CausalConv3d, up.time_conv)
    conv.cache_slot, conv.conv_impl = 0, "taps"
    x = torch.randn(1, 8, 1, 3, 4).contiguous(memory_format=CL3D)
    with torch.no_grad():
        doubled = up._double_time(x, [torch.zeros(1, 8, 2, 3, 4).contiguous(memory_format=CL3D)])
        y = F.conv3d(F.pad(x.contiguous(), (0, 0, 0, 0, 2, 0)), conv.weight.contiguous(), conv.bias)
    assert doubled.shape == (1, 8, 2, 3, 4) and doubled.is_contiguous(memory_format=CL3D)
    torch.testing.assert_close(doubled, torch.stack([y[:, :8, 0], y[:, 8:, 0]], dim=2))


# ---------------------------------------------------------------------------------------------
# 3. The steady-state step the CUDA graph captures, and FastDecoder off CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_impl", ["conv3d", "taps"])
def test_decoder_step_is_steady_from_latent_frame_1(conv_impl):
    """After frame 0 every cache slot is a tensor; later steps keep the same tensors (updated
    in place, same shapes and strides) and give frames of one shape: what capture relies on."""
    vae = _random_vae().use_channels_last().set_conv_impl(conv_impl)
    with torch.inference_mode():
        x = vae._layout(vae.conv2(vae._layout(wan_vae.denormalize_latents(_latents(frames=4)))))
        cache = vae.new_decoder_cache()
        assert vae._decode_frame(x[:, :, :1], cache).shape[2] == 1
        slots = list(cache)
        assert all(isinstance(s, torch.Tensor) for s in slots)
        layout = [(s.shape, s.stride()) for s in slots if s is not None]
        shapes = set()
        for t in (1, 2, 3):
            shapes.add(tuple(vae._decode_frame(x[:, :, t:t + 1], cache).shape))
            assert all(a is b for a, b in zip(cache, slots))
            assert [(s.shape, s.stride()) for s in cache if s is not None] == layout
        assert shapes == {(1, 3, 4, 32, 48)}


@pytest.mark.parametrize("name", ["eager", "graphed", "taps+graphed"])
def test_fast_decoder_off_cuda_decodes_like_the_vae(name):
    """Graphs are CUDA-only: on the CPU they are skipped without error."""
    vae = _random_vae().use_channels_last()
    latents = _latents(frames=4)
    expected = vae.decode_to_uint8(latents)
    decoder = FastDecoder(vae, DecodeSettings.from_name(name))
    assert not decoder.graphs_enabled
    frames = decoder.decode_to_uint8(latents)
    assert frames.dtype == torch.uint8 and frames.shape == (13, 32, 48, 3)
    assert _max_diff(frames, expected) <= 1
    assert decoder.num_graphs == 0


def test_fast_decoder_sets_its_conv_impl_on_a_shared_vae():
    vae = _random_vae().use_channels_last()
    taps = FastDecoder(vae, DecodeSettings(conv_impl="taps"))
    plain = FastDecoder(vae)
    latents = _latents()
    plain.decode_to_uint8(latents)
    assert vae.conv_impl == "conv3d"
    taps.decode_to_uint8(latents)
    assert vae.conv_impl == "taps"


def test_fast_decoder_rejects_no_eager_frame():
    with pytest.raises(ValueError, match="eager_frames"):
        FastDecoder(_random_vae(), eager_frames=0)


# ---------------------------------------------------------------------------------------------
# 4. Preview and its measurement
# ---------------------------------------------------------------------------------------------


def test_downsample_latents_is_the_mean_of_each_block():
    latents = torch.arange(2 * 16 * 1 * 4 * 6, dtype=torch.float32).view(2, 16, 1, 4, 6)
    small = downsample_latents(latents)
    assert small.shape == (2, 16, 1, 2, 3)
    torch.testing.assert_close(small[1, 3, 0, 1, 2], latents[1, 3, 0, 2:4, 4:6].mean())
    assert downsample_latents(torch.zeros(1, 16, 2, 5, 7)).shape == (1, 16, 2, 3, 4)  # odd: rounded up


def test_preview_decodes_half_size_uint8_frames():
    vae = _random_vae().use_channels_last()
    frames = decode_preview(vae, _latents(frames=2, h=4, w=6))
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert frames.shape == (5, 16, 24, 3)
    assert torch.equal(decode_preview(FastDecoder(vae), _latents(frames=2, h=4, w=6)), frames)


def test_upscale_lanczos_shape_and_flat_frames_stay_flat():
    frames = torch.full((3, 16, 24, 3), 77, dtype=torch.uint8)
    frames[1] = 200
    big = upscale_lanczos(frames, 32, 48)
    assert big.shape == (3, 32, 48, 3) and big.dtype == torch.uint8
    assert (big[0] == 77).all() and (big[1] == 200).all()
    ramp = torch.linspace(0, 255, 24).round().to(torch.uint8).view(1, 1, 24, 1).expand(1, 16, 24, 3).contiguous()
    assert psnr(upscale_lanczos(ramp, 32, 48)[:, ::2, ::2], ramp) > 30   # a smooth image survives


def test_psnr_by_hand():
    a = np.zeros((2, 2), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0] = 10                                   # mse = 100 / 4 = 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))   # 34.15 dB
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(34.151, abs=1e-3)
    assert psnr(np.full(4, 255, np.uint8), np.zeros(4, np.uint8)) == 0.0   # no underflow at 255
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, np.zeros((2, 3), np.uint8))


def test_vae_bench_dry_run_on_cpu():
    run = subprocess.run([sys.executable, "bench/vae.py", "--device", "cpu", "--no-write",
                          "--variants", "eager,taps,graphed"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert all(v in run.stdout for v in ("eager", "taps", "graphed", "preview", "psnr_db"))


# ---------------------------------------------------------------------------------------------
# 5. CUDA: graphs and compile give the eager decode
# ---------------------------------------------------------------------------------------------


def _cuda_vae() -> WanVAE:
    return _random_vae().to("cuda", torch.bfloat16).use_channels_last()


# Advice warnings (inductor's TF32 hint and the like) are not what these tests judge.
quiet = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@quiet
@pytest.mark.parametrize("name", ["graphed", "taps+graphed"])
@pytest.mark.parametrize("eager_frames", [1, 2])
def test_graphed_decode_matches_eager_and_reuses_the_graph(name, eager_frames):
    vae = _cuda_vae()
    decoder = FastDecoder(vae, DecodeSettings.from_name(name), eager_frames=eager_frames)
    assert decoder.graphs_enabled
    eager = FastDecoder(vae, DecodeSettings(conv_impl=decoder.settings.conv_impl))
    for seed in (2, 3):                            # the second video replays the first's graph
        latents = _latents(frames=5, seed=seed).cuda()
        expected = eager.decode_to_uint8(latents)
        frames = decoder.decode_to_uint8(latents)
        assert frames.shape == expected.shape == (17, 32, 48, 3)
        assert _max_diff(frames, expected) <= 1
        assert decoder.num_graphs == 1
    decoder.decode_to_uint8(_latents(frames=3, h=6, w=4).cuda())   # a new shape: a second graph
    assert decoder.num_graphs == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@quiet
def test_graphs_recapture_after_the_weights_move():
    vae = _cuda_vae()
    decoder = FastDecoder(vae, DecodeSettings(graphs=True))
    latents = _latents(frames=4).cuda()
    decoder.decode_to_uint8(latents)
    head_conv = cast(wan_vae.CausalConv3d, vae.decoder.head[2])
    head_conv.weight.data = head_conv.weight.data * 2   # new storage: the old graph would read freed memory
    assert _max_diff(decoder.decode_to_uint8(latents), vae.decode_to_uint8(latents)) <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@quiet
def test_compiled_decode_close_to_eager_and_graphs_replay_it():
    vae = _cuda_vae()
    latents = _latents(frames=4).cuda()
    expected = vae.decode_to_uint8(latents)
    compiled = FastDecoder(vae, DecodeSettings(compile=True)).decode_to_uint8(latents)
    graphed = FastDecoder(vae, DecodeSettings(compile=True, graphs=True)).decode_to_uint8(latents)
    assert (compiled.float() - expected.float()).abs().mean() < 2   # bf16: fused norms round once
    assert _max_diff(graphed, compiled) <= 1
