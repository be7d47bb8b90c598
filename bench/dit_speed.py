"""DiT speed variants side by side, one process, random weights at real shapes (issue 11's choices).

    python bench/dit_speed.py                          # 1.3b-480p and 14b-720p, 81 frames, 4 steps
    python bench/dit_speed.py --device cpu --shapes tiny-480p --no-write     # dry run

Per shape, on the same weights and inputs (SLA top-k 0.1, regional torch.compile):
  bf16            the current default
  bf16+graph      the whole forward replayed as one CUDA graph (engine/graphs.py)
  fp8             block linears in e4m3 (engine/fp8.py: q/k/v fused, activations quantized per
                  token inside the compiled block, so inductor can fuse it into the norm/GELU)
  fp8+graph
For each: one forward, the 4-step denoise, the warm-up (compile or capture) kept apart, and the
FP8 output's relative error against bf16. Once, on the first shape: where a compiled bf16
forward's GPU time goes (GEMMs, attention, inductor's fused elementwise kernels, the rest), from
torch.profiler, to show what is left for hand-written fused kernels.
Writes docs/benchmarks/dit_speed.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table, write_results  # noqa: E402
from engine import loading  # noqa: E402
from engine.attention import AttentionSpec, resolve_attention  # noqa: E402
from engine.config import WanConfig, latent_shape  # noqa: E402
from engine.fp8 import quantize_model  # noqa: E402
from engine.graphs import GraphedForward  # noqa: E402
from engine.sampler import rcm_sample  # noqa: E402
from engine.wan_dit import WanDiT  # noqa: E402

SHAPES = {"1.3b-480p": ("wan2.1-t2v-1.3b", "480p"), "14b-720p": ("wan2.1-t2v-14b", "720p"),
          "tiny-480p": ("tiny-t2v", "480p")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(fn: Callable[[], object], repeats: int, dev: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_breakdown(forward: Callable[[], object], dev: torch.device) -> dict[str, float]:
    """GPU milliseconds of one forward by kind of kernel (names as CUDA/Triton report them)."""
    from torch.profiler import ProfilerActivity, profile
    forward()
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        sync(dev)
    groups = {"gemm": 0.0, "attention": 0.0, "fused_elementwise": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        ms = ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
        if ms <= 0:
            continue
        name = ev.key.lower()
        if any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "sm90", "scaled_mm", "matmul")):
            groups["gemm"] += ms
        elif any(k in name for k in ("attn", "sla", "flash", "fmha", "_fwd_kernel", "sparse")):
            groups["attention"] += ms
        elif name.startswith("triton_"):
            groups["fused_elementwise"] += ms
        else:
            groups["other"] += ms
        top[ev.key[:80]] = ms
    out = {k: round(v, 2) for k, v in groups.items()}
    out["top_kernels_ms"] = dict(sorted(((k, round(v, 2)) for k, v in top.items()),  # type: ignore[assignment]
                                        key=lambda kv: -kv[1])[:12])
    return out


def bench_shape(name: str, args: argparse.Namespace, dev: torch.device, dt: torch.dtype,
                profile_it: bool) -> dict[str, object]:
    model, res = SHAPES[name]
    cfg = WanConfig.from_name(model)
    w, h = cfg.size(res, "16:9")
    spec = AttentionSpec(type=resolve_attention("sla", dev), topk=args.topk)
    log(f"{name}: building {cfg.name} with random weights")
    dit = loading.build_random(lambda: WanDiT(cfg, spec), seed=0, device=dev, dtype=dt)
    if dev.type == "cuda":
        dit.compile_blocks()
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dt)
    shape = (1, *latent_shape(cfg, args.frames, w, h))
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(shape, device=dev, generator=g, dtype=dt)
    t = torch.full((1,), 934.0, device=dev)
    repeats = args.repeats if cfg.param_billions < 5 else 1
    row: dict[str, object] = {"shape": f"{name}-{args.frames}f", "tokens": shape[2] * (shape[3] // 2) * (shape[4] // 2)}
    reference: torch.Tensor | None = None

    def measure(variant: str, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        nonlocal reference
        try:
            with torch.inference_mode():
                sync(dev)
                t0 = time.perf_counter()
                out = forward(x, t, context).float()          # compile / capture happens here
                sync(dev)
                row[f"{variant}_warmup_s"] = round(time.perf_counter() - t0, 2)
                if reference is None:
                    reference = out
                else:
                    row[f"{variant}_rel_err"] = round(float((out - reference).norm() / reference.norm()), 5)
                row[f"{variant}_forward_s"] = round(median_time(lambda: forward(x, t, context), repeats, dev), 4)

                def denoise() -> torch.Tensor:
                    return rcm_sample(lambda xx, tt: forward(xx.to(dt), tt, context), shape, sigma_max=80.0,
                                      num_steps=args.steps, generator=torch.Generator().manual_seed(0), device=dev)
                denoise()
                row[f"{variant}_denoise_s"] = round(median_time(denoise, repeats, dev), 4)
            log(f"{name} {variant}: forward {row[f'{variant}_forward_s']} s, denoise {row[f'{variant}_denoise_s']} s "
                f"(warm-up {row[f'{variant}_warmup_s']} s)")
        except Exception as e:          # one variant failing (a capture error, say) must not stop the rest
            row[f"{variant}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"{name} {variant}: FAILED {row[f'{variant}_error']}")
        gc.collect()

    measure("bf16", dit)
    if profile_it and dev.type == "cuda":
        with torch.inference_mode():
            row["bf16_kernels_ms"] = kernel_breakdown(lambda: dit(x, t, context), dev)
        log(f"{name}: bf16 kernel time {row['bf16_kernels_ms']}")
    graphed = GraphedForward(dit)
    measure("bf16+graph", graphed)
    graphed.clear()
    del graphed
    row["fp8_path"] = quantize_model(dit, dev)
    measure("fp8", dit)
    graphed = GraphedForward(dit)
    measure("fp8+graph", graphed)
    graphed.clear()
    if dev.type == "cuda":
        row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
    return row                    # the model and the graphs' pools go with this frame (freed by the caller)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1.3b-480p,14b-720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/dit_speed.py needs a CUDA device (or --device cpu --shapes tiny-480p for a dry run)")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for i, name in enumerate(args.shapes.split(",")):
        rows.append(bench_shape(name, args, dev, dt, profile_it=i == 0))
        free(dev)
    variants = ("bf16", "bf16+graph", "fp8", "fp8+graph")
    table = [{"shape": r["shape"], **{f"{v} denoise": r.get(f"{v}_denoise_s", r.get(f"{v}_error", "-"))
                                      for v in variants},
              "fp8 rel err": r.get("fp8_rel_err", "-")} for r in rows]
    print_table(table)
    md = ["| shape | " + " | ".join(f"{v} forward / denoise s (warm-up)" for v in variants) + " | FP8 rel err |",
          "|---|" + "---|" * (len(variants) + 1)]
    for r in rows:
        cells = [f"{r[f'{v}_forward_s']} / {r[f'{v}_denoise_s']} ({r[f'{v}_warmup_s']})" if f"{v}_denoise_s" in r
                 else f"failed: {r.get(f'{v}_error', '?')}" for v in variants]
        md.append(f"| {r['shape']} | " + " | ".join(cells) + f" | {r.get('fp8_rel_err', '-')} |")
    md.append(f"\n{args.steps} rCM steps, SLA top-k {args.topk}, regional compile, random weights. Kernel time of one "
              f"compiled bf16 forward ({rows[0]['shape']}): {rows[0].get('bf16_kernels_ms', 'not profiled')}.")
    if not args.no_write:
        write_results("dit_speed", {"steps": args.steps, "sla_topk": args.topk, "torch": torch.__version__,
                                    "shapes": {str(r["shape"]): r for r in rows}}, md,
                      Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
