"""Merging a Wan LoRA into a DiT state dict, strictly (lightx2v's step/CFG-distill LoRA foremost).

SteadyDancer's ComfyUI workflows run `lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors`
at strength 1 (4 steps, cfg 1). Its keys are the original Wan module names under `diffusion_model.`:

    diffusion_model.<module>.lora_down.weight  [r, in]    low-rank pair: W += up @ down · scale
    diffusion_model.<module>.lora_up.weight    [out, r]     (`lora_A` / `lora_B` = down / up)
    diffusion_model.<module>.alpha             []         optional: scale = alpha / r, else 1
    diffusion_model.<module>.diff              = W        full diff of <module>.weight (norms,
                                                           e.g. cross_attn.norm_k_img.diff)
    diffusion_model.<module>.diff_b            = bias     diff of <module>.bias
    diffusion_model.blocks.N.diff_m            = modulation  diff of blocks.N.modulation

This is how LightX2V's own merger (tools/extract/lora_merger.py) and Kijai's wrapper read them (the
wrapper scales by alpha / rank when `alpha` is present, by 1 otherwise; LightX2V never reads
alpha). `lora_unet_` keys (musubi-tuner / "Fun" trainers, underscores for dots:
`lora_unet_blocks_0_self_attn_q.lora_down.weight`) do not occur in lightx2v files but are accepted:
their module is found among the base model's own names. Conv LoRAs (patch embeddings) are flattened
to [out, in·k] as in ComfyUI.

Every delta is computed in float32 on the base tensor's device, scaled by `strength`, added and cast
back to the base tensor's dtype. Strict: a LoRA key that names no base tensor, a lone half of a
pair, an alpha without a pair or a shape that does not fit is a CheckpointError naming the keys,
unless the key matches an `ignore` pattern (fnmatch, against the key as in the file). The default
ignore list is empty: every key seen in lightx2v's Wan2.1-I2V LoRAs maps onto the official
Wan2.1-I2V / SteadyDancer names (SteadyDancer keeps every Wan2.1-I2V key, reference/checkpoint_keys.md §6).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CheckpointError, RequestError
from .loading import read_state_dict

__all__ = ["DEFAULT_LORA_IGNORE", "LORA_PREFIXES", "LoraReport", "merge_lora", "read_lora"]

LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.")   # longest first
DEFAULT_LORA_IGNORE: tuple[str, ...] = ()
_UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_")

# suffix -> role; `down`/`up`/`alpha` make a pair, the rest are full diffs
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_A.weight": "down",
    ".lora_up.weight": "up", ".lora_B.weight": "up",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b", ".diff_m": "diff_m",
}
_NOT_MERGEABLE = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                  torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class LoraReport:
    """What one merge changed. `diffs` counts `.diff` and `.diff_m` (whole-tensor diffs)."""
    pairs: int = 0
    diffs: int = 0
    biases: int = 0
    strength: float = 1.0
    changed: tuple[str, ...] = ()                 # base keys whose tensor was replaced
    ignored: tuple[str, ...] = ()                 # LoRA keys skipped through `ignore`

    @property
    def merged(self) -> int:
        return self.pairs + self.diffs + self.biases


def read_lora(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A LoRA file's flat {key: tensor} dict (`.safetensors`, or a `.pth` state dict), memory-mapped."""
    return read_state_dict(path)


def merge_lora(state: Mapping[str, Tensor], lora: Mapping[str, Tensor], *, strength: float = 1.0,
               path: object = "LoRA", ignore: Iterable[str] = DEFAULT_LORA_IGNORE,
               ) -> tuple[dict[str, Tensor], LoraReport]:
    """base + strength · delta for every LoRA entry -> (new state dict, report).

    The input dicts are not modified; untouched tensors are the same objects in the result.
    `path` names the LoRA in errors. With strength 0 the keys are still checked, nothing is added.
    """
    if not math.isfinite(strength):
        raise RequestError("lora strength", strength, "a finite number")
    patterns = tuple(ignore)
    modules = _underscore_index(state)

    groups: dict[tuple[str, str], tuple[str, Tensor]] = {}   # (module, role) -> (LoRA key, tensor)
    unknown: list[str] = []
    duplicated: list[str] = []
    ignored: list[str] = []
    for key, tensor in lora.items():
        if any(fnmatch.fnmatchcase(key, p) for p in patterns):
            ignored.append(key)
            continue
        parsed = _parse_key(key, modules)
        if parsed is None:
            unknown.append(key)
            continue
        if parsed in groups:
            duplicated.append(f"{key} (same as {groups[parsed][0]})")
            continue
        groups[parsed] = (key, tensor)

    # 1. check every entry against the base, computing nothing yet
    plans: dict[str, list[_Part]] = {}                   # base key -> what to add to it
    mismatched: list[str] = []
    counts = {"pair": 0, "diff": 0, "bias": 0}
    for (module, role), (key, tensor) in groups.items():
        if role in ("up", "alpha"):
            if (module, "down") not in groups:
                unknown.append(f"{key} (" + ("no lora_down / lora_A)" if role == "up" else "alpha without a pair)"))
            continue
        if role == "down":
            up = groups.get((module, "up"))
            if up is None:
                unknown.append(f"{key} (no lora_up / lora_B)")
                continue
            alpha = groups.get((module, "alpha"))
            target = _first_present(state, module + ".weight")
            if target is None:
                unknown.extend([key, up[0]] + ([alpha[0]] if alpha else []))
                continue
            part = _Part(key, tensor, up[1], alpha[1] if alpha else None)
            problem = part.check(state[target])
            if problem:
                mismatched.append(f"{key}: {problem}")
                continue
            plans.setdefault(target, []).append(part)
            counts["pair"] += 1
            continue
        candidates = {"diff": (module + ".weight", module), "diff_b": (module + ".bias",),
                      "diff_m": (module + ".modulation",)}[role]
        target = _first_present(state, *candidates)
        if target is None:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(state[target].shape):
            mismatched.append(f"{key} {list(tensor.shape)} vs {target} {list(state[target].shape)}")
            continue
        plans.setdefault(target, []).append(_Part(key, tensor))
        counts["bias" if role == "diff_b" else "diff"] += 1

    not_mergeable = [f"{k} is {state[k].dtype}" for k in plans
                     if state[k].dtype in _NOT_MERGEABLE or not state[k].is_floating_point()]
    if unknown or duplicated or mismatched or not_mergeable:
        raise CheckpointError(path, "LoRA does not fit the base model (keys that name no base tensor or "
                                    "appear twice, shapes that do not fit, quantised base tensors)",
                              unexpected=unknown + duplicated, mismatched=mismatched + not_mergeable)

    # 2. one base tensor at a time, so only one float32 delta is alive
    merged = dict(state)
    if strength != 0.0:
        for target, parts in plans.items():
            base = state[target]
            total = base.float()
            for part in parts:
                total = total + strength * part.delta(base)
            merged[target] = total.to(base.dtype)
    report = LoraReport(pairs=counts["pair"], diffs=counts["diff"], biases=counts["bias"], strength=strength,
                        changed=tuple(plans) if strength != 0.0 else (), ignored=tuple(ignored))
    return merged, report


@dataclass(frozen=True)
class _Part:
    """One LoRA entry for one base tensor: a full diff (`tensor`) or a pair (`tensor` = down)."""
    key: str
    tensor: Tensor
    up: Tensor | None = None
    alpha: Tensor | None = None

    def check(self, base: Tensor) -> str:
        """For a pair: "" when up @ down fits `base`, else what does not."""
        down, up = self.tensor, self.up
        assert up is not None
        if down.dim() < 2 or up.dim() < 2:
            return f"down {list(down.shape)} / up {list(up.shape)} are not matrices"
        up2, down2 = up.flatten(1), down.flatten(1)     # conv LoRAs: [out, r, 1, ...] and [r, in, k...]
        if up2.shape[1] != down.shape[0]:
            return f"ranks of down {list(down.shape)} and up {list(up.shape)} differ"
        if up2.shape[0] != base.shape[0] or up2.shape[0] * down2.shape[1] != base.numel():
            return f"up @ down [{up2.shape[0]}, {down2.shape[1]}] does not fit the weight {list(base.shape)}"
        if self.alpha is not None and self.alpha.numel() != 1:
            return f"alpha has shape {list(self.alpha.shape)}, not a scalar"
        return ""

    def delta(self, base: Tensor) -> Tensor:
        """The float32 delta before strength, on `base`'s device and in its shape."""
        if self.up is None:
            return self.tensor.to(device=base.device, dtype=torch.float32)
        rank = self.tensor.shape[0]
        scale = 1.0 if self.alpha is None else float(self.alpha.float().reshape(())) / rank
        up = self.up.flatten(1).to(base.device, torch.float32)
        down = self.tensor.flatten(1).to(base.device, torch.float32)
        return (up @ down).mul_(scale).reshape(base.shape)


def _parse_key(key: str, modules: Mapping[str, str | None]) -> tuple[str, str] | None:
    """LoRA key -> (dotted base module path, role), or None when it has no known form."""
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    module = key[:-len(suffix)]
    for prefix in _UNDERSCORE_PREFIXES:
        if module.startswith(prefix):
            dotted = modules.get(module[len(prefix):])
            return (dotted, _SUFFIXES[suffix]) if dotted else None
    for prefix in LORA_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module, _SUFFIXES[suffix]


def _underscore_index(state: Mapping[str, Tensor]) -> dict[str, str | None]:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` for every module path of the base model.

    Two paths that collapse to the same underscore form map to None (ambiguous, refused).
    """
    index: dict[str, str | None] = {}
    for key in state:
        parts = key.split(".")
        for end in range(1, len(parts) + 1):
            dotted = ".".join(parts[:end])
            flat = dotted.replace(".", "_")
            if index.get(flat, dotted) != dotted:
                index[flat] = None
            elif flat not in index:
                index[flat] = dotted
    return index


def _first_present(state: Mapping[str, Tensor], *keys: str) -> str | None:
    return next((k for k in keys if k in state), None)
