"""W8A8 checkpoint format: block quantization error bounds, the -quant key layout, runtime conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.int8 import (
    Int8Linear,
    convert_int8_for_runtime,
    dequantize_weight,
    quantize_weight,
    swap_block_linears_for_int8,
)
from engine.wan_dit import WanDiT

SLA = AttentionSpec(AttentionType.SLA)


def _tile_views(w: torch.Tensor):
    """Yield (tile_row, tile_col, tile) over 128x128 tiles, the last ones ragged."""
    for i in range(0, w.shape[0], 128):
        for j in range(0, w.shape[1], 128):
            yield i // 128, j // 128, w[i:i + 128, j:j + 128]


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (5, 130)])
def test_quantize_scales_and_error_bound(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    int8, scale = quantize_weight(w)
    assert int8.dtype == torch.int8 and int8.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    deq = dequantize_weight(int8, scale, torch.float32)

    for r, c, tile in _tile_views(w):
        s = float(scale[r, c])
        assert s == pytest.approx(float(tile.abs().max()) / 128, rel=1e-6)   # scale = amax / 128
        err = (deq - w)[r * 128:r * 128 + tile.shape[0], c * 128:c * 128 + tile.shape[1]].abs()
        q = int8[r * 128:r * 128 + tile.shape[0], c * 128:c * 128 + tile.shape[1]]
        # Round-to-nearest: error <= scale/2, except the tile's +amax element, which maps to +128
        # and saturates to 127 (TurboDiffusion divides by 128, not 127): its error is one scale.
        eps = 1e-6 * 128 * s                         # float32 rounding at the amax scale
        assert (err[q != 127] <= s / 2 + eps).all()
        assert (err <= s + eps).all()

    rel = float((deq - w).norm() / w.norm())
    assert rel < 0.01


def test_quantize_all_zero_tile_uses_amax_floor():
    w = torch.zeros(130, 10)
    w[129, 3] = 1.0                                      # second row-tile non-zero, first all zeros
    int8, scale = quantize_weight(w)
    assert scale[0, 0] == pytest.approx(1e-8 / 128)
    assert int8[:128].eq(0).all() and int8[129, 3] == 127
    torch.testing.assert_close(dequantize_weight(int8, scale, torch.float32), w, atol=1 / 128, rtol=0)


def test_dequantize_broadcasts_each_scale_over_its_tile():
    int8 = torch.ones(130, 260, dtype=torch.int8)
    scale = torch.arange(1.0, 7.0).view(2, 3)
    deq = dequantize_weight(int8, scale, torch.bfloat16)
    assert deq.dtype == torch.bfloat16
    assert deq[0, 0] == 1 and deq[0, 128] == 2 and deq[0, 259] == 3 and deq[129, 0] == 4 and deq[129, 259] == 6


def test_int8_linear_buffers_match_the_checkpoint_format():
    layer = Int8Linear(300, 200)
    state = layer.state_dict()
    assert list(state) == ["int8_weight", "scale", "bias"]
    assert state["int8_weight"].dtype == torch.int8 and state["int8_weight"].shape == (200, 300)
    assert state["scale"].dtype == torch.float32 and state["scale"].shape == (2, 3)
    assert state["bias"].dtype == torch.bfloat16
    assert list(Int8Linear(300, 200, bias=False).state_dict()) == ["int8_weight", "scale"]


def test_swapped_tiny_dit_has_the_quant_layout():
    torch.manual_seed(0)
    model = WanDiT(WanConfig.from_name("tiny-t2v"), SLA)
    plain = model.state_dict()
    assert swap_block_linears_for_int8(model) == 10 * 2
    state = model.state_dict()
    block0 = [k.removeprefix("blocks.0.") for k in state if k.startswith("blocks.0.")]
    assert len(block0) == 39
    linears = [f"self_attn.{n}" for n in "qkvo"] + [f"cross_attn.{n}" for n in "qkvo"] + ["ffn.0", "ffn.2"]
    for name in linears:
        keys = [k for k in block0 if k.startswith(name + ".")]
        assert [f"{name}.int8_weight", f"{name}.scale", f"{name}.bias"] == keys
    # Everything outside the block Linears (incl. proj_l and all non-block layers) is untouched.
    kept = [k for k in plain if not any(f".{n}." in k for n in linears)]
    assert all(k in state and state[k].dtype == plain[k].dtype for k in kept)
    assert "blocks.0.self_attn.attn_op.local_attn.proj_l.weight" in kept


def test_swapped_1p3b_on_meta_matches_released_quant_counts():
    with torch.device("meta"):
        model = WanDiT(WanConfig.from_name("wan2.1-t2v-1.3b"), SLA)
    swap_block_linears_for_int8(model)
    state = model.state_dict()
    assert len(state) == 1185
    assert sum(t.numel() for t in state.values()) == 1_419_577_120
    assert state["blocks.0.ffn.0.scale"].shape == (70, 12)


@torch.no_grad()
def test_quantized_model_runs_close_to_float_and_dequantizes_for_runtime():
    torch.manual_seed(0)
    cfg = WanConfig.from_name("tiny-t2v")
    model = WanDiT(cfg, SLA).eval()
    x = torch.randn(1, 16, 2, 8, 8)
    t, ctx = torch.tensor([900.0]), torch.randn(1, 32, 32)
    want = model(x, t, ctx)

    swap_block_linears_for_int8(model, quantize=True)
    # Round trip through a state_dict + meta build, as the loader will do it.
    with torch.device("meta"):
        loaded = WanDiT(cfg, SLA)
    swap_block_linears_for_int8(loaded)
    loaded.load_state_dict(model.state_dict(), assign=True)
    loaded.eval()
    for layer in loaded.modules():            # biases of the fp32 tiny model stay fp32
        if isinstance(layer, Int8Linear):
            assert layer.bias is not None and layer.bias.dtype == torch.float32
    on_the_fly = loaded(x, t, ctx)
    assert float((on_the_fly - want).norm() / want.norm()) < 0.02

    path = convert_int8_for_runtime(loaded, torch.device("cpu"), prefer_int8_kernels=True)
    assert path == "dequantized"
    assert not any(isinstance(m, Int8Linear) for m in loaded.modules())
    assert isinstance(loaded.blocks[0].ffn[0], nn.Linear)
    assert loaded.blocks[0].ffn[0].weight.dtype == torch.float32
    torch.testing.assert_close(loaded(x, t, ctx), on_the_fly, rtol=1e-5, atol=1e-5)
    assert len(loaded.state_dict()) == len(WanDiT(cfg, SLA).state_dict())
    assert convert_int8_for_runtime(loaded, torch.device("cpu")) == "none"
