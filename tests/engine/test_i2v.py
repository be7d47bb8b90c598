"""Image-to-video on the tiny A14B-shaped preset: strict loading of the two experts' files in the
TurboWan layout (plain, -quant, Conv3d-shaped patch embedding), the expert switch, the memory
policies, and adaptive sizes, all through the real classes and loaders on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import loading
from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.errors import CheckpointError, RequestError
from engine.experts import choose_policy
from engine.family import Engine
from engine.int8 import swap_block_linears_for_int8
from engine.registry import get_model
from engine.requests import I2VRequest
from engine.settings import EngineSettings
from engine.umt5 import UMT5Encoder
from engine.wan_dit import WanDiT
from engine.wan_vae import WanVAE

CPU = torch.device("cpu")
TINY = WanConfig.from_name("tiny-i2v")
SLA = AttentionSpec(type=AttentionType.SLA, topk=0.5)
NAMES = {f.role: f for f in get_model("tiny-i2v").files}


def _dit(seed: int) -> WanDiT:
    dit = loading.build_random(lambda: WanDiT(TINY, SLA), seed=seed, device=CPU, dtype=torch.float32)
    with torch.no_grad():     # SLA's proj_l starts at zero: give every tensor a value to check
        for p in dit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return dit


@pytest.fixture(scope="module")
def experts() -> dict[str, WanDiT]:
    return {"dit_high": _dit(11), "dit_low": _dit(12)}


def _write(root: Path, experts: dict[str, WanDiT], *, quant: bool = False, conv3d: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for role, dit in experts.items():
        state = dict(dit.state_dict())
        if quant:
            copy = _dit(0)
            copy.load_state_dict(state)
            swap_block_linears_for_int8(copy, quantize=True)
            state = dict(copy.state_dict())
        if conv3d:   # the layout before TurboDiffusion's safetensors_to_pth.py reshapes it
            w = state["patch_embedding.weight"]
            state["patch_embedding.weight"] = w.reshape(w.shape[0], TINY.in_dim, *TINY.patch_size)
        name = NAMES[role].quant_name if quant else NAMES[role].name
        torch.save(state, root / name)
    torch.save(loading.build_random(lambda: WanVAE(TINY.vae), seed=2, device=CPU,
                                    dtype=torch.float32).state_dict(), root / NAMES["vae"].name)
    torch.save(loading.build_random(lambda: UMT5Encoder(TINY.umt5), seed=3, device=CPU,
                                    dtype=torch.float32).state_dict(), root / NAMES["text_encoder"].name)
    return root


def _image(tmp_path: Path, size=(300, 200), color="red") -> str:
    path = tmp_path / f"{color}-{size[0]}x{size[1]}.png"
    Image.new("RGB", size, color).save(path)
    return str(path)


def _engine(root: Path | None = None, **settings) -> Engine:
    return Engine(EngineSettings(checkpoints_dir=root, **settings), device="cpu")


def _request(image: str, **kw) -> I2VRequest:
    return I2VRequest(prompt="a red square", image=image, num_frames=5, **kw)


@pytest.mark.parametrize("layout", ["plain", "quant", "conv3d"])
def test_both_experts_load_strictly_from_turbowan_files(tmp_path, experts, layout):
    root = _write(tmp_path / layout, experts, quant=layout == "quant", conv3d=layout == "conv3d")
    engine = _engine(root)
    spec = engine.load_spec("tiny-i2v", "true" if layout == "quant" else "auto")
    assert spec.files.get("dit_high").name == (NAMES["dit_high"].quant_name if layout == "quant"
                                               else NAMES["dit_high"].name)
    pipe = engine.pipeline(spec)
    result = engine.generate(spec, _request(_image(tmp_path)))      # 4 steps: both experts run
    assert result.frames.shape[1:] == (result.height, result.width, 3)
    for role, want in experts.items():
        got = pipe.experts.experts[role].state_dict()
        if layout == "quant":       # int8 files are dequantized at load: close, not equal
            assert pipe.int8_path == "dequantized"
            torch.testing.assert_close(got["blocks.0.ffn.0.weight"], want.state_dict()["blocks.0.ffn.0.weight"],
                                       atol=2e-3, rtol=0)
        else:
            for key, value in want.state_dict().items():
                assert torch.equal(got[key], value), key


def test_a_t2v_file_in_place_of_an_expert_is_refused_naming_file_and_key(tmp_path, experts):
    root = _write(tmp_path / "bad", experts)
    t2v = loading.build_random(lambda: WanDiT(WanConfig.from_name("tiny-t2v"), SLA), seed=1, device=CPU,
                               dtype=torch.float32)
    torch.save(t2v.state_dict(), root / NAMES["dit_low"].name)
    engine = _engine(root)
    spec = engine.load_spec("tiny-i2v")
    with pytest.raises(CheckpointError) as err:      # the low expert loads at the first low step
        engine.generate(spec, _request(_image(tmp_path)))
    assert NAMES["dit_low"].name in str(err.value) and "patch_embedding.weight" in str(err.value)


def test_a_missing_expert_file_is_named(tmp_path, experts):
    root = _write(tmp_path / "half", experts)
    (root / NAMES["dit_low"].name).unlink()
    with pytest.raises(CheckpointError, match=NAMES["dit_low"].name):
        _engine(root).load_spec("tiny-i2v")


@pytest.mark.parametrize("steps, low_loaded", [(1, False), (2, False), (3, True), (4, True)])
def test_one_or_two_steps_never_load_the_low_noise_expert(tmp_path, steps, low_loaded):
    engine = _engine()
    spec = engine.load_spec("tiny-i2v")
    engine.generate(spec, _request(_image(tmp_path), num_steps=steps))
    assert ("dit_low" in engine.pipeline(spec).experts.file_loads) == low_loaded


def test_every_policy_gives_the_same_video(tmp_path):
    image = _image(tmp_path)
    videos, loads = {}, {}
    for policy in ("resident", "swap", "sequential"):
        engine = _engine(expert_policy=policy)
        spec = engine.load_spec("tiny-i2v")
        results = [engine.generate(spec, _request(image, seed=s)) for s in (1, 2)]
        videos[policy] = [r.frames for r in results]
        loads[policy] = [r.expert_loads for r in results]
        assert all(r.expert_policy == policy for r in results)
    for policy in ("swap", "sequential"):
        for a, b in zip(videos["resident"], videos[policy]):
            np.testing.assert_array_equal(a, b)
    assert loads["resident"] == [1, 0]        # the low expert loads once, then both stay
    assert loads["swap"] == [1, 2]            # from the second row on: each expert in once per row


def test_sequential_brings_each_expert_in_once_per_group(tmp_path):
    image = _image(tmp_path)
    engine = _engine(expert_policy="sequential", expert_group_rows=3)
    spec = engine.load_spec("tiny-i2v")
    pipe = engine.pipeline(spec)
    assert pipe.rows_per_group(10) == 3 and pipe.rows_per_group(2) == 3 and pipe.rows_per_group(1) == 1
    results = []
    for group in ([1, 2, 3], [4, 5, 6]):
        pending = [pipe.start(_request(image, seed=s)) for s in group]
        results += [pipe.finish(p) for p in pending]
    groups = [r.expert_group for r in results]
    assert groups[:3] == [groups[0]] * 3 and groups[3:] == [groups[3]] * 3 and groups[0] != groups[3]
    # Group 1: the high expert was already on the GPU, the low one loads; group 2: both come in.
    assert sum(r.expert_loads for r in results[:3]) == 1
    assert sum(r.expert_loads for r in results[3:]) == 2
    assert pipe.experts.loads == {"dit_high": 2, "dit_low": 2}
    # Pausing between phases changes nothing: the same rows generated one by one match.
    alone = _engine(expert_policy="resident")
    for seed, result in zip([1, 2, 3, 4, 5, 6], results):
        np.testing.assert_array_equal(alone.generate(alone.load_spec("tiny-i2v"), _request(image, seed=seed)).frames,
                                      result.frames)


def test_the_image_conditions_the_video(tmp_path):
    engine = _engine()
    spec = engine.load_spec("tiny-i2v")
    red = engine.generate(spec, _request(_image(tmp_path, color="red"))).frames
    blue = engine.generate(spec, _request(_image(tmp_path, color="blue"))).frames
    assert not np.array_equal(red, blue)


@pytest.mark.parametrize("size, adaptive, want", [
    ((300, 200), True, (144, 96)),      # 3:2 at the tiny 720p 16:9 area (160×96)
    ((100, 100), True, (128, 128)),
    ((300, 200), False, (160, 96)),     # the preset size, stretched
])
def test_output_size_follows_the_image_when_adaptive(tmp_path, size, adaptive, want):
    engine = _engine()
    spec = engine.load_spec("tiny-i2v")
    result = engine.generate(spec, _request(_image(tmp_path, size=size), adaptive_resolution=adaptive,
                                            num_steps=1))
    assert (result.width, result.height) == want


def test_bad_requests_name_the_field(tmp_path):
    engine = _engine()
    spec = engine.load_spec("tiny-i2v")
    with pytest.raises(RequestError, match="boundary"):
        engine.generate(spec, _request(_image(tmp_path), boundary=1.5))
    with pytest.raises(RequestError, match="image"):
        engine.generate(spec, I2VRequest(prompt="x"))
    unreadable = tmp_path / "not.png"
    unreadable.write_text("text")
    with pytest.raises(RequestError, match="image"):
        engine.generate(spec, _request(str(unreadable)))


def test_auto_policy_follows_the_budget():
    gib = 2**30
    pick = lambda budget, rows=1: choose_policy("auto", budget_bytes=budget, expert_bytes=29 * gib,
                                                working_bytes=8 * gib, expected_rows=rows)
    assert pick(None) == "resident"                  # CPU: no VRAM budget
    assert pick(130 * gib) == "resident"             # H200 (92 % of 141 GB)
    assert pick(int(0.92 * 80 * gib)) == "resident"  # H100 80 GB: 2×29 + 8 = 66 GiB
    assert pick(45 * gib) == "swap"
    assert pick(45 * gib, rows=20) == "sequential"
    assert choose_policy("swap", budget_bytes=None, expert_bytes=1, working_bytes=1, expected_rows=9) == "swap"


@pytest.mark.gpu
def test_swap_streams_the_experts_and_matches_resident_on_cuda(tmp_path):
    """On CUDA the swap policy copies an expert in block by block beside the forward; every block
    must wait for its own weights, so the video is the same as with both experts resident."""
    image = _image(tmp_path)
    videos = {}
    for policy in ("resident", "swap"):
        engine = Engine(EngineSettings(expert_policy=policy), device="cuda")
        spec = engine.load_spec("tiny-i2v")
        results = [engine.generate(spec, _request(image, seed=s, attention_type="original")) for s in (1, 2, 3)]
        videos[policy] = [r.frames for r in results]
        if policy == "swap":
            pipe = engine.pipeline(spec)
            assert pipe.experts.loads == {"dit_high": 3, "dit_low": 3}
            assert all(r.expert_loads == 2 for r in results[1:])
    for a, b in zip(videos["resident"], videos["swap"]):
        np.testing.assert_array_equal(a, b)


def test_ode_sampling_is_deterministic_and_differs_from_sde(tmp_path):
    engine = _engine()
    spec = engine.load_spec("tiny-i2v")
    image = _image(tmp_path)
    ode = [engine.generate(spec, _request(image, sampler="ode", num_steps=3)).frames for _ in range(2)]
    sde = engine.generate(spec, _request(image, num_steps=3)).frames
    np.testing.assert_array_equal(ode[0], ode[1])
    assert not np.array_equal(ode[0], sde)
