"""Dance on the tiny SteadyDancer-shaped preset, through the real classes and loaders on the CPU:
the official sharded DiT layout, the full CLIP file and a step-distill LoRA load strictly or
merge; sizes follow the reference; guidance picks the official or the fast sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import loading
from engine.clip import TINY_CLIP, clip_checkpoint_layout
from engine.dance import dance_size
from engine.dance_dit import SteadyDancerDiT
from engine.errors import CheckpointError, RequestError
from engine.family import Engine
from engine.registry import get_model
from engine.requests import DanceRequest
from engine.settings import EngineSettings
from engine.umt5 import UMT5Encoder
from engine.wan_vae import WanVAE
from pose.keypoints import PoseSequence

CPU = torch.device("cpu")
SPEC = get_model("tiny-dance")
FRAMES = 5


def _poses(path: Path, shift: float = 0.0) -> str:
    rng = np.random.default_rng(0)
    base = np.array([60.0, 40.0], np.float32) + rng.normal(0, 12, (134, 2)).astype(np.float32)
    keypoints = np.stack([base + shift + 2 * i for i in range(FRAMES)])
    PoseSequence(keypoints=keypoints, scores=np.ones((FRAMES, 134), np.float32), width=120, height=160,
                 fps=16).save_npz(path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dance-inputs")
    Image.new("RGB", (120, 160), (230, 120, 40)).save(root / "ref.png")
    return {"image": str(root / "ref.png"), "poses": _poses(root / "pos.npz"),
            "negative_poses": _poses(root / "neg.npz", shift=9.0)}


def _request(inputs, **kw) -> DanceRequest:
    fields = {"prompt": "a dancer on a stage", "num_frames": FRAMES, "num_steps": 3, "seed": 1, **inputs, **kw}
    return DanceRequest(**fields)


def test_size_follows_the_reference_at_the_presets_area():
    assert dance_size(1024 * 576, (1024, 576)) == (1024, 576)
    assert dance_size(1024 * 576, (656, 896)) == (656, 896)      # SteadyDancer's example reference
    w, h = dance_size(1024 * 576, (3000, 1000))
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 576


def test_official_guidance_runs_three_branches_on_the_pose_steps(inputs):
    engine = Engine(EngineSettings(), device="cpu")
    spec = engine.load_spec("tiny-dance")
    result = engine.generate(spec, _request(inputs, num_steps=6))
    assert result.frames.shape == (FRAMES, result.height, result.width, 3)
    assert (result.width, result.height) == dance_size(96 * 64, (120, 160))
    assert result.sampler == "unipc-6-official-shift3"
    assert "step_with_pose_cfg_s" in result.timings and "step_without_pose_cfg_s" in result.timings
    again = engine.generate(spec, _request(inputs, num_steps=6))
    np.testing.assert_array_equal(result.frames, again.frames)
    moved = engine.generate(spec, _request(inputs, num_steps=6, poses=inputs["negative_poses"]))
    assert not np.array_equal(result.frames, moved.frames)         # the poses drive the video


def test_fast_guidance_needs_no_negative_poses(inputs):
    engine = Engine(EngineSettings(), device="cpu")
    spec = engine.load_spec("tiny-dance")
    result = engine.generate(spec, _request(inputs, guidance="fast", num_steps=4, negative_poses=""))
    assert result.sampler.startswith("unipc-4-fast") and "step_with_pose_cfg_s" not in result.timings


def test_bad_requests_name_the_field(inputs, tmp_path):
    engine = Engine(EngineSettings(), device="cpu")
    spec = engine.load_spec("tiny-dance")
    with pytest.raises(RequestError, match="attention_type"):
        engine.generate(spec, _request(inputs, attention_type="sla"))
    with pytest.raises(RequestError, match="num_steps"):
        engine.generate(spec, _request(inputs, num_steps=0))
    short = tmp_path / "short.npz"
    PoseSequence(keypoints=np.zeros((2, 134, 2), np.float32), scores=np.ones((2, 134), np.float32),
                 width=120, height=160, fps=16).save_npz(short)
    with pytest.raises(RequestError, match="pose frames"):
        engine.generate(spec, _request(inputs, poses=str(short)))


# ── checkpoints in the official layouts ──────────────────────────────────────────────────────

def _write_checkpoints(root: Path) -> dict[str, torch.Tensor]:
    folder = root / "tiny-dance"
    folder.mkdir(parents=True)
    dit = loading.build_random(lambda: SteadyDancerDiT(SPEC.config, SPEC.dancer), seed=5, device=CPU,
                               dtype=torch.float32)
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    keys, weight_map = list(state), {}
    for i in range(3):                       # the official naming: three shards and an index
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        part = {k: state[k] for k in keys[i::3]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    g = torch.Generator().manual_seed(6)
    torch.save({k: torch.randn(s, generator=g) * 0.2 for k, s in clip_checkpoint_layout(TINY_CLIP).items()},
               root / "tiny-clip.pth")
    torch.save(loading.build_random(lambda: WanVAE(SPEC.config.vae), seed=2, device=CPU,
                                    dtype=torch.float32).state_dict(), root / "tiny-vae.pth")
    torch.save(loading.build_random(lambda: UMT5Encoder(SPEC.config.umt5), seed=3, device=CPU,
                                    dtype=torch.float32).state_dict(), root / "tiny-umt5.pth")
    return state


def test_sharded_dit_full_clip_and_a_lora_load_strictly_and_merge(tmp_path, inputs):
    state = _write_checkpoints(tmp_path)
    key = "blocks.0.self_attn.q.weight"
    out_dim, in_dim = state[key].shape
    down, up = torch.randn(2, in_dim), torch.randn(out_dim, 2)
    save_file({f"diffusion_model.{key[:-len('.weight')]}.lora_down.weight": down,
               f"diffusion_model.{key[:-len('.weight')]}.lora_up.weight": up}, tmp_path / "distill.safetensors")

    engine = Engine(EngineSettings(checkpoints_dir=tmp_path), device="cpu")
    plain = engine.pipeline(engine.load_spec("tiny-dance"))
    for k, v in state.items():
        assert torch.equal(plain.dit.state_dict()[k], v), k
    merged = engine.pipeline(engine.load_spec("tiny-dance", lora="distill.safetensors"))
    torch.testing.assert_close(merged.dit.state_dict()[key], state[key] + up @ down)
    result = engine.generate(engine.load_spec("tiny-dance", lora="distill.safetensors"),
                             _request(inputs, num_steps=4, negative_poses=""))
    assert result.sampler.startswith("unipc-4-fast")                # a merged LoRA means the fast sampler

    with pytest.raises(CheckpointError, match="nowhere.safetensors"):
        engine.load_spec("tiny-dance", lora="nowhere.safetensors")
    (tmp_path / "tiny-dance" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00003"):
        Engine(EngineSettings(checkpoints_dir=tmp_path), device="cpu").pipeline(
            Engine(EngineSettings(checkpoints_dir=tmp_path), device="cpu").load_spec("tiny-dance"))
