"""WanDiT: checkpoint layout on meta, patch order, RoPE, and the tiny preset's forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.wan_dit import WanDiT, apply_rope, patchify, rope_cos_sin, sinusoidal_embedding, unpatchify

SLA = AttentionSpec(AttentionType.SLA)


def _meta_model(name: str, spec: AttentionSpec = SLA) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(WanConfig.from_name(name), spec)


def _expected_layout(dim: int, ffn: int, layers: int, head_dim: int = 128) -> list[tuple[str, tuple[int, ...]]]:
    """The TurboWan key list, written out from checkpoint_keys.md §2.3/§2.4 (file order)."""
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedding.weight", (dim, 64)), ("patch_embedding.bias", (dim,)),
        ("text_embedding.0.weight", (dim, 4096)), ("text_embedding.0.bias", (dim,)),
        ("text_embedding.2.weight", (dim, dim)), ("text_embedding.2.bias", (dim,)),
        ("time_embedding.0.weight", (dim, 256)), ("time_embedding.0.bias", (dim,)),
        ("time_embedding.2.weight", (dim, dim)), ("time_embedding.2.bias", (dim,)),
        ("time_projection.1.weight", (6 * dim, dim)), ("time_projection.1.bias", (6 * dim,)),
    ]
    for i in range(layers):
        p = f"blocks.{i}."
        keys.append((p + "modulation", (1, 6, dim)))
        for name in "qkvo":
            keys += [(f"{p}self_attn.{name}.weight", (dim, dim)), (f"{p}self_attn.{name}.bias", (dim,))]
        keys += [(p + "self_attn.norm_q.weight", (dim,)), (p + "self_attn.norm_k.weight", (dim,)),
                 (p + "self_attn.attn_op.local_attn.proj_l.weight", (head_dim, head_dim)),
                 (p + "self_attn.attn_op.local_attn.proj_l.bias", (head_dim,)),
                 (p + "norm3.weight", (dim,)), (p + "norm3.bias", (dim,))]
        for name in "qkvo":
            keys += [(f"{p}cross_attn.{name}.weight", (dim, dim)), (f"{p}cross_attn.{name}.bias", (dim,))]
        keys += [(p + "cross_attn.norm_q.weight", (dim,)), (p + "cross_attn.norm_k.weight", (dim,)),
                 (p + "ffn.0.weight", (ffn, dim)), (p + "ffn.0.bias", (ffn,)),
                 (p + "ffn.2.weight", (dim, ffn)), (p + "ffn.2.bias", (dim,))]
    keys += [("head.modulation", (1, 2, dim)), ("head.head.weight", (64, dim)), ("head.head.bias", (64,))]
    return keys


@pytest.mark.parametrize(("name", "dim", "ffn", "layers", "n_keys", "n_elements"), [
    ("wan2.1-t2v-1.3b", 1536, 8960, 30, 885, 1_419_492_160),
    ("wan2.1-t2v-14b", 5120, 13824, 40, 1175, 14_289_152_064),
])
def test_state_dict_is_the_released_turbowan_layout(name, dim, ffn, layers, n_keys, n_elements):
    state = _meta_model(name).state_dict()
    assert len(state) == n_keys
    assert sum(t.numel() for t in state.values()) == n_elements
    assert [(k, tuple(t.shape)) for k, t in state.items()] == _expected_layout(dim, ffn, layers)


@pytest.mark.parametrize("kind", [AttentionType.ORIGINAL, AttentionType.SLA, AttentionType.SAGESLA])
def test_layout_is_the_same_for_every_backend(kind):
    assert len(_meta_model("wan2.1-t2v-1.3b", AttentionSpec(kind)).state_dict()) == 885


def test_rope_tables_are_not_state():
    model = WanDiT(WanConfig.from_name("tiny-t2v"), SLA)
    model.rope_tables((2, 3, 4), torch.device("cpu"))
    assert not any("rope" in k for k in model.state_dict())
    assert len(list(model.buffers())) == 0


def test_patch_embedding_linear_equals_conv3d():
    torch.manual_seed(0)
    model = WanDiT(WanConfig.from_name("tiny-t2v"), SLA)
    x = torch.randn(2, 16, 3, 8, 10)
    linear = model.patch_embedding
    conv_weight = linear.weight.view(64, 16, 1, 2, 2)    # the Conv3d weight TurboDiffusion reshaped
    conv = F.conv3d(x, conv_weight, linear.bias, stride=(1, 2, 2))   # [B, dim, T, H/2, W/2]
    want = conv.flatten(2).transpose(1, 2)               # [B, L, dim], tokens in (t h w) order
    torch.testing.assert_close(linear(patchify(x, (1, 2, 2))), want, rtol=1e-5, atol=1e-5)


def test_unpatchify_places_head_features_in_kt_kh_kw_c_order():
    b, (t, h, w), (kt, kh, kw), c = 1, (2, 3, 2), (1, 2, 2), 3
    y = torch.randn(b, t * h * w, kt * kh * kw * c)
    out = unpatchify(y, (t, h, w), (kt, kh, kw))
    assert out.shape == (b, c, t * kt, h * kh, w * kw)
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                token = (ti * h + hi) * w + wi
                for i in range(kt):
                    for j in range(kh):
                        for m in range(kw):
                            for ch in range(c):
                                feat = ((i * kh + j) * kw + m) * c + ch
                                assert out[0, ch, ti * kt + i, hi * kh + j, wi * kw + m] == y[0, token, feat]


def test_rope_matches_complex_rotation_of_wan_frequency_tables():
    # Wan2.1's original formulation: complex polar tables per axis, concatenated, complex multiply.
    head_dim, (t, h, w) = 128, (3, 4, 5)
    def polar(n: int, d: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(n, dtype=torch.float64),
                            1.0 / torch.pow(10000, torch.arange(0, d, 2, dtype=torch.float64) / d))
        return torch.polar(torch.ones_like(freqs), freqs)
    ft, fh, fw = polar(64, 44), polar(64, 42), polar(64, 42)
    table = torch.cat([ft[:t, None, None].expand(t, h, w, -1), fh[None, :h, None].expand(t, h, w, -1),
                       fw[None, None, :w].expand(t, h, w, -1)], dim=-1).reshape(t * h * w, 1, -1)
    x = torch.randn(2, t * h * w, 3, head_dim, dtype=torch.float64)
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table).flatten(-2)
    cos, sin = rope_cos_sin(head_dim, t, h, w, torch.device("cpu"))
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), want, rtol=1e-6, atol=1e-6)


def test_sinusoidal_embedding_formula():
    emb = sinusoidal_embedding(8, torch.tensor([0.0, 987.7], dtype=torch.float64))
    angles = [987.7 * 10000 ** (-i / 4) for i in range(4)]
    want = [[math.cos(a) for a in angles] + [math.sin(a) for a in angles]]
    torch.testing.assert_close(emb[1:], torch.tensor(want, dtype=torch.float64))
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4


# --- tiny preset forward ------------------------------------------------------------------------

def _tiny_inputs(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 3, 8, 14, generator=g)        # latent [B, C, T, H, W] (H, W multiples of 2)
    timestep = torch.tensor([987.7, 609.0][:b])
    context = torch.randn(b, 32, 32, generator=g)        # [B, text_len, text_dim]
    return x, timestep, context


def _tiny_model(spec: AttentionSpec = SLA, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(WanConfig.from_name("tiny-t2v"), spec).eval()


@torch.no_grad()
def test_tiny_forward_shape_dtype_and_determinism():
    x, t, ctx = _tiny_inputs()
    out = _tiny_model()(x, t, ctx)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    again = _tiny_model()(x, t, ctx)
    assert torch.equal(out, again)
    other_seed = _tiny_model(seed=1)(x, t, ctx)
    assert not torch.allclose(out, other_seed)
    # Inputs in bf16 are accepted; the module dtype (fp32 here) decides the compute dtype.
    assert _tiny_model()(x.bfloat16(), t, ctx.bfloat16()).dtype == torch.float32


@torch.no_grad()
def test_batch_items_are_independent():
    x, t, ctx = _tiny_inputs()
    model = _tiny_model(AttentionSpec(AttentionType.SLA, topk=0.5))
    both = model(x, t, ctx)
    torch.testing.assert_close(both[1:], model(x[1:], t[1:], ctx[1:]), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_sla_with_full_topk_and_zero_proj_l_equals_original():
    x, t, ctx = _tiny_inputs()
    sla = _tiny_model(AttentionSpec(AttentionType.SLA, topk=1.0))
    dense = WanDiT(WanConfig.from_name("tiny-t2v"), AttentionSpec(AttentionType.ORIGINAL)).eval()
    dense.load_state_dict(sla.state_dict())
    torch.testing.assert_close(sla(x, t, ctx), dense(x, t, ctx), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_meta_build_then_assign_load_gives_the_same_model():
    x, t, ctx = _tiny_inputs()
    ref = _tiny_model()
    with torch.device("meta"):
        model = WanDiT(WanConfig.from_name("tiny-t2v"), SLA)
    model.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.eval()(x, t, ctx), ref(x, t, ctx))


@torch.no_grad()
def test_compile_blocks_traces_without_graph_breaks():
    # backend="eager" runs Dynamo's tracing only: fullgraph=True fails on .item(), data-dependent
    # branches or host syncs inside a block, without paying for Inductor codegen on CI.
    torch._dynamo.reset()
    x, t, ctx = _tiny_inputs()
    model = _tiny_model()
    want = model(x, t, ctx)
    model.compile_blocks(backend="eager", fullgraph=True)
    assert list(model.state_dict()) == list(_tiny_model().state_dict())
    torch.testing.assert_close(model(x, t, ctx), want)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [AttentionType.ORIGINAL, AttentionType.SLA])
@torch.no_grad()
def test_cuda_bf16_forward_matches_cpu_fp32(kind):
    # head_dim 128 as in the released models (the SLA Triton kernel needs 64 or 128).
    from dataclasses import replace
    cfg = replace(WanConfig.from_name("tiny-t2v"), dim=256, ffn_dim=512, num_heads=2)
    spec = AttentionSpec(kind, topk=1.0)                 # full topk: no bf16 tie-breaking in block selection
    torch.manual_seed(0)
    cpu = WanDiT(cfg, spec).eval()
    with torch.no_grad():
        for block in cpu.blocks:                          # a non-zero linear branch, so proj_l is exercised
            block.self_attn.attn_op.local_attn.proj_l.weight.normal_(0, 0.05)
    gpu = WanDiT(cfg, spec).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 5, 24, 30, generator=g), torch.randn(1, 32, 32, generator=g)   # L = 900
    t = torch.tensor([900.0])
    want = cpu(x, t, ctx)
    got = gpu(x.cuda(), t.cuda(), ctx.cuda())
    assert got.dtype == torch.float32
    err = float((got.cpu() - want).norm() / want.norm())
    print(f"{kind}: relative error cuda bf16 vs cpu fp32 {err:.2e}")
    assert err < 0.05
