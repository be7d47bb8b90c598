"""Where a DiT forward and a VAE decode spend their GPU time (torch.profiler, top kernels).

    python bench/profile_engine.py [--model wan2.1-t2v-1.3b] [--resolution 480p] [--frames 81]

Random weights at real shapes. Prints one table per stage: kernel, calls, total ms, share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import loading  # noqa: E402
from engine.attention import AttentionSpec, resolve_attention  # noqa: E402
from engine.config import WanConfig, latent_shape  # noqa: E402
from engine.wan_dit import WanDiT  # noqa: E402
from engine.wan_pipeline import prepare_vae_for_device  # noqa: E402
from engine.wan_vae import WanVAE  # noqa: E402

DEV, DT = torch.device("cuda"), torch.bfloat16


def top_kernels(prof, limit: int) -> None:
    rows = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
            if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(r[2] for r in rows) or 1.0
    print(f"{'kernel':<90} {'calls':>6} {'ms':>9} {'share':>6}")
    for key, count, ms in sorted(rows, key=lambda r: -r[2])[:limit]:
        print(f"{key[:90]:<90} {count:>6} {ms:>9.2f} {100 * ms / total:>5.1f}%")
    print(f"{'total':<90} {'':>6} {total:>9.2f}")


def profile_dit(cfg: WanConfig, args: argparse.Namespace, w: int, h: int, shape: tuple[int, ...]) -> None:
    spec = AttentionSpec(type=resolve_attention("sla", DEV), topk=0.1)
    dit = loading.build_random(lambda: WanDiT(cfg, spec), seed=0, device=DEV, dtype=DT)
    if not args.no_compile:
        dit.compile_blocks()
    x = torch.randn(1, *shape, device=DEV, dtype=DT)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEV, dtype=DT)
    ts = torch.tensor([987.7], device=DEV)
    with torch.inference_mode():
        for _ in range(2):
            dit(x, ts, ctx)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dit(x, ts, ctx)
            torch.cuda.synchronize()
    print(f"\n## DiT forward {args.model} {w}x{h}x{args.frames}")
    top_kernels(prof, args.top)


def profile_vae(cfg: WanConfig, args: argparse.Namespace, w: int, h: int, shape: tuple[int, ...]) -> None:
    vae = loading.build_random(lambda: WanVAE(cfg.vae), seed=1, device=DEV, dtype=DT)
    if not args.vae_default_layout:
        vae = prepare_vae_for_device(vae)
    z = torch.randn(1, *shape, device=DEV, dtype=DT)
    with torch.inference_mode():
        vae.decode_to_uint8(z)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vae.decode_to_uint8(z)
            torch.cuda.synchronize()
    layout = "default layout" if args.vae_default_layout else "channels-last + cudnn.benchmark"
    print(f"\n## VAE decode {w}x{h}x{args.frames} ({layout})")
    top_kernels(prof, args.top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--vae-default-layout", action="store_true")
    ap.add_argument("--vae-only", action="store_true")
    args = ap.parse_args()
    cfg = WanConfig.from_name(args.model)
    w, h = cfg.size(args.resolution, "16:9")
    shape = latent_shape(cfg, args.frames, w, h)
    if not args.vae_only:
        profile_dit(cfg, args, w, h, shape)
        torch.cuda.empty_cache()
    profile_vae(cfg, args, w, h, shape)


if __name__ == "__main__":
    main()
