"""The official TurboDiffusion network and sampling loop, as the peer of bench/i2v.py (GPU only).

TurboDiffusion's `inference/modify_model.py` imports flash-attn's rotary kernel and its compiled
CUDA ops at module level. The peer needs neither (SLA is Triton; int8 is off), so both are
replaced by small stand-ins before the import: a torch rotary embedding with flash-attn's
interleaved convention, and an empty ops module. Everything timed is the official code.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types

import torch

__all__ = ["official_a14b_expert", "official_network", "official_rcm_i2v", "parity_a14b"]


def _import_modify_model(td_repo: str) -> types.ModuleType:
    root = os.path.join(os.path.abspath(td_repo), "turbodiffusion")
    sys.path[:0] = [os.path.dirname(root), root, os.path.join(root, "inference")]
    for name in ("flash_attn", "flash_attn.layers", "flash_attn.layers.rotary"):
        sys.modules.setdefault(name, types.ModuleType(name))

    def apply_rotary_emb(x, cos, sin, interleaved=True, inplace=False):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x1 * s + x2 * c
        return out

    sys.modules["flash_attn.layers.rotary"].apply_rotary_emb = apply_rotary_emb  # type: ignore[attr-defined]
    ops = types.ModuleType("turbo_diffusion_ops")
    ops.quant_cuda = ops.gemm_cuda = None  # type: ignore[attr-defined]
    sys.modules.setdefault("turbo_diffusion_ops", ops)
    import modify_model
    return modify_model


def official_a14b_expert(td_repo: str, topk: float, seed: int) -> torch.nn.Module:
    """One Wan2.2-A14B expert as the official loader builds it (SLA, no int8), random weights."""
    return official_network(td_repo, "Wan2.2-A14B", topk, seed)


def official_network(td_repo: str, name: str, topk: float, seed: int, *, fused_norms: bool = False) -> torch.nn.Module:
    """A TurboDiffusion network ("Wan2.1-1.3B", "Wan2.1-14B", "Wan2.2-A14B") as its inference
    script builds it (SLA, no int8), random weights. `fused_norms`: its Triton norms (1.3B only;
    shared/tools/parity_td.py found them failing at dim 5120)."""
    mm = _import_modify_model(td_repo)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            net = mm.select_model(name)
    finally:
        torch.set_default_dtype(torch.float32)
    net = mm.replace_attention(net, "sla", topk)
    mm.replace_linear_norm(net, replace_linear=False, replace_norm=fused_norms, quantize=False)
    net = net.to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in net.state_dict().items():
            if not p.is_floating_point():
                continue
            if p.dim() <= 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.02 * torch.randn(p.shape, generator=g, device="cuda"))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") / math.sqrt(p[0].numel()))
    return net


def official_rcm_i2v(high: torch.nn.Module, low: torch.nn.Module, y: torch.Tensor, context: torch.Tensor,
                     latent: tuple[int, int, int, int], *, steps: int, seed: int, sigma_max: float = 200.0,
                     boundary: float = 0.9) -> dict[str, float]:
    """The loop of `wan2.2_i2v_infer.py` (SDE): high expert `.cuda()`, the switch as `.cpu()`,
    `empty_cache()`, `.cuda()`, and the low expert back to the host at the end. Timed per part."""
    sync = torch.cuda.synchronize
    g = torch.Generator(device="cuda").manual_seed(seed)
    t_steps = torch.tensor([math.atan(sigma_max), *[1.5, 1.4, 1.0][:steps - 1], 0], dtype=torch.float64,
                           device="cuda")
    t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    x = torch.randn(1, *latent, dtype=torch.float32, device="cuda", generator=g).to(torch.float64) * t_steps[0]
    ones = torch.ones(1, 1, device="cuda", dtype=x.dtype)
    sync()
    t0 = time.perf_counter()
    high.cuda()
    sync()
    expert_in = time.perf_counter() - t0
    net, switched, switch, denoise = high, False, 0.0, 0.0
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        if t_cur.item() < boundary and not switched:
            t0 = time.perf_counter()
            high.cpu()
            torch.cuda.empty_cache()
            low.cuda()
            sync()
            switch = time.perf_counter() - t0
            net, switched = low, True
        t0 = time.perf_counter()
        with torch.no_grad():
            v = net(x_B_C_T_H_W=x.to(torch.bfloat16), timesteps_B_T=(t_cur.float() * ones * 1000).to(torch.bfloat16),
                    crossattn_emb=context, y_B_C_T_H_W=y).to(torch.float64)
        x = (1 - t_next) * (x - t_cur * v) + t_next * torch.randn(*x.shape, dtype=torch.float32, device="cuda",
                                                                  generator=g)
        sync()
        denoise += time.perf_counter() - t0
    t0 = time.perf_counter()
    net.cpu()
    torch.cuda.empty_cache()
    sync()
    expert_in += time.perf_counter() - t0
    return {"denoise_s": denoise, "switch_s": switch, "expert_in_s": expert_in,
            "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9}


def parity_a14b(td_repo: str, frames: int = 81, size: tuple[int, int] = (720, 1280)) -> dict[str, object]:
    """Our WanDiT (in_dim 36, x then y on the channels) against the official wan2pt2 expert on
    the same weights and inputs: relative error of one forward (bf16 noise is about 1e-2)."""
    from engine.attention import AttentionSpec
    from engine.config import AttentionType, WanConfig
    from engine.wan_dit import WanDiT
    net = official_a14b_expert(td_repo, 0.1, seed=3)
    official = net.state_dict()
    with torch.device("meta"):
        ours = WanDiT(WanConfig.from_name("wan2.2-i2v-a14b"), AttentionSpec(AttentionType.SLA, 0.1))
    ours.load_state_dict({k: official[k] for k in ours.state_dict()}, strict=True, assign=True)
    ours = ours.eval().requires_grad_(False)
    h, w = size
    g = torch.Generator(device="cuda").manual_seed(4)
    lat = (1 + (frames - 1) // 4, h // 8, w // 8)
    x = torch.randn(1, 16, *lat, device="cuda", generator=g).to(torch.bfloat16)
    y = torch.randn(1, 20, *lat, device="cuda", generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.tensor([[934.0]], device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        theirs = net(x_B_C_T_H_W=x, timesteps_B_T=t, crossattn_emb=ctx, y_B_C_T_H_W=y).float()
        mine = ours(torch.cat([x, y], dim=1), t[:, 0].float(), ctx).float()
    rel = float((mine - theirs).norm() / theirs.norm())
    keys_match = set(ours.state_dict()) == set(official)
    del net, ours, official
    torch.cuda.empty_cache()
    return {"rel_err": round(rel, 5), "keys_match": keys_match}
