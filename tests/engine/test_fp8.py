"""FP8 linears: the e4m3 quantization math (per-channel weights, per-token activations, the clamp
at ±448) against plain torch, the emulated product where `_scaled_mm` is not available, and a
whole tiny DiT converted at load."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import loading
from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.fp8 import E4M3_MAX, FP8Linear, fp8_supported, quantize_model, quantize_per_channel, quantize_per_token
from engine.wan_dit import WanDiT

CPU = torch.device("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_per_channel_scales_are_row_max_over_448_and_values_clamp():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    w[3, 5] = 1e4                               # an outlier sets its row's scale, no other row's
    w[6] = 0                                    # an all-zero row: no division by zero
    w8, scale = quantize_per_channel(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1).clamp_min(1e-12) / E4M3_MAX)
    assert float(w8.float().abs().max()) == E4M3_MAX and float(w8[3, 5].float()) == E4M3_MAX
    assert torch.isfinite(w8.float()).all() and torch.all(w8[6].float() == 0)
    back = w8.float() * scale
    assert rel(back[[0, 1, 2, 4, 5, 7]], w[[0, 1, 2, 4, 5, 7]]) < 0.03      # e4m3: 3 mantissa bits


def test_per_token_scales_follow_each_token():
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 100.0])[:, None, None]
    x8, scale = quantize_per_token(x)
    assert scale.shape == (2, 5, 1)
    torch.testing.assert_close(scale, x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX)
    assert rel(x8.float() * scale, x) < 0.03


@torch.no_grad()
def test_emulated_fp8_linear_equals_the_plain_torch_product():
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
        linear.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 7, 64, generator=g)
    fp8 = FP8Linear.from_linear(linear, use_scaled_mm=False)
    w8, sw = quantize_per_channel(linear.weight)
    x8, sx = quantize_per_token(x)
    reference = (x8.float() * sx) @ (w8.float() * sw).t() + linear.bias
    torch.testing.assert_close(fp8(x), reference, rtol=1e-5, atol=1e-4)
    # Both operands carry e4m3's ~2.5 % rounding: one short (K = 64) product stays within 5 %.
    assert rel(fp8(x), linear(x)) < 0.05


def test_unsupported_devices_say_why():
    usable, why = fp8_supported(CPU)
    assert not usable and "CUDA" in why and "8.9" in why


def test_a_tiny_dit_converts_at_load_and_stays_close(caplog):
    cfg = WanConfig.from_name("tiny-t2v")
    spec = AttentionSpec(type=AttentionType.SLA, topk=0.5)
    dit = loading.build_random(lambda: WanDiT(cfg, spec), seed=3, device=CPU, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    t = torch.tensor([900.0])
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        before = dit(x, t, ctx)
        with caplog.at_level(logging.WARNING, logger="engine.fp8"):
            path = quantize_model(dit, CPU)
        after = dit(x, t, ctx)
    assert path == "fp8-emulated" and "no speed-up" in caplog.text
    linears = [m for m in dit.blocks.modules() if isinstance(m, nn.Linear)]
    assert linears and all("proj_l" in n for n, m in dit.blocks.named_modules() if isinstance(m, nn.Linear))
    # per block: fused q/k/v, o, the cross-attention's q, k, v, o, and the two FFN linears
    assert sum(isinstance(m, FP8Linear) for m in dit.blocks.modules()) == 8 * cfg.num_layers
    assert rel(after, before) < 0.03


@pytest.mark.gpu
@torch.no_grad()
def test_scaled_mm_matches_the_emulated_product_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    if not fp8_supported(dev)[0]:
        pytest.skip(fp8_supported(dev)[1])
    linear = nn.Linear(256, 512).to(dev, torch.bfloat16)
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    fast = FP8Linear.from_linear(linear, use_scaled_mm=True)
    slow = FP8Linear.from_linear(linear, use_scaled_mm=False)
    # _scaled_mm computes the emulated product (0.0037 on an H200); against bf16 both carry e4m3's
    # ~2.5 % rounding per operand, the same 5 % bound as the CPU test (0.037 measured at K = 256).
    assert rel(fast(x), slow(x)) < 0.01 and rel(fast(x), linear(x)) < 0.05


def test_quant_linear_fp8_is_its_own_load_and_says_which_path_ran():
    from engine.family import Engine
    from engine.requests import T2VRequest
    from engine.settings import EngineSettings
    engine = Engine(EngineSettings(), device="cpu")
    bf16 = engine.generate(engine.load_spec("tiny-t2v", "false"), T2VRequest(prompt="x", num_frames=5, num_steps=2))
    fp8 = engine.generate(engine.load_spec("tiny-t2v", "fp8"),
                          T2VRequest(prompt="x", num_frames=5, num_steps=2, quant_linear="fp8"))
    assert engine.cache.loads == 2 and (bf16.int8_path, fp8.int8_path) == ("bf16", "fp8-emulated")
    assert abs(bf16.frames.astype(float) - fp8.frames.astype(float)).mean() < 2.0     # of 255


@torch.no_grad()
def test_fused_qkv_equals_three_separately_quantized_projections():
    """Per-output-channel weight scales and per-token input scales make stacking q, k, v exact."""
    from engine.wan_dit import WanSelfAttention
    g = torch.Generator().manual_seed(5)
    attn = WanSelfAttention(64, 2, 1e-6, None)
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 9, 64, generator=g)
    separate = [FP8Linear.from_linear(lin, use_scaled_mm=False)(x) for lin in (attn.q, attn.k, attn.v)]
    cfg_model = nn.Module()
    cfg_model.blocks = nn.ModuleList([attn])
    quantize_model(cfg_model, CPU)
    assert not hasattr(attn, "q") and isinstance(attn.qkv, FP8Linear)
    fused = attn.qkv(x).chunk(3, dim=-1)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny_checkpoints(root: Path) -> Path:
    from engine.umt5 import UMT5Encoder
    from engine.wan_vae import WanVAE
    cfg = WanConfig.from_name("tiny-t2v")
    spec = AttentionSpec(type=AttentionType.SLA, topk=0.5)
    root.mkdir(parents=True, exist_ok=True)
    for name, build, seed in (("TurboWan-tiny-t2v.pth", lambda: WanDiT(cfg, spec), 1),
                              ("tiny-vae.pth", lambda: WanVAE(cfg.vae), 2),
                              ("tiny-umt5.pth", lambda: UMT5Encoder(cfg.umt5), 3)):
        torch.save(loading.build_random(build, seed=seed, device=CPU, dtype=torch.float32).state_dict(), root / name)
    return root


def _fp8_row(ckpt: Path, tmp: Path):
    from engine.family import Engine
    from engine.requests import T2VRequest
    from engine.settings import EngineSettings
    settings = EngineSettings(checkpoints_dir=ckpt, digest_cache_dir=tmp / "digests", fp8_cache_dir=tmp / "fp8")
    engine = Engine(settings, device="cpu")
    return engine.generate(engine.load_spec("tiny-t2v", "fp8"),
                           T2VRequest(prompt="x", num_frames=5, num_steps=2, quant_linear="fp8", seed=3))


def test_converted_weights_are_cached_beside_the_file_and_read_back(tmp_path, caplog):
    ckpt = _tiny_checkpoints(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="engine"):
        first = _fp8_row(ckpt, tmp_path)
    cached = list(ckpt.glob("TurboWan-tiny-t2v.pth.fp8-*.safetensors"))
    assert len(cached) == 1 and "cached in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine"):
        second = _fp8_row(ckpt, tmp_path)          # a fresh engine: reads the copy, not the bf16 file
    assert "loaded the converted weights" in caplog.text
    assert np.array_equal(first.frames, second.frames) and second.int8_path == "fp8-emulated"

    # A replaced source file (new bytes, same name) never matches the old copy.
    state = torch.load(ckpt / "TurboWan-tiny-t2v.pth", weights_only=True)
    state["head.head.bias"] = state["head.head.bias"] + 1
    torch.save(state, ckpt / "TurboWan-tiny-t2v.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine"):
        _fp8_row(ckpt, tmp_path)
    assert "loaded the converted weights" not in caplog.text
    assert len(list(ckpt.glob("TurboWan-tiny-t2v.pth.fp8-*.safetensors"))) == 2


def test_where_the_checkpoint_folder_cannot_be_written_the_copy_goes_to_the_fp8_cache_dir(tmp_path):
    from engine.digest import file_digest
    from engine.fp8 import cache_candidates
    ckpt = _tiny_checkpoints(tmp_path / "ckpt")
    source = ckpt / "TurboWan-tiny-t2v.pth"
    beside = cache_candidates(source, file_digest(source, tmp_path / "digests"), None)[0]
    # A folder in the way makes the write beside the file fail even as root (where a read-only
    # folder would not stop it).
    beside.mkdir()
    first = _fp8_row(ckpt, tmp_path)
    assert len(list((tmp_path / "fp8").glob("TurboWan-tiny-t2v.pth.fp8-*.safetensors"))) == 1
    assert np.array_equal(first.frames, _fp8_row(ckpt, tmp_path).frames)


def test_a_damaged_cached_copy_is_ignored_and_converted_again(tmp_path, caplog):
    ckpt = _tiny_checkpoints(tmp_path / "ckpt")
    first = _fp8_row(ckpt, tmp_path)
    copy = next(ckpt.glob("*.fp8-*.safetensors"))
    copy.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="engine"):
        again = _fp8_row(ckpt, tmp_path)
    assert "ignoring the cached copy" in caplog.text and np.array_equal(first.frames, again.frames)
