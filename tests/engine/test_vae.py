"""Wan2.1 VAE: checkpoint layout, chunked causal encode/decode against a whole-clip float64
reference written independently below, causality, uint8 frames and latent normalization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import VAEConfig, WanConfig
from engine.wan_vae import LATENT_MEAN, LATENT_STD, WanVAE, denormalize_latents, normalize_latents

TINY = WanConfig.from_name("tiny-t2v").vae


def _random_vae(seed: int = 0, config: VAEConfig = TINY) -> WanVAE:
    """Tiny VAE with every weight ~N(0, 0.2) (default init leaves the norms' gamma at 1)."""
    torch.manual_seed(seed)
    vae = WanVAE(config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.2)
    return vae


def _video(frames: int, height: int = 16, width: int = 16, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# 1. Layout: the expansion of checkpoint_keys.md §3, written out independently of the module
# ---------------------------------------------------------------------------------------------


def _expected_layout(d: int = 96, z: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    def res(p, i, o):
        keys = [(f"{p}.residual.0.gamma", (i, 1, 1, 1)), (f"{p}.residual.2.weight", (o, i, 3, 3, 3)),
                (f"{p}.residual.2.bias", (o,)), (f"{p}.residual.3.gamma", (o, 1, 1, 1)),
                (f"{p}.residual.6.weight", (o, o, 3, 3, 3)), (f"{p}.residual.6.bias", (o,))]
        if i != o:
            keys += [(f"{p}.shortcut.weight", (o, i, 1, 1, 1)), (f"{p}.shortcut.bias", (o,))]
        return keys

    def down(p, c, temporal):
        keys = [(f"{p}.resample.1.weight", (c, c, 3, 3)), (f"{p}.resample.1.bias", (c,))]
        return keys + ([(f"{p}.time_conv.weight", (c, c, 3, 1, 1)), (f"{p}.time_conv.bias", (c,))]
                       if temporal else [])

    def up(p, c, temporal):
        keys = [(f"{p}.resample.1.weight", (c // 2, c, 3, 3)), (f"{p}.resample.1.bias", (c // 2,))]
        return keys + ([(f"{p}.time_conv.weight", (2 * c, c, 3, 1, 1)), (f"{p}.time_conv.bias", (2 * c,))]
                       if temporal else [])

    def attn(p, c):
        return [(f"{p}.norm.gamma", (c, 1, 1)), (f"{p}.to_qkv.weight", (3 * c, c, 1, 1)),
                (f"{p}.to_qkv.bias", (3 * c,)), (f"{p}.proj.weight", (c, c, 1, 1)), (f"{p}.proj.bias", (c,))]

    c1, c2, c4 = d, 2 * d, 4 * d
    e, dec = "encoder", "decoder"
    keys = [(f"{e}.conv1.weight", (c1, 3, 3, 3, 3)), (f"{e}.conv1.bias", (c1,))]
    keys += res(f"{e}.downsamples.0", c1, c1) + res(f"{e}.downsamples.1", c1, c1)
    keys += down(f"{e}.downsamples.2", c1, False)
    keys += res(f"{e}.downsamples.3", c1, c2) + res(f"{e}.downsamples.4", c2, c2)
    keys += down(f"{e}.downsamples.5", c2, True)
    keys += res(f"{e}.downsamples.6", c2, c4) + res(f"{e}.downsamples.7", c4, c4)
    keys += down(f"{e}.downsamples.8", c4, True)
    keys += res(f"{e}.downsamples.9", c4, c4) + res(f"{e}.downsamples.10", c4, c4)
    keys += res(f"{e}.middle.0", c4, c4) + attn(f"{e}.middle.1", c4) + res(f"{e}.middle.2", c4, c4)
    keys += [(f"{e}.head.0.gamma", (c4, 1, 1, 1)), (f"{e}.head.2.weight", (2 * z, c4, 3, 3, 3)),
             (f"{e}.head.2.bias", (2 * z,))]
    keys += [("conv1.weight", (2 * z, 2 * z, 1, 1, 1)), ("conv1.bias", (2 * z,)),
             ("conv2.weight", (z, z, 1, 1, 1)), ("conv2.bias", (z,))]
    keys += [(f"{dec}.conv1.weight", (c4, z, 3, 3, 3)), (f"{dec}.conv1.bias", (c4,))]
    keys += res(f"{dec}.middle.0", c4, c4) + attn(f"{dec}.middle.1", c4) + res(f"{dec}.middle.2", c4, c4)
    u = f"{dec}.upsamples"
    keys += res(f"{u}.0", c4, c4) + res(f"{u}.1", c4, c4) + res(f"{u}.2", c4, c4) + up(f"{u}.3", c4, True)
    keys += res(f"{u}.4", c2, c4) + res(f"{u}.5", c4, c4) + res(f"{u}.6", c4, c4) + up(f"{u}.7", c4, True)
    keys += res(f"{u}.8", c2, c2) + res(f"{u}.9", c2, c2) + res(f"{u}.10", c2, c2) + up(f"{u}.11", c2, False)
    keys += res(f"{u}.12", c1, c1) + res(f"{u}.13", c1, c1) + res(f"{u}.14", c1, c1)
    keys += [(f"{dec}.head.0.gamma", (c1, 1, 1, 1)), (f"{dec}.head.2.weight", (3, c1, 3, 3, 3)),
             (f"{dec}.head.2.bias", (3,))]
    return keys


def test_state_dict_matches_wan21_vae_file_layout():
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    state = vae.state_dict()
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531
    assert [(k, tuple(t.shape)) for k, t in state.items()] == _expected_layout()


def test_tiny_layout_follows_the_same_template():
    state = WanVAE(TINY).state_dict()
    assert [(k, tuple(t.shape)) for k, t in state.items()] == _expected_layout(d=TINY.dim)


def test_built_on_meta_then_assign_loaded_runs_like_a_cpu_built_model():
    reference = _random_vae()
    with torch.device("meta"):
        vae = WanVAE(TINY)
    vae.load_state_dict(reference.state_dict(), assign=True)
    assert not any(t.is_meta for t in vae.state_dict().values())
    video = _video(5)
    torch.testing.assert_close(vae.encode(video), reference.encode(video), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. Whole-clip reference (float64): no chunks, no caches. Causal convs see zero-padded history;
#    the time resamplers follow Wan's first-frame rule written over the whole clip.
# ---------------------------------------------------------------------------------------------


class _Reference:
    def __init__(self, vae: WanVAE):
        self.w = {k: v.detach().double() for k, v in vae.state_dict().items()}
        self.cfg = vae.config

    def conv(self, name, x, time_pad=0, pad=0):
        x = F.pad(x, (pad, pad, pad, pad, time_pad, 0))  # all time padding before frame 0
        return F.conv3d(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def rms(self, name, x):
        gamma = self.w[f"{name}.gamma"].reshape(1, -1, 1, 1, 1)
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        return x / norm * math.sqrt(x.shape[1]) * gamma

    def res(self, p, x):
        h = self.conv(f"{p}.residual.2", F.silu(self.rms(f"{p}.residual.0", x)), 2, 1)
        h = self.conv(f"{p}.residual.6", F.silu(self.rms(f"{p}.residual.3", h)), 2, 1)
        return h + (self.conv(f"{p}.shortcut", x) if f"{p}.shortcut.weight" in self.w else x)

    def attn(self, p, x):
        out = torch.empty_like(x)
        c = x.shape[1]
        for t in range(x.shape[2]):  # frames attend only to themselves
            frame = self.rms(f"{p}.norm", x[:, :, t : t + 1])[:, :, 0]           # [B, C, H, W]
            qkv = torch.einsum("oc,bchw->bohw", self.w[f"{p}.to_qkv.weight"][:, :, 0, 0], frame)
            qkv = qkv + self.w[f"{p}.to_qkv.bias"][None, :, None, None]
            q, k, v = qkv.flatten(2).split(c, dim=1)                              # [B, C, HW]
            weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
            mixed = torch.einsum("bij,bcj->bci", weights, v)
            proj = torch.einsum("oc,bci->boi", self.w[f"{p}.proj.weight"][:, :, 0, 0], mixed)
            proj = proj + self.w[f"{p}.proj.bias"][None, :, None]
            out[:, :, t] = x[:, :, t] + proj.view_as(x[:, :, t])
        return out

    def conv2d_frames(self, p, x, stride, pad):
        w, b = self.w[f"{p}.resample.1.weight"], self.w[f"{p}.resample.1.bias"]
        return torch.stack([F.conv2d(x[:, :, t], w, b, stride=stride, padding=pad)
                            for t in range(x.shape[2])], dim=2)

    def downsample(self, p, x, temporal):
        x = self.conv2d_frames(p, F.pad(x, (0, 1, 0, 1)), 2, 0)
        if temporal and x.shape[2] > 1:
            # frame 0 passes; then windows (0,1,2), (2,3,4), ... of the whole clip
            later = F.conv3d(x, self.w[f"{p}.time_conv.weight"], self.w[f"{p}.time_conv.bias"], stride=(2, 1, 1))
            x = torch.cat([x[:, :, :1], later], dim=2)
        return x

    def upsample(self, p, x, temporal):
        if temporal and x.shape[2] > 1:
            # frame 0 passes; frames 1.. go through a causal conv (zero history) to 2 frames each
            y = self.conv(f"{p}.time_conv", x[:, :, 1:], time_pad=2)
            c = x.shape[1]
            pairs = torch.stack([y[:, :c], y[:, c:]], dim=3).flatten(2, 3)  # t0a, t0b, t1a, ...
            x = torch.cat([x[:, :, :1], pairs], dim=2)
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return self.conv2d_frames(p, x, 1, 1)

    def blocks(self, prefix, x):
        index = 0
        while f"{prefix}.{index}.residual.0.gamma" in self.w or f"{prefix}.{index}.resample.1.weight" in self.w \
                or f"{prefix}.{index}.to_qkv.weight" in self.w:
            p = f"{prefix}.{index}"
            if f"{p}.residual.0.gamma" in self.w:
                x = self.res(p, x)
            elif f"{p}.to_qkv.weight" in self.w:
                x = self.attn(p, x)
            else:
                temporal = f"{p}.time_conv.weight" in self.w
                shrinks = self.w[f"{p}.resample.1.weight"].shape[0] < self.w[f"{p}.resample.1.weight"].shape[1]
                x = self.upsample(p, x, temporal) if shrinks else self.downsample(p, x, temporal)
            index += 1
        return x

    def head(self, p, x):
        return self.conv(f"{p}.head.2", F.silu(self.rms(f"{p}.head.0", x)), 2, 1)

    def raw_mu(self, video):
        x = self.conv("encoder.conv1", video.double(), 2, 1)
        x = self.blocks("encoder.middle", self.blocks("encoder.downsamples", x))
        x = self.conv("conv1", self.head("encoder", x))
        return x[:, : self.cfg.z_dim]

    def decode_raw(self, z):
        x = self.conv("decoder.conv1", self.conv("conv2", z.double()), 2, 1)
        x = self.blocks("decoder.upsamples", self.blocks("decoder.middle", x))
        return self.head("decoder", x)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_shapes(frames):
    vae = _random_vae()
    latents = vae.encode(_video(frames, 16, 24, batch=2))
    assert latents.shape == (2, 16, 1 + (frames - 1) // 4, 2, 3)
    assert latents.dtype == torch.float32
    video = vae.decode(latents)
    assert video.shape == (2, 3, frames, 16, 24)
    assert video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


def test_chunked_encode_matches_whole_clip_reference():
    vae = _random_vae().double()
    video = _video(9, 16, 24, batch=2)
    expected = _Reference(vae).raw_mu(video)
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=torch.float64).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(video).double(), (expected - mean) / std, rtol=1e-5, atol=1e-5)


def test_frame_by_frame_decode_matches_whole_clip_reference():
    vae = _random_vae().double()
    latents = torch.randn(2, 16, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=torch.float64).view(1, -1, 1, 1, 1)
    expected = _Reference(vae).decode_raw(latents.double() * std + mean).clamp(-1, 1)
    decoded = vae.decode(latents)
    assert decoded.shape == expected.shape == (2, 3, 9, 16, 24)
    assert expected.abs().mean() > 0.05  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Causality
# ---------------------------------------------------------------------------------------------


def test_encoder_is_causal_in_time():
    vae = _random_vae()
    video = _video(9)
    changed = video.clone()
    changed[:, :, 8] = -changed[:, :, 8]   # frame 9 feeds latent frame 2 only
    a, b = vae.encode(video), vae.encode(changed)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=0, atol=0)
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])


def test_decoder_is_causal_in_time():
    vae = _random_vae()
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    changed = latents.clone()
    changed[:, :, 2] += 1.0                # latent frame 2 makes output frames 5..8
    a, b = vae.decode(latents), vae.decode(changed)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


# ---------------------------------------------------------------------------------------------
# 4. uint8 frames, normalization, bad input
# ---------------------------------------------------------------------------------------------


def test_decode_to_uint8_matches_float_decode():
    vae = _random_vae()
    with torch.no_grad():
        vae.decoder.head[2].weight.mul_(20)  # push pixels past ±1 so the clamp is exercised
    latents = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    frames = vae.decode_to_uint8(latents)
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert frames.shape == (5, 16, 24, 3)
    video = vae.decode(latents)[0].double()                      # [3, F, H, W]
    expected = ((video + 1) * 127.5).round().permute(1, 2, 3, 0)
    assert (frames.double() - expected).abs().max() <= 1         # float32 vs float64 rounding
    assert frames.min() == 0 and frames.max() == 255


def test_decode_to_uint8_rejects_batches():
    with pytest.raises(ValueError, match="batch 1"):
        _random_vae().decode_to_uint8(torch.zeros(2, 16, 1, 2, 2))


def test_normalization_constants_and_round_trip():
    assert len(LATENT_MEAN) == len(LATENT_STD) == 16
    mu = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64)
    normalized = normalize_latents(mu)
    for channel in (0, 7, 15):
        expected = (mu[:, channel] - LATENT_MEAN[channel]) / LATENT_STD[channel]
        torch.testing.assert_close(normalized[:, channel], expected)
    torch.testing.assert_close(denormalize_latents(normalized), mu)


@pytest.mark.parametrize("shape", [(1, 3, 4, 16, 16), (1, 3, 5, 12, 16), (1, 4, 5, 16, 16), (3, 5, 16, 16)])
def test_encode_rejects_bad_video_shapes(shape):
    with pytest.raises(ValueError, match="video"):
        _random_vae().encode(torch.zeros(shape))


def test_decode_rejects_bad_latent_shapes():
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        _random_vae().decode(torch.zeros(1, 8, 2, 2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_decode_close_to_fp32_cpu():
    cpu = _random_vae()
    gpu = _random_vae().to("cuda", torch.bfloat16)
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    frames_gpu = gpu.decode_to_uint8(latents.cuda())
    frames_cpu = cpu.decode_to_uint8(latents)
    assert frames_gpu.shape == frames_cpu.shape == (9, 32, 48, 3)
    assert (frames_gpu.float() - frames_cpu.float()).abs().mean() < 4
    latents_back = gpu.encode(gpu.decode(latents.cuda()))
    assert latents_back.shape == latents.shape and latents_back.dtype == torch.float32


def test_channels_last_layout_decodes_and_encodes_the_same():
    """use_channels_last() changes memory layout only: same numbers as the default layout."""
    from engine.config import VAEConfig
    torch.manual_seed(0)
    config = VAEConfig(dim=8)
    plain = WanVAE(config).eval()
    fast = WanVAE(config).eval()
    fast.load_state_dict(plain.state_dict())
    fast.use_channels_last()
    latents = torch.randn(1, 16, 3, 4, 6)
    assert torch.allclose(fast.decode(latents), plain.decode(latents), atol=1e-5)
    assert torch.equal(fast.decode_to_uint8(latents), plain.decode_to_uint8(latents)) or \
        (fast.decode_to_uint8(latents).int() - plain.decode_to_uint8(latents).int()).abs().max() <= 1
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    assert torch.allclose(fast.encode(video), plain.encode(video), atol=1e-5)
