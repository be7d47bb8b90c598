"""The DiT forward replayed as a CUDA graph gives the eager forward's output, per shape."""

from __future__ import annotations

import pytest
import torch

from engine import loading
from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.graphs import GraphedForward
from engine.wan_dit import WanDiT


def _tiny(device: torch.device, dtype: torch.dtype) -> tuple[WanDiT, WanConfig]:
    cfg = WanConfig.from_name("tiny-t2v")
    spec = AttentionSpec(type=AttentionType.ORIGINAL)
    return loading.build_random(lambda: WanDiT(cfg, spec), seed=1, device=device, dtype=dtype), cfg


@torch.inference_mode()
def test_on_the_cpu_it_is_the_plain_forward():
    dit, cfg = _tiny(torch.device("cpu"), torch.float32)
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([900.0]), torch.randn(1, cfg.text_len, cfg.text_dim)
    graphed = GraphedForward(dit)
    torch.testing.assert_close(graphed(x, t, ctx), dit(x, t, ctx), rtol=0, atol=0)
    assert not graphed.capture_s


@pytest.mark.gpu
@torch.inference_mode()
def test_replays_equal_the_eager_forward_and_each_shape_gets_its_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    dit, cfg = _tiny(dev, torch.bfloat16)
    graphed = GraphedForward(dit)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16)
    for grid in ((2, 8, 8), (2, 8, 8), (3, 8, 12)):
        x = torch.randn(1, 16, *grid, device=dev, dtype=torch.bfloat16)
        t = torch.tensor([700.0], device=dev)
        out = graphed(x, t, ctx)
        torch.testing.assert_close(out, dit(x, t, ctx), rtol=0, atol=0)
    assert len(graphed.capture_s) == 2
    out.zero_()                       # the caller owns its copy: the next replay is unaffected
    x = torch.randn(1, 16, 3, 8, 12, device=dev, dtype=torch.bfloat16)
    torch.testing.assert_close(graphed(x, t, ctx), dit(x, t, ctx), rtol=0, atol=0)
