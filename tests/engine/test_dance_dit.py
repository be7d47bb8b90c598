"""SteadyDancerDiT: the 14B checkpoint layout on meta, a tiny forward on CPU, and parity with the official module."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend

from engine.config import AttentionType, WanConfig
from engine.dance_dit import SteadyDancerDiT
from engine.errors import RequestError

REAL = WanConfig(name="steadydancer-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
TINY = WanConfig(name="tiny-dancer", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36,
                 text_dim=32, text_len=16, freq_dim=32)

# checkpoint_keys.md §6: the keys SteadyDancer adds to Wan2.1-I2V-14B, in file order.
POSE_KEYS: list[tuple[str, tuple[int, ...]]] = [
    ("patch_embedding_fuse.weight", (5120, 68, 1, 2, 2)),
    ("patch_embedding_fuse.bias", (5120,)),
    ("patch_embedding_ref_c.weight", (5120, 16, 1, 2, 2)),
    ("patch_embedding_ref_c.bias", (5120,)),
    ("condition_embedding_spatial.conv.weight", (16, 16, 1, 1)),
    ("condition_embedding_spatial.conv_q.weight", (4, 16, 1, 1)),
    ("condition_embedding_spatial.fc.0.weight", (4, 16)),
    ("condition_embedding_spatial.fc.1.fc.0.weight", (4, 4)),
    ("condition_embedding_spatial.fc_phi.weight", (16, 4)),
    ("condition_embedding_spatial.fc_scale.weight", (16, 4)),
    ("condition_embedding_spatial.conv_p.weight", (16, 4, 1, 1)),
    ("condition_embedding_spatial.bn1.weight", (4,)),
    ("condition_embedding_spatial.bn1.bias", (4,)),
    ("condition_embedding_spatial.bn2.weight", (4,)),
    ("condition_embedding_spatial.bn2.bias", (4,)),
    *[item for i in (0, 2, 4) for item in (
        (f"condition_embedding_temporal.{i}.spatial.weight", (16, 1, 1, 3, 3)),
        (f"condition_embedding_temporal.{i}.temporal.weight", (16, 16, 3, 1, 1)),
        (f"condition_embedding_temporal.{i}.temporal.bias", (16,)))],
    ("condition_embedding_align.proj_p.weight", (128, 16, 1, 1)),
    ("condition_embedding_align.proj_p.bias", (128,)),
    ("condition_embedding_align.proj_r.weight", (128, 16, 1, 1)),
    ("condition_embedding_align.proj_r.bias", (128,)),
    ("condition_embedding_align.proj_p_back.weight", (16, 128, 1, 1)),
    ("condition_embedding_align.proj_p_back.bias", (16,)),
    ("condition_embedding_align.cross_attn.in_proj_weight", (384, 128)),
    ("condition_embedding_align.cross_attn.in_proj_bias", (384,)),
    ("condition_embedding_align.cross_attn.out_proj.weight", (128, 128)),
    ("condition_embedding_align.cross_attn.out_proj.bias", (128,)),
    ("condition_embedding_align.ffn_pose.0.weight", (128, 128, 1, 1)),
    ("condition_embedding_align.ffn_pose.0.bias", (128,)),
    ("condition_embedding_align.ffn_pose.2.weight", (128, 128, 1, 1)),
    ("condition_embedding_align.ffn_pose.2.bias", (128,)),
    ("condition_embedding_align.norm1.weight", (1, 128, 1, 1)),
    ("condition_embedding_align.norm1.bias", (1, 128, 1, 1)),
    ("condition_embedding_align.norm2.weight", (1, 128, 1, 1)),
    ("condition_embedding_align.norm2.bias", (1, 128, 1, 1)),
]


def _expected_layout(dim: int, ffn: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The original Wan2.1-I2V-14B layout (checkpoint_keys.md §2.3, §2.4 without proj_l, §2.6) + the pose keys."""
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedding.weight", (dim, 36, 1, 2, 2)), ("patch_embedding.bias", (dim,)), *POSE_KEYS,
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
                 (p + "norm3.weight", (dim,)), (p + "norm3.bias", (dim,))]
        for name in "qkvo":
            keys += [(f"{p}cross_attn.{name}.weight", (dim, dim)), (f"{p}cross_attn.{name}.bias", (dim,))]
        keys += [(p + "cross_attn.norm_q.weight", (dim,)), (p + "cross_attn.norm_k.weight", (dim,)),
                 (p + "cross_attn.k_img.weight", (dim, dim)), (p + "cross_attn.k_img.bias", (dim,)),
                 (p + "cross_attn.v_img.weight", (dim, dim)), (p + "cross_attn.v_img.bias", (dim,)),
                 (p + "cross_attn.norm_k_img.weight", (dim,)),
                 (p + "ffn.0.weight", (ffn, dim)), (p + "ffn.0.bias", (ffn,)),
                 (p + "ffn.2.weight", (dim, ffn)), (p + "ffn.2.bias", (dim,))]
    keys += [("head.modulation", (1, 2, dim)), ("head.head.weight", (64, dim)), ("head.head.bias", (64,)),
             ("img_emb.proj.0.weight", (1280,)), ("img_emb.proj.0.bias", (1280,)),
             ("img_emb.proj.1.weight", (1280, 1280)), ("img_emb.proj.1.bias", (1280,)),
             ("img_emb.proj.3.weight", (dim, 1280)), ("img_emb.proj.3.bias", (dim,)),
             ("img_emb.proj.4.weight", (dim,)), ("img_emb.proj.4.bias", (dim,))]
    return keys


def test_state_dict_is_the_steadydancer_14b_layout():
    with torch.device("meta"):
        state = SteadyDancerDiT(REAL).state_dict()
    layout = [(k, tuple(t.shape)) for k, t in state.items()]
    assert len(state) == 1345
    assert sum(t.numel() for t in state.values()) == 16_396_718_736
    assert layout[2:44] == POSE_KEYS                      # right after patch_embedding.bias
    assert sum(math.prod(s) for _, s in POSE_KEYS) == 1_839_952
    shapes = dict(layout)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert shapes["blocks.0.cross_attn.k_img.weight"] == (5120, 5120)
    assert shapes["blocks.39.cross_attn.norm_k_img.weight"] == (5120,)
    assert shapes["img_emb.proj.0.weight"] == (1280,)
    assert not any("proj_l" in k for k in state)
    assert layout == _expected_layout(5120, 13824, 40)
    assert len(list(SteadyDancerDiT(TINY).buffers())) == 0   # RoPE tables are a cache, not state


# ---------------------------------------------------------------------------------------------
# Tiny forward on CPU
# ---------------------------------------------------------------------------------------------


def _randomize(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor, at scales that keep activations O(1): so that every weight matters
    (the official init zeroes the head and the biases)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if "norm" in name or name.endswith(".bn1.weight") or name.endswith(".bn2.weight"):
            value = 1 + 0.2 * torch.randn(t.shape, generator=g)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(t.shape, generator=g)
        else:
            value = torch.randn(t.shape, generator=g) / math.sqrt(max(1, t.numel() // t.shape[0]))
        out[name] = value.to(t.dtype)
    return out


def _model(seed: int = 0, **kw) -> SteadyDancerDiT:
    model = SteadyDancerDiT(TINY, **kw)
    model.load_state_dict(_randomize(model.state_dict(), seed))
    return model.eval()


def _inputs(batch: int = 1, t: int = 3, h: int = 4, w: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    return dict(x=randn(batch, 16, t, h, w), timestep=torch.rand(batch, generator=g) * 1000,
                context=randn(batch, 7, TINY.text_dim), y=randn(batch, 20, t, h, w), pose=randn(batch, 16, t, h, w),
                ref_x=randn(batch, 36, 1, h, w), ref_c=randn(batch, 36, 1, h, w),
                clip_fea_x=randn(batch, 257, 1280), clip_fea_c=randn(batch, 257, 1280))


@torch.no_grad()
def test_tiny_forward_shape_and_determinism():
    model, inputs = _model(), _inputs()
    out = model(**inputs)
    assert out.shape == inputs["x"].shape                 # the two reference frames are cut
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, model(**inputs))


@torch.no_grad()
@pytest.mark.parametrize("name", ["pose", "ref_x", "ref_c", "clip_fea_c", "y"])
def test_every_condition_changes_the_output(name):
    model, inputs = _model(), _inputs()
    changed = {**inputs, name: torch.randn_like(inputs[name])}
    assert not torch.allclose(model(**inputs), model(**changed), atol=1e-3)


@torch.no_grad()
def test_only_the_first_16_channels_of_ref_c_are_read():
    model, inputs = _model(), _inputs()
    ref_c = inputs["ref_c"].clone()
    ref_c[:, 16:] = 0
    assert torch.equal(model(**inputs), model(**{**inputs, "ref_c": ref_c}))
    assert torch.equal(model(**inputs), model(**{**inputs, "ref_c": inputs["ref_c"][:, :16]}))


@torch.no_grad()
def test_batch_rows_are_independent():
    model, inputs = _model(), _inputs(batch=2)
    batched = model(**inputs)
    for i in range(2):
        single = model(**{k: v[i:i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_is_padded_to_text_len():
    model, inputs = _model(), _inputs()
    padded = torch.cat([inputs["context"], torch.zeros(1, TINY.text_len - 7, TINY.text_dim)], dim=1)
    torch.testing.assert_close(model(**inputs), model(**{**inputs, "context": padded}))


@torch.no_grad()
def test_sdpa_backend_choice_and_bf16():
    inputs = _inputs()
    reference = _model()(**inputs)
    math_only = _model(sdpa_backends=[SDPBackend.MATH])
    assert math_only.sdpa_backends == (SDPBackend.MATH,)
    torch.testing.assert_close(math_only(**inputs), reference, rtol=1e-4, atol=1e-4)
    bf16 = _model().to(torch.bfloat16)(**inputs)
    assert bf16.dtype == torch.float32
    assert ((bf16 - reference).norm() / reference.norm()).item() < 0.05


def test_dense_attention_only_and_weight_hook():
    model = _model()
    model.set_attention(AttentionType.ORIGINAL, 0.1)
    with pytest.raises(RequestError, match="attention_type"):
        model.set_attention(AttentionType.SLA, 0.1)
    calls: list[int] = []
    model.wait_for_weights = calls.append
    with torch.no_grad():
        model(**_inputs())
    assert calls == [-1, 0, 1] and model.wait_for_weights is None


# ---------------------------------------------------------------------------------------------
# Parity with the official module (MCG-NJU/SteadyDancer wan/modules/model_dancer.py)
# ---------------------------------------------------------------------------------------------

MIRROR = Path(os.environ.get("STEADYDANCER_MIRROR", "/work/.mirror/MCG-NJU+SteadyDancer/repo"))
COMMIT = "866a7219e74923d9486ab611cd981b15e5d959e5"   # the commit checkpoint_keys.md §6 was measured at
PACKAGE = "steadydancer_official"

# wan/modules/attention.py asserts CUDA and runs flash-attn in bf16. This stand-in has its signature and
# returns in q's dtype like it, computing in fp32; the forward never pads (seq_lens = full lengths).
ATTENTION_SHIM = '''
import torch


def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    assert q_lens is None and q_scale is None and softmax_scale is None and not causal
    assert tuple(window_size) == (-1, -1) and (k_lens is None or bool((k_lens == k.size(1)).all()))
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    return out.transpose(1, 2).type(q.dtype)
'''
# The one source change: the self-attention output is cast to bf16 before `o`, which would round the fp32
# comparison (and fails on CPU against fp32 weights). Cast to o's dtype instead.
BF16_CAST = "x = x.to(torch.bfloat16)"


def _stubs() -> dict[str, types.ModuleType]:
    """Stand-ins for packages the official module imports but whose code it does not run in forward:
    diffusers (ModelMixin/ConfigMixin/register_to_config are loading and config plumbing), and einops
    (two `rearrange` patterns) where they are not installed."""
    stubs: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("diffusers") is None:
        config_utils = types.ModuleType("diffusers.configuration_utils")
        config_utils.ConfigMixin = type("ConfigMixin", (), {})  # type: ignore[attr-defined]
        config_utils.register_to_config = lambda init: init  # type: ignore[attr-defined]
        modeling = types.ModuleType("diffusers.models.modeling_utils")
        modeling.ModelMixin = nn.Module  # type: ignore[attr-defined]
        stubs.update({"diffusers": types.ModuleType("diffusers"), "diffusers.configuration_utils": config_utils,
                      "diffusers.models": types.ModuleType("diffusers.models"),
                      "diffusers.models.modeling_utils": modeling})
    if importlib.util.find_spec("einops") is None:
        def rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
            if pattern == "b c t h w -> (b t) c h w":
                return x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
            if pattern == "(b t) c h w -> b c t h w":
                return x.reshape(sizes["b"], sizes["t"], *x.shape[1:]).permute(0, 2, 1, 3, 4)
            raise NotImplementedError(pattern)
        einops = types.ModuleType("einops")
        einops.rearrange = rearrange  # type: ignore[attr-defined]
        stubs["einops"] = einops
    return stubs


def _git_show(path: str) -> str:
    return subprocess.run(["git", "--git-dir", str(MIRROR), "show", f"{COMMIT}:{path}"],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """The official model_dancer.py (+ small_archs.py, mobilenetv2_dcd.py verbatim), imported from a temp package."""
    if shutil.which("git") is None or not MIRROR.exists():
        pytest.skip(f"the SteadyDancer mirror is not at {MIRROR} (set STEADYDANCER_MIRROR)")
    try:
        sources = {name: _git_show(f"wan/modules/{name}")
                   for name in ("model_dancer.py", "small_archs.py", "mobilenetv2_dcd.py")}
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"commit {COMMIT[:7]} is not in {MIRROR}: {exc.stderr.strip()}")
    assert sources["model_dancer.py"].count(BF16_CAST) == 1
    sources["model_dancer.py"] = sources["model_dancer.py"].replace(BF16_CAST, "x = x.to(self.o.weight.dtype)")
    sources["attention.py"] = ATTENTION_SHIM
    root = tmp_path_factory.mktemp("official")
    modules = root / PACKAGE / "modules"
    modules.mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text("")
    (modules / "__init__.py").write_text("")
    for name, text in sources.items():
        (modules / name).write_text(text)

    stubs, deterministic = _stubs(), torch.backends.cudnn.deterministic
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # its autocast(device_type="cuda") decorators warn without CUDA
            return importlib.import_module(f"{PACKAGE}.modules.model_dancer")
    finally:   # the imported module keeps its references; nothing else sees the stubs or the package
        sys.path.remove(str(root))
        for name in [*stubs, *(n for n in sys.modules if n.startswith(PACKAGE))]:
            sys.modules.pop(name, None)
        torch.backends.cudnn.deterministic = deterministic


def _official_model(module: types.ModuleType) -> nn.Module:
    return module.WanModel(model_type="i2v", patch_size=(1, 2, 2), text_len=TINY.text_len, in_dim=36, in_dim_c=16,
                           dim=TINY.dim, ffn_dim=TINY.ffn_dim, freq_dim=TINY.freq_dim, text_dim=TINY.text_dim,
                           out_dim=16, num_heads=TINY.num_heads, num_layers=TINY.num_layers, eps=TINY.eps).eval()


def test_layout_matches_the_official_module(official):
    ours = [(k, tuple(t.shape)) for k, t in SteadyDancerDiT(TINY).state_dict().items()]
    assert ours == [(k, tuple(t.shape)) for k, t in _official_model(official).state_dict().items()]


@torch.no_grad()
@pytest.mark.parametrize(("t", "h", "w", "seed"), [(3, 4, 6, 1), (2, 6, 4, 2)])
def test_forward_matches_the_official_module(official, t, h, w, seed):
    theirs = _official_model(official)
    state = _randomize(theirs.state_dict(), seed)
    theirs.load_state_dict(state)
    ours = SteadyDancerDiT(TINY).eval()
    ours.load_state_dict(state)
    inputs = _inputs(t=t, h=h, w=w, seed=seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # autocast(device_type="cuda") without CUDA
        expected = theirs([inputs["x"][0]], t=inputs["timestep"], context=[inputs["context"][0]], seq_len=0,
                          condition=inputs["pose"][0], ref_x=inputs["ref_x"][0], ref_c=inputs["ref_c"][0],
                          clip_fea_x=inputs["clip_fea_x"], clip_fea_c=inputs["clip_fea_c"], y=[inputs["y"][0]])[0]
    actual = ours(**inputs)[0]
    assert actual.shape == expected.shape == (16, t, h, w)
    rel = ((actual - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 1e-4, rel
