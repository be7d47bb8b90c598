"""Strict offline loading of tiny checkpoints written in the real file layouts, through the real loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import loading
from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.errors import CheckpointError
from engine.family import LoadSpec
from engine.int8 import swap_block_linears_for_int8
from engine.registry import CheckpointFile, ModelFiles, ModelSpec, resolve_files
from engine.requests import T2VRequest as GenerationRequest
from engine.settings import EngineSettings
from engine.t2v import WanT2VPipeline
from engine.umt5 import UMT5Encoder
from engine.wan_dit import WanDiT
from engine.wan_vae import WanVAE

CPU = torch.device("cpu")
SPEC = AttentionSpec(type=AttentionType.SLA, topk=0.5)
TINY = dataclasses.replace(WanConfig.from_name("tiny-t2v"), random_init=False)
# A real (non-random) preset of tiny shape, with TurboDiffusion's file layout.
TINY_SPEC = ModelSpec(name="tiny-t2v", mode="t2v", config=TINY, files=(
    CheckpointFile("dit", "TurboWan-tiny.pth", quant_name="TurboWan-tiny-quant.pth"),
    CheckpointFile("vae", "Wan2.1_VAE.pth"),
    CheckpointFile("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth")))
NAMES = {f.role: f for f in TINY_SPEC.files}


def _random(build, seed: int) -> torch.nn.Module:
    return loading.build_random(build, seed=seed, device=CPU, dtype=torch.float32)


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a cat on a roof", "a dog in the snow at night"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    dit = _random(lambda: WanDiT(TINY, SPEC), 1)
    with torch.no_grad():    # SLA's proj_l starts at zero; give it weights so loading shows
        for p in dit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(dit.state_dict(), root / NAMES["dit"].name)
    swap_block_linears_for_int8(dit, quantize=True)
    (root / "quant").mkdir()
    torch.save(dit.state_dict(), root / "quant" / NAMES["dit"].quant_name)
    torch.save(_random(lambda: WanVAE(TINY.vae), 2).state_dict(), root / NAMES["vae"].name)
    torch.save(_random(lambda: UMT5Encoder(TINY.umt5), 3).state_dict(), root / NAMES["text_encoder"].name)
    _save_tokenizer(root / "tokenizer")
    return root


def _files(root: Path, **override) -> ModelFiles:
    paths = {**resolve_files(TINY_SPEC, root).paths, "tokenizer": root / "tokenizer", **override}
    return ModelFiles(paths)


def _pipeline(files: ModelFiles) -> WanT2VPipeline:
    spec = LoadSpec(model=TINY_SPEC, files=files, device=CPU, dtype=torch.float32)
    return WanT2VPipeline(spec, EngineSettings())


def test_tiny_checkpoints_load_strictly_and_generate(ckpt_dir):
    pipe = _pipeline(_files(ckpt_dir))
    saved = torch.load(ckpt_dir / NAMES["dit"].name, weights_only=True)
    assert saved.keys() == pipe.dit.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in pipe.dit.state_dict().items())
    assert pipe.int8_path == "none"
    result = pipe.generate(GenerationRequest("a cat on a roof", num_frames=5, seed=1))
    assert result.frames.shape == (5, 64, 112, 3) and result.frames.dtype.name == "uint8"
    assert pipe.text_encoder_loads == 1


def test_quant_checkpoint_is_dequantized_and_close_to_bf16(ckpt_dir):
    plain = _pipeline(_files(ckpt_dir))
    quant_files = _files(ckpt_dir, dit=ckpt_dir / "quant" / NAMES["dit"].quant_name)
    quant = _pipeline(quant_files)
    assert quant.int8_path == "dequantized"
    x = torch.randn(1, 16, 2, 8, 14)
    t = torch.tensor([900.0])
    ctx = torch.randn(1, TINY.text_len, TINY.text_dim)
    ref, got = plain.dit(x, t, ctx), quant.dit(x, t, ctx)
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.02     # int8 128×128 block scales: about 1 % on Gaussian weights


def test_auto_picks_quant_file_when_it_is_the_only_dit(ckpt_dir):
    others = {"vae": ckpt_dir / NAMES["vae"].name, "text_encoder": ckpt_dir / NAMES["text_encoder"].name}
    files = resolve_files(TINY_SPEC, ckpt_dir / "quant", overrides=others)
    assert files.get("dit") == ckpt_dir / "quant" / NAMES["dit"].quant_name
    with pytest.raises(CheckpointError, match="TurboWan-tiny.pth"):
        resolve_files(TINY_SPEC, ckpt_dir / "quant", quant_linear="false", overrides=others)


def test_missing_file_names_every_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_files(TINY_SPEC, tmp_path)
    msg = str(err.value)
    for name in (NAMES["dit"].name, NAMES["vae"].name, NAMES["text_encoder"].name):
        assert str(tmp_path / name) in msg
    assert "README" in msg


def test_conv3d_shaped_patch_embedding_is_converted_at_load(ckpt_dir, tmp_path):
    """Original Wan, merged and community files store patch_embedding as a Conv3d weight
    [dim, C, 1, 2, 2]; TurboDiffusion's safetensors_to_pth.py only reshapes it to the Linear."""
    state = torch.load(ckpt_dir / NAMES["dit"].name, weights_only=True)
    linear = state["patch_embedding.weight"]
    state["patch_embedding.weight"] = linear.reshape(64, 16, 1, 2, 2).clone()
    conv = tmp_path / "conv3d.pth"
    torch.save(state, conv)
    pipe = _pipeline(_files(ckpt_dir, dit=conv))
    assert torch.equal(pipe.dit.patch_embedding.weight, linear)


@pytest.mark.parametrize("damage, field, needle", [
    ("drop", "missing", "blocks.1.ffn.0.weight"),
    ("extra", "unexpected", "blocks.0.self_attn.extra.weight"),
    ("shape", "mismatched", "patch_embedding.weight file [64, 32] vs model [64, 64]"),
])
def test_damaged_dit_file_names_file_and_keys(ckpt_dir, tmp_path, damage, field, needle):
    state = torch.load(ckpt_dir / NAMES["dit"].name, weights_only=True)
    if damage == "drop":
        del state["blocks.1.ffn.0.weight"]
    elif damage == "extra":
        state["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    else:   # a patch embedding for another input width
        state["patch_embedding.weight"] = state["patch_embedding.weight"][:, :32].clone()
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        _pipeline(_files(ckpt_dir, dit=bad))
    assert str(bad) in str(err.value) and needle in str(err.value)
    assert [needle in k for k in getattr(err.value, field)].count(True) == 1


@pytest.mark.parametrize("part, build, name", [
    ("vae", lambda: WanVAE(TINY.vae), "Wan2.1_VAE.pth"),
    ("text_encoder", lambda: UMT5Encoder(TINY.umt5), "models_t5_umt5-xxl-enc-bf16.pth"),
])
def test_vae_and_umt5_load_strictly(ckpt_dir, tmp_path, part, build, name):
    module = loading.load_module(build, ckpt_dir / name, device=CPU, dtype=torch.float32)
    saved = torch.load(ckpt_dir / name, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    first = next(iter(saved))
    del saved[first]
    torch.save(saved, tmp_path / name)
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {first}"):
        loading.load_module(build, tmp_path / name, device=CPU, dtype=torch.float32)


def test_safetensors_loads_the_same(ckpt_dir, tmp_path):
    state = torch.load(ckpt_dir / NAMES["vae"].name, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "vae.safetensors")
    module = loading.load_module(lambda: WanVAE(TINY.vae), tmp_path / "vae.safetensors",
                                 device=CPU, dtype=torch.float32)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_not_a_checkpoint_and_missing_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read as a checkpoint"):
        loading.read_state_dict(junk)
    with pytest.raises(CheckpointError, match="nope.pth: file not found"):
        loading.read_state_dict(tmp_path / "nope.pth")


def test_missing_tokenizer_folder_is_named(ckpt_dir, tmp_path):
    pipe = _pipeline(_files(ckpt_dir, tokenizer=tmp_path / "no-tokenizer"))
    with pytest.raises(CheckpointError, match="no-tokenizer"):
        pipe.generate(GenerationRequest("a cat", num_frames=1))
