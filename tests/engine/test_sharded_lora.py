"""SteadyDancer weight files and LoRA merging: diffusers-style sharded safetensors (index + shards)
and every way they can disagree, Kijai's single files (prefixes, fp8 scale_weight), and a Wan LoRA
(lora_down/up + alpha, .diff, .diff_b, .diff_m, lora_unet_ names) merged against hand-computed sums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError, RequestError
from engine.lora import merge_lora, read_lora
from engine.sharded import INDEX_NAME, read_sharded_state_dict, read_single_file_dancer

# ---------------------------------------------------------------------------------------------
# Sharded diffusers folder
# ---------------------------------------------------------------------------------------------


def _dancer_like_state() -> dict[str, torch.Tensor]:
    """A few official SteadyDancer key names at tiny shapes, mixed dtypes."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "patch_embedding.weight": (8, 36, 1, 2, 2), "patch_embedding.bias": (8,),
        "patch_embedding_fuse.weight": (8, 68, 1, 2, 2),
        "condition_embedding_align.cross_attn.in_proj_weight": (12, 4),
        "condition_embedding_align.norm1.weight": (1, 4, 1, 1),
        "blocks.0.modulation": (1, 6, 8), "blocks.0.self_attn.q.weight": (8, 8),
        "blocks.0.self_attn.q.bias": (8,), "blocks.0.cross_attn.norm_k_img.weight": (8,),
        "blocks.1.ffn.0.weight": (16, 8), "head.head.weight": (4, 8),
    }
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    state["blocks.1.ffn.0.weight"] = state["blocks.1.ffn.0.weight"].bfloat16()
    return state


def _write_shards(folder: Path, state: dict[str, torch.Tensor], n: int = 3) -> dict[str, str]:
    keys = list(state)
    weight_map: dict[str, str] = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    _write_index(folder, weight_map)
    return weight_map


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_three_shards_load_equal_to_the_original_by_folder_and_by_index(tmp_path):
    state = _dancer_like_state()
    _write_shards(tmp_path, state)
    _assert_same(read_sharded_state_dict(tmp_path), state)
    _assert_same(read_sharded_state_dict(tmp_path / INDEX_NAME), state)


def test_unsharded_folder_is_read_as_one_file(tmp_path):
    state = _dancer_like_state()
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    _assert_same(read_sharded_state_dict(tmp_path), state)


def test_missing_index_is_named(tmp_path):
    with pytest.raises(CheckpointError) as info:
        read_sharded_state_dict(tmp_path)
    assert INDEX_NAME in str(info.value) and "index not found" in str(info.value)


def test_every_missing_shard_is_named(tmp_path):
    weight_map = _write_shards(tmp_path, _dancer_like_state())
    names = sorted(set(weight_map.values()))
    (tmp_path / names[0]).unlink()
    (tmp_path / names[2]).unlink()
    with pytest.raises(CheckpointError) as info:
        read_sharded_state_dict(tmp_path)
    assert info.value.missing == [names[0], names[2]]
    assert "2 of the 3 shard files" in str(info.value)


def test_key_mapped_to_a_shard_that_lacks_it_is_named(tmp_path):
    weight_map = _write_shards(tmp_path, _dancer_like_state())
    names = sorted(set(weight_map.values()))
    elsewhere = next(n for n in names if n != weight_map["blocks.0.modulation"])
    wrong = dict(weight_map, **{"blocks.0.modulation": elsewhere})
    wrong["blocks.9.ghost.weight"] = names[1]
    _write_index(tmp_path, wrong)
    with pytest.raises(CheckpointError) as info:
        read_sharded_state_dict(tmp_path)
    missing = info.value.missing
    assert len(missing) == 2
    assert missing[0] == f"blocks.0.modulation (index: {elsewhere}; found in {weight_map['blocks.0.modulation']})"
    assert missing[1] == f"blocks.9.ghost.weight (index: {names[1]}; in no shard)"


def test_tensor_the_index_does_not_list_is_named(tmp_path):
    weight_map = _write_shards(tmp_path, _dancer_like_state())
    del weight_map["head.head.weight"]
    _write_index(tmp_path, weight_map)
    with pytest.raises(CheckpointError) as info:
        read_sharded_state_dict(tmp_path)
    assert info.value.unexpected[0].startswith("head.head.weight (in diffusion_pytorch_model-")


def test_duplicate_keys_across_shards_are_named(tmp_path):
    state = _dancer_like_state()
    weight_map = _write_shards(tmp_path, state)
    names = sorted(set(weight_map.values()))
    other = next(n for n in names if n != weight_map["patch_embedding.bias"])
    from safetensors.torch import load_file
    extra = load_file(tmp_path / other)
    extra["patch_embedding.bias"] = state["patch_embedding.bias"]
    save_file(extra, tmp_path / other)
    with pytest.raises(CheckpointError) as info:
        read_sharded_state_dict(tmp_path)
    assert "more than one shard" in str(info.value)
    both = ", ".join(sorted([weight_map["patch_embedding.bias"], other]))
    assert info.value.unexpected == [f"patch_embedding.bias (in {both})"]


def test_index_without_weight_map_or_with_paths_is_refused(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        read_sharded_state_dict(tmp_path)
    _write_index(tmp_path, {"a": "../elsewhere.safetensors"})
    with pytest.raises(CheckpointError, match="outside its folder"):
        read_sharded_state_dict(tmp_path)


# ---------------------------------------------------------------------------------------------
# Kijai single files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_single_file_prefixes_map_to_the_official_keys(tmp_path, prefix):
    state = _dancer_like_state()
    save_file({prefix + k: v for k, v in state.items()}, tmp_path / "Wan21_SteadyDancer_bf16.safetensors")
    _assert_same(read_single_file_dancer(tmp_path / "Wan21_SteadyDancer_bf16.safetensors"), state)


def test_single_file_mixing_prefixes_is_refused(tmp_path):
    state = {"model.diffusion_model.head.head.weight": torch.zeros(2, 2), "blocks.0.modulation": torch.zeros(1)}
    save_file(state, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_single_file_dancer(tmp_path / "mixed.safetensors")
    assert info.value.unexpected == ["blocks.0.modulation"]


def test_fp8_scaled_single_file_is_dequantised(tmp_path):
    state = _dancer_like_state()
    fp8 = {k: v.float().to(torch.float8_e4m3fn) for k, v in state.items() if k in
           ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight", "head.head.weight")}
    scales = {"blocks.0.self_attn.q.scale_weight": torch.tensor([0.5]),
              "blocks.1.ffn.0.scale_weight": torch.linspace(0.1, 1.0, 16),      # one per output row
              }                                                                 # head.head: fp8, no scale
    file = {"model.diffusion_model." + k: v for k, v in {**state, **fp8, **scales}.items()}
    file["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(file, tmp_path / "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors")
    out = read_single_file_dancer(tmp_path / "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors",
                                  dtype=torch.bfloat16)
    assert set(out) == set(state)
    q = out["blocks.0.self_attn.q.weight"]
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, (fp8["blocks.0.self_attn.q.weight"].float() * 0.5).bfloat16())
    ffn = (fp8["blocks.1.ffn.0.weight"].float() * torch.linspace(0.1, 1.0, 16)[:, None]).bfloat16()
    assert torch.equal(out["blocks.1.ffn.0.weight"], ffn)
    assert torch.equal(out["head.head.weight"], fp8["head.head.weight"].bfloat16())
    assert torch.equal(out["patch_embedding.weight"], state["patch_embedding.weight"])   # untouched


def test_unusable_quantisation_tensors_are_refused(tmp_path):
    base = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}
    for extra, match in ((("blocks.0.self_attn.q.input_scale", torch.ones(1)), "cannot fold"),
                         (("blocks.0.self_attn.k.scale_weight", torch.ones(1)), "no blocks.0.self_attn.k.weight"),
                         (("blocks.0.self_attn.q.scale_weight", torch.ones(3)), "per-row")):
        save_file({**base, extra[0]: extra[1]}, tmp_path / "q.safetensors")
        with pytest.raises(CheckpointError, match=match):
            read_single_file_dancer(tmp_path / "q.safetensors")


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "blocks.0.self_attn.q.weight": torch.randn(8, 6, generator=g),
        "blocks.0.self_attn.q.bias": torch.randn(8, generator=g),
        "blocks.0.cross_attn.norm_k_img.weight": torch.randn(8, generator=g),
        "blocks.0.modulation": torch.randn(1, 6, 8, generator=g),
        "blocks.0.ffn.0.weight": torch.randn(12, 8, generator=g).bfloat16(),
        "patch_embedding.weight": torch.randn(8, 4, 1, 2, 2, generator=g),
    }


def _lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    p = "diffusion_model.blocks.0."
    return {
        p + "self_attn.q.lora_down.weight": torch.randn(2, 6, generator=g),
        p + "self_attn.q.lora_up.weight": torch.randn(8, 2, generator=g),
        p + "self_attn.q.alpha": torch.tensor(4.0),
        p + "self_attn.q.diff_b": torch.randn(8, generator=g),
        p + "cross_attn.norm_k_img.diff": torch.randn(8, generator=g),
        p + "diff_m": torch.randn(1, 6, 8, generator=g),
    }


def test_merge_adds_up_down_times_alpha_over_rank_diffs_and_bias_diffs(tmp_path):
    base, lora = _base(), _lora()
    save_file(lora, tmp_path / "lightx2v_tiny.safetensors")
    lora = read_lora(tmp_path / "lightx2v_tiny.safetensors")
    merged, report = merge_lora(base, lora, strength=0.7)
    p = "diffusion_model.blocks.0."
    up, down = lora[p + "self_attn.q.lora_up.weight"], lora[p + "self_attn.q.lora_down.weight"]
    expected_q = base["blocks.0.self_attn.q.weight"] + 0.7 * (4.0 / 2) * (up @ down)
    assert torch.allclose(merged["blocks.0.self_attn.q.weight"], expected_q, atol=1e-6)
    assert torch.allclose(merged["blocks.0.self_attn.q.bias"],
                          base["blocks.0.self_attn.q.bias"] + 0.7 * lora[p + "self_attn.q.diff_b"], atol=1e-6)
    assert torch.allclose(merged["blocks.0.cross_attn.norm_k_img.weight"],
                          base["blocks.0.cross_attn.norm_k_img.weight"] + 0.7 * lora[p + "cross_attn.norm_k_img.diff"],
                          atol=1e-6)
    assert torch.allclose(merged["blocks.0.modulation"], base["blocks.0.modulation"] + 0.7 * lora[p + "diff_m"],
                          atol=1e-6)
    assert (report.pairs, report.diffs, report.biases) == (1, 2, 1)
    assert set(report.changed) == {"blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.bias",
                                   "blocks.0.cross_attn.norm_k_img.weight", "blocks.0.modulation"}
    assert merged["blocks.0.ffn.0.weight"] is base["blocks.0.ffn.0.weight"]     # untouched: same tensor
    assert torch.equal(base["blocks.0.self_attn.q.weight"], _base()["blocks.0.self_attn.q.weight"])  # input kept


def test_merge_computes_in_float32_and_casts_back_to_the_base_dtype():
    base = _base()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(12, 4, generator=g).bfloat16()
    lora = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": down, "diffusion_model.blocks.0.ffn.0.lora_B.weight": up}
    merged, report = merge_lora(base, lora)
    expected = (base["blocks.0.ffn.0.weight"].float() + up.float() @ down.float()).bfloat16()   # no alpha: scale 1
    assert merged["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["blocks.0.ffn.0.weight"], expected)
    assert report.pairs == 1


def test_conv_lora_is_flattened_like_comfyui():
    base = _base()
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(3, 4, 1, 2, 2, generator=g), torch.randn(8, 3, 1, 1, 1, generator=g)
    merged, _ = merge_lora(base, {"patch_embedding.lora_down.weight": down, "patch_embedding.lora_up.weight": up})
    expected = base["patch_embedding.weight"] + (up.flatten(1) @ down.flatten(1)).reshape(8, 4, 1, 2, 2)
    assert torch.allclose(merged["patch_embedding.weight"], expected, atol=1e-6)


def test_strength_zero_leaves_the_base_unchanged():
    base = _base()
    merged, report = merge_lora(base, _lora(), strength=0.0)
    for k in base:
        assert torch.equal(merged[k], base[k])
    assert report.pairs == 1 and report.changed == ()


def test_underscore_lora_unet_names_map_to_the_base_modules():
    base, lora = _base(), _lora()
    renamed = {k.replace("diffusion_model.blocks.0.self_attn.q.", "lora_unet_blocks_0_self_attn_q."): v
               for k, v in lora.items() if ".self_attn.q." in k}
    merged, report = merge_lora(base, renamed)
    expected, _ = merge_lora(base, {k: v for k, v in lora.items() if ".self_attn.q." in k})
    assert torch.equal(merged["blocks.0.self_attn.q.weight"], expected["blocks.0.self_attn.q.weight"])
    assert (report.pairs, report.biases) == (1, 1)


def test_unknown_lora_key_is_refused_naming_it_unless_ignored():
    lora = dict(_lora(), **{"diffusion_model.blocks.7.self_attn.q.diff_b": torch.zeros(8),
                            "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(8)})
    with pytest.raises(CheckpointError) as info:
        merge_lora(_base(), lora, path="my_lora.safetensors")
    assert set(info.value.unexpected) == {"diffusion_model.blocks.7.self_attn.q.diff_b",
                                          "diffusion_model.blocks.0.self_attn.q.dora_scale"}
    assert str(info.value).startswith("my_lora.safetensors: ")
    _, report = merge_lora(_base(), lora, ignore=["*.blocks.7.*", "*.dora_scale"])
    assert set(report.ignored) == {"diffusion_model.blocks.7.self_attn.q.diff_b",
                                   "diffusion_model.blocks.0.self_attn.q.dora_scale"}


def test_incomplete_pairs_and_wrong_shapes_are_refused():
    lora = _lora()
    del lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    lora["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.zeros(9)
    with pytest.raises(CheckpointError) as info:
        merge_lora(_base(), lora)
    assert info.value.unexpected == ["diffusion_model.blocks.0.self_attn.q.lora_down.weight (no lora_up / lora_B)"]
    assert info.value.mismatched == ["diffusion_model.blocks.0.cross_attn.norm_k_img.diff [9] vs "
                                     "blocks.0.cross_attn.norm_k_img.weight [8]"]
    lora = _lora()
    del lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    with pytest.raises(CheckpointError) as info:
        merge_lora(_base(), lora)
    assert set(info.value.unexpected) == {"diffusion_model.blocks.0.self_attn.q.lora_up.weight (no lora_down / lora_A)",
                                          "diffusion_model.blocks.0.self_attn.q.alpha (alpha without a pair)"}


def test_pair_on_a_missing_module_names_all_its_keys_and_bad_ranks_are_refused():
    lora = {"diffusion_model.blocks.3.ffn.0.lora_down.weight": torch.zeros(2, 8),
            "diffusion_model.blocks.3.ffn.0.lora_up.weight": torch.zeros(12, 2)}
    with pytest.raises(CheckpointError) as info:
        merge_lora(_base(), lora)
    assert set(info.value.unexpected) == set(lora)
    lora = {"blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 8), "blocks.0.ffn.0.lora_up.weight": torch.zeros(12, 3)}
    with pytest.raises(CheckpointError, match="ranks of down"):
        merge_lora(_base(), lora)


def test_duplicate_entries_and_quantised_bases_are_refused():
    lora = {"blocks.0.self_attn.q.diff_b": torch.zeros(8),
            "diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(8)}
    with pytest.raises(CheckpointError, match="appear twice"):
        merge_lora(_base(), lora)
    base = dict(_base(), **{"blocks.0.self_attn.q.bias": torch.zeros(8, dtype=torch.int8)})
    with pytest.raises(CheckpointError, match="torch.int8"):
        merge_lora(base, {"blocks.0.self_attn.q.diff_b": torch.zeros(8)})
    with pytest.raises(RequestError):
        merge_lora(_base(), _lora(), strength=float("nan"))
