"""CLIP ViT-H/14 image encoder: the file layout (counts of reference/checkpoint_keys.md §5, and the
official constructor on meta), strict loading of a tiny file holding the full key set, and our tower
against the official `wan/modules/clip.py` on the same random weights.

The official comparison reads SteadyDancer's code from a local git mirror (STEADYDANCER_GIT_DIR, by
default the project's mirror) into a temporary package; it is skipped where no mirror is found. Its
imports this machine cannot satisfy are stubbed: `.attention.flash_attention` (a CUDA-only kernel;
the stand-in is the same softmax(q k^T / sqrt(d)) attention through SDPA), `.tokenizers` (unused
here) and, when torchvision is absent, `torchvision.transforms` (only `Normalize` is used by
`CLIPModel.visual`; the stand-in computes torchvision's documented (x - mean) / std).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.clip import (
    CLIP_FILE,
    TINY_CLIP,
    CLIPConfig,
    CLIPVisionH,
    clip_checkpoint_layout,
    load_clip,
    preprocess_images,
)
from engine.errors import CheckpointError

CPU = torch.device("cpu")
MIRROR = Path(os.environ.get("STEADYDANCER_GIT_DIR", "/work/.mirror/MCG-NJU+SteadyDancer/repo"))
OFFICIAL_FILES = ("wan/modules/clip.py", "wan/modules/xlm_roberta.py")
# clip_xlm_roberta_vit_h_14() keyword overrides that give TINY_CLIP's shapes
TINY_OFFICIAL = dict(embed_dim=16, image_size=56, patch_size=14, vision_dim=32, vision_heads=4, vision_layers=3,
                     vocab_size=40, max_text_len=12, text_dim=24, text_heads=4, text_layers=2)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _random_full_state(config: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.2 for k, shape in clip_checkpoint_layout(config).items()}


# ---------------------------------------------------------------------------------------------
# 1. Layout
# ---------------------------------------------------------------------------------------------


def test_full_layout_has_the_784_keys_of_the_released_file():
    layout = clip_checkpoint_layout(CLIPConfig())
    visual = {k: s for k, s in layout.items() if k.startswith("visual.")}
    textual = {k: s for k, s in layout.items() if k.startswith("textual.")}
    assert len(layout) == 784 and sum(map(_numel, layout.values())) == 1_193_014_785
    assert len(visual) == 392 and sum(map(_numel, visual.values())) == 632_076_800
    assert len(textual) == 391 and sum(map(_numel, textual.values())) == 560_937_984
    assert layout["log_scale"] == ()
    assert list(layout)[:7] == ["log_scale", "visual.cls_embedding", "visual.pos_embedding", "visual.head",
                                "visual.patch_embedding.weight", "visual.pre_norm.weight", "visual.pre_norm.bias"]
    assert layout["visual.pos_embedding"] == (1, 257, 1280)
    assert layout["visual.transformer.31.mlp.0.weight"] == (5120, 1280)
    assert layout["textual.token_embedding.weight"] == (250_002, 1024)
    assert list(layout)[-2:] == ["textual.head.0.weight", "textual.head.2.weight"]


def test_used_tower_is_the_377_keys_up_to_block_30_on_meta():
    with torch.device("meta"):
        model = CLIPVisionH(CLIPConfig())
    state = model.state_dict()
    layout = clip_checkpoint_layout(CLIPConfig())
    assert len(state) == 377
    assert sum(t.numel() for t in state.values()) == 611_086_080
    assert all(tuple(t.shape) == layout[k] for k, t in state.items())
    assert "visual.transformer.30.mlp.2.bias" in state and "visual.transformer.31.norm1.weight" not in state
    dropped = set(layout) - set(state)
    assert {"log_scale", "visual.head", "visual.post_norm.weight"} <= dropped
    assert all(k.startswith(("textual.", "visual.transformer.31.", "visual.post_norm.", "visual.head", "log_scale"))
               for k in dropped)


# ---------------------------------------------------------------------------------------------
# 2. Strict loading of a tiny file with the full key set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_tiny_full_file_loads_strictly_and_keeps_only_the_used_tensors(tmp_path, fmt):
    state = _random_full_state(TINY_CLIP)
    path = tmp_path / (CLIP_FILE if fmt == "pth" else "clip.safetensors")
    torch.save(state, path) if fmt == "pth" else save_file(state, path)
    model = load_clip(path, device=CPU, dtype=torch.float32, config=TINY_CLIP)
    loaded = model.state_dict()
    assert len(loaded) == 5 + 12 * (TINY_CLIP.num_layers - 1)
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state[key]), key
    assert not any(p.requires_grad for p in model.parameters())


def _expect_error(tmp_path, state, **kwargs) -> CheckpointError:
    path = tmp_path / CLIP_FILE
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_clip(path, device=CPU, dtype=torch.float32, config=TINY_CLIP)
    return info.value


def test_missing_textual_key_is_named(tmp_path):
    state = _random_full_state(TINY_CLIP)
    del state["textual.blocks.1.ffn.2.bias"]
    err = _expect_error(tmp_path, state)
    assert err.missing == ["textual.blocks.1.ffn.2.bias"] and "textual.blocks.1.ffn.2.bias" in str(err)


def test_missing_log_scale_and_unused_visual_keys_are_named(tmp_path):
    state = _random_full_state(TINY_CLIP)
    del state["log_scale"], state["visual.transformer.2.attn.proj.weight"]
    assert set(_expect_error(tmp_path, state).missing) == {"log_scale", "visual.transformer.2.attn.proj.weight"}


def test_wrong_shape_and_unexpected_key_are_named(tmp_path):
    state = _random_full_state(TINY_CLIP)
    state["textual.pos_embedding.weight"] = torch.zeros(13, TINY_CLIP.text_dim)
    state["visual.proj"] = torch.zeros(3)
    err = _expect_error(tmp_path, state)
    assert err.unexpected == ["visual.proj"]
    assert len(err.mismatched) == 1 and err.mismatched[0].startswith("textual.pos_embedding.weight")


def test_transformers_layout_is_recognised(tmp_path):
    err = _expect_error(tmp_path, {"vision_model.embeddings.class_embedding": torch.zeros(8),
                                   "visual_projection.weight": torch.zeros(2, 8)})
    assert "transformers CLIPModel layout" in str(err)


# ---------------------------------------------------------------------------------------------
# 3. Encoding
# ---------------------------------------------------------------------------------------------


def test_encode_gives_one_token_per_patch_plus_class_token():
    torch.manual_seed(0)
    model = CLIPVisionH(TINY_CLIP).eval()
    images = torch.rand(2, 3, 40, 70) * 2 - 1           # any size: resized to image_size
    out = model.encode(images)
    assert out.shape == (2, TINY_CLIP.seq_len, TINY_CLIP.dim) == (2, 17, 32)
    # images are encoded independently
    assert torch.allclose(model.encode(images[1:]), out[1:], atol=1e-5)


def test_preprocess_maps_minus_one_to_one_onto_clip_normalisation():
    white = preprocess_images(torch.ones(1, 3, 10, 10), TINY_CLIP)
    assert white.shape == (1, 3, 56, 56)
    assert torch.allclose(white[0, :, 0, 0], torch.tensor([(1 - 0.48145466) / 0.26862954,
                                                          (1 - 0.4578275) / 0.26130258,
                                                          (1 - 0.40821073) / 0.27577711]))


# ---------------------------------------------------------------------------------------------
# 4. Against the official code
# ---------------------------------------------------------------------------------------------


def _flash_attention_stand_in(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                              q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                              dtype=torch.bfloat16, version=None):
    """[B, L, N, D] in and out, as the official wrapper; the math of flash-attn's varlen kernel."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


class _Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, x):
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

    tr.Compose = Compose
    tr.Normalize = _Normalize
    tr.Resize = lambda *args, **kwargs: None
    tr.ToTensor = lambda: None
    tr.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    tv.transforms = tr
    return {"torchvision": tv, "torchvision.transforms": tr}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """SteadyDancer's `wan.modules.clip`, imported from the mirror into a throwaway package."""
    git = shutil.which("git")
    if git is None or not MIRROR.is_dir():
        pytest.skip(f"no SteadyDancer git mirror at {MIRROR} (set STEADYDANCER_GIT_DIR)")
    root = tmp_path_factory.mktemp("official")
    package = root / "steadydancer_official"
    package.mkdir()
    for name in OFFICIAL_FILES:
        text = subprocess.run([git, f"--git-dir={MIRROR}", "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (package / Path(name).name).write_text(text)
    (package / "__init__.py").write_text("")
    (package / "attention.py").write_text("flash_attention = None  # replaced by the test\n")
    (package / "tokenizers.py").write_text("class HuggingfaceTokenizer:\n    pass\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        try:
            import torchvision  # noqa: F401
        except ImportError:
            for name, module in _torchvision_stand_in().items():
                mp.setitem(sys.modules, name, module)
        attention = importlib.import_module("steadydancer_official.attention")
        attention.flash_attention = _flash_attention_stand_in
        clip = importlib.import_module("steadydancer_official.clip")
        clip.flash_attention = _flash_attention_stand_in
        yield clip
        for name in [n for n in sys.modules if n.startswith("steadydancer_official")]:
            del sys.modules[name]


def test_layout_equals_the_official_constructor_on_meta(official):
    with torch.device("meta"):
        real = official.XLMRobertaCLIP()                           # clip_xlm_roberta_vit_h_14's defaults
        tiny = official.XLMRobertaCLIP(**{k: v for k, v in TINY_OFFICIAL.items()})
    for model, config in ((real, CLIPConfig()), (tiny, TINY_CLIP)):
        theirs = [(k, tuple(t.shape)) for k, t in model.state_dict().items()]
        assert theirs == list(clip_checkpoint_layout(config).items())


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.dim() > 1 else 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.filterwarnings("ignore")   # torch.cuda.amp.autocast in CLIPModel.visual: deprecated, off on CPU
def test_tiny_tower_equals_official_visual_on_the_same_weights(official, tmp_path):
    model, transforms = official.clip_xlm_roberta_vit_h_14(return_transforms=True, **TINY_OFFICIAL)
    model = model.eval().requires_grad_(False)
    _randomize(model, seed=3)
    path = tmp_path / CLIP_FILE
    torch.save(model.state_dict(), path)                        # the official file layout, full key set
    ours = load_clip(path, device=CPU, dtype=torch.float32, config=TINY_CLIP)

    # the tower on normalised pixels: visual(x, use_31_block=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = model.visual(pixels, use_31_block=True)
        mine = ours(pixels)
    assert mine.shape == theirs.shape == (2, 17, 32)
    assert _rel(mine, theirs) < 1e-5

    # end to end from an image in [-1, 1] at its own size: CLIPModel.visual (resize + normalise + tower)
    wrapper = official.CLIPModel.__new__(official.CLIPModel)
    wrapper.model, wrapper.transforms, wrapper.dtype = model, transforms, torch.float32
    image = torch.rand(3, 45, 61, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        theirs = wrapper.visual([image[:, None].clone()])            # [C, T=1, H, W], as the pipeline passes
    mine = ours.encode(image[None])
    assert _rel(mine, theirs) < 1e-5


def test_official_tiny_overrides_match_tiny_config():
    # TINY_OFFICIAL is TINY_CLIP in the official builder's argument names
    assert dataclasses.replace(TINY_CLIP) == CLIPConfig(
        image_size=TINY_OFFICIAL["image_size"], patch_size=TINY_OFFICIAL["patch_size"],
        dim=TINY_OFFICIAL["vision_dim"], num_heads=TINY_OFFICIAL["vision_heads"],
        num_layers=TINY_OFFICIAL["vision_layers"], embed_dim=TINY_OFFICIAL["embed_dim"],
        vocab_size=TINY_OFFICIAL["vocab_size"], max_text_len=TINY_OFFICIAL["max_text_len"],
        text_dim=TINY_OFFICIAL["text_dim"], text_layers=TINY_OFFICIAL["text_layers"])
