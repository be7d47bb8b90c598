"""SteadyDancer DiT weights from disk: the diffusers-format folder and Kijai's single files.

The official SteadyDancer-14B checkpoint is a diffusers `ModelMixin` folder (its code calls
`WanModel.from_pretrained(checkpoint_dir)`):

    diffusion_pytorch_model.safetensors.index.json    {"metadata": ..., "weight_map": {key: shard}}
    diffusion_pytorch_model-00001-of-0000M.safetensors
    ...

whose keys are already the official module names (the 1345 keys of
reference/checkpoint_keys.md §6). `read_sharded_state_dict` checks the index against the shards'
headers before touching a tensor, then opens the shards one after the other through
`safetensors.safe_open`; on the CPU its tensors are views of each file's memory map (a 1 GiB tensor
read this way raised RSS by 2 MB), so the set is never copied as a whole: the loader copies each
tensor once, to its device.

`read_single_file_dancer` reads the ComfyUI single files (Kijai's `Wan21_SteadyDancer_*.safetensors`)
and returns the official keys. What maps:
  * a prefix shared by every key: `model.diffusion_model.`, `diffusion_model.` or `model.`
    (ComfyUI's checkpoint layouts); the names below the prefix are the official ones;
  * fp8 files: a `<module>.scale_weight` (or `.weight_scale`) tensor next to `<module>.weight` is
    folded in as weight.float() * scale (a scalar, or one scale per output row), cast to `dtype`;
    fp8 weights without a scale are cast to `dtype`; the `scaled_fp8` marker tensor is dropped.
What is refused (CheckpointError naming the keys): keys with and without the prefix mixed, a scale
without its weight or of a shape that is not per-tensor or per-row, and other quantisation tensors
(`input_scale`, `scale_input`, `weight_scale_2`, `comfy_quant`: NVFP4/activation-scaled formats whose
weights cannot be rebuilt from the file alone here). Any other key passes through unchanged, for the
DiT's strict loader to judge. Nothing here knows the DiT class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError
from .loading import read_state_dict

__all__ = ["INDEX_NAME", "SINGLE_FILE_PREFIXES", "SINGLE_NAME", "read_sharded_state_dict",
           "read_single_file_dancer"]

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"       # an unsharded diffusers folder
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")   # longest first

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_REFUSED_SUFFIXES = (".input_scale", ".scale_input", ".weight_scale_2", ".comfy_quant")
_MARKERS = ("scaled_fp8",)


# ---------------------------------------------------------------------------------------------
# Diffusers-format folder
# ---------------------------------------------------------------------------------------------


def read_sharded_state_dict(folder_or_index: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The flat {key: tensor} dict of a sharded diffusers checkpoint (folder or its index file).

    A folder with `diffusion_pytorch_model.safetensors` and no index is read as one file.
    """
    path = Path(folder_or_index)
    if path.is_file() and path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if not index.is_file() and (path / SINGLE_NAME).is_file():
            return _read_safetensors(path / SINGLE_NAME)
    else:
        index = path
    if not index.is_file():
        raise CheckpointError(index, f"index not found (a diffusers checkpoint folder holds {INDEX_NAME} "
                                     f"and its shards, or a single {SINGLE_NAME})")
    weight_map = _read_weight_map(index)
    folder = index.parent

    shards = sorted(set(weight_map.values()))
    absent = [name for name in shards if not (folder / name).is_file()]
    if absent:
        raise CheckpointError(index, f"{len(absent)} of the {len(shards)} shard files it names are not in "
                                     f"{folder}", missing=absent)

    # 1. headers only: where each key really is
    found: dict[str, list[str]] = {}
    for name in shards:
        for key in _shard_keys(folder / name):
            found.setdefault(key, []).append(name)
    duplicated = [f"{key} (in {', '.join(names)})" for key, names in found.items() if len(names) > 1]
    if duplicated:
        raise CheckpointError(index, "tensors are stored in more than one shard", unexpected=duplicated)
    unlisted = [f"{key} (in {names[0]})" for key, names in found.items() if key not in weight_map]
    misplaced: list[str] = []
    for key, shard in weight_map.items():
        where = found.get(key)
        if where is None:
            misplaced.append(f"{key} (index: {shard}; in no shard)")
        elif where[0] != shard:
            misplaced.append(f"{key} (index: {shard}; found in {where[0]})")
    if misplaced or unlisted:
        raise CheckpointError(index, "the index and its shards disagree: keys the index maps to a shard "
                                     "that does not hold them, or shard tensors it does not list",
                              missing=misplaced, unexpected=unlisted)

    # 2. tensors, one shard at a time, each a view of that shard's memory map
    state: dict[str, Tensor] = {}
    for name in shards:
        state.update(_read_safetensors(folder / name))
    return state


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(index, f"cannot be read as a JSON index ({type(e).__name__}: {e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(index, 'has no "weight_map" of {tensor name: shard file name}')
    # shard names are file names beside the index, never paths elsewhere
    outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
    if outside:
        raise CheckpointError(index, "names shard files outside its folder", unexpected=outside)
    return weight_map


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # corrupt or foreign file: say which one
        raise CheckpointError(path, f"cannot be read as safetensors ({type(e).__name__}: {e})") from e


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(path, f"cannot be read as safetensors ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# ComfyUI single files
# ---------------------------------------------------------------------------------------------


def read_single_file_dancer(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.bfloat16,
                            state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A ComfyUI-layout SteadyDancer file -> official keys; fp8 weights dequantised to `dtype`.

    Dequantised weights are materialised (14B parameters: 28 GB in bf16); every other tensor stays
    a view of the file.
    """
    if state is None:
        state = read_state_dict(path)
    state = {k: v for k, v in state.items() if k not in _MARKERS}
    state = _strip_prefix(state, path)

    refused = sorted(k for k in state if k.endswith(_REFUSED_SUFFIXES))
    if refused:
        raise CheckpointError(path, "holds quantisation tensors this reader cannot fold into the weights "
                                    "(NVFP4 or activation-scaled fp8); use a bf16/fp16 or scale_weight fp8 "
                                    "file", unexpected=refused)

    out: dict[str, Tensor] = {}
    scales: dict[str, tuple[str, Tensor]] = {}         # weight key -> (scale key, scale)
    for key, tensor in state.items():
        suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            out[key] = tensor
        else:
            scales[key[:-len(suffix)] + ".weight"] = (key, tensor)

    orphans = [f"{scale_key} (no {weight_key})" for weight_key, (scale_key, _) in scales.items()
               if weight_key not in out]
    bad_shapes: list[str] = []
    for weight_key, (scale_key, scale) in scales.items():
        if weight_key not in out:
            continue
        weight = out[weight_key]
        if scale.numel() == 1:
            factor = scale.float().reshape(())
        elif scale.numel() == weight.shape[0]:       # one scale per output row
            factor = scale.float().reshape(-1, *([1] * (weight.dim() - 1)))
        else:
            bad_shapes.append(f"{scale_key} {list(scale.shape)} for {weight_key} {list(weight.shape)}")
            continue
        out[weight_key] = (weight.float() * factor).to(dtype)
    if orphans or bad_shapes:
        raise CheckpointError(path, "fp8 scales that cannot be applied (per-tensor or per-row scales only)",
                              unexpected=orphans, mismatched=bad_shapes)

    for key, tensor in out.items():
        if tensor.dtype in _FP8:                     # fp8 without a scale: the scale is 1
            out[key] = tensor.to(dtype)
    return out


def _strip_prefix(state: Mapping[str, Tensor], path: object) -> dict[str, Tensor]:
    for prefix in SINGLE_FILE_PREFIXES:
        with_prefix = [k for k in state if k.startswith(prefix)]
        if not with_prefix:
            continue
        if len(with_prefix) != len(state):
            without = [k for k in state if not k.startswith(prefix)]
            raise CheckpointError(path, f"mixes keys with and without the `{prefix}` prefix",
                                  unexpected=without)
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)
