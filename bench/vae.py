"""VAE decode variants side by side at real shapes, random weights (issue 11, item 4).

    python bench/vae.py                              # 480p and 720p, 21 latent frames, all variants
    python bench/vae.py --shapes 480p --variants eager,graphed
    python bench/vae.py --device cpu --no-write      # dry run: tiny VAE, small latents

Per shape, for each variant of engine/vae_speed.py (eager is today's WanVAE.decode_to_uint8):
warm-up seconds (cuDNN autotuning, graph capture, compile), the median of `--repeats` decodes to
uint8 frames on the host, the speed-up over eager, the largest and mean uint8 difference from
eager's frames, peak VRAM (allocated and reserved: a graph's private pool counts as reserved).
Then the preview: decode of 2× downsampled latents (eager and graphed), and the PSNR of its
Lanczos upscale against the full eager decode. A variant that fails is a row with its error.
Compile time shows in the warm-up of a shape's first compiled variant; later ones reuse its code.
Random weights and latents: speed holds, but the PSNR only says the preview path works; judge
its quality on real latents. On an H200 the whole default run should take about 3-4 minutes,
most of it the two inductor compiles (`--variants` without `compiled` to leave them out).
Writes docs/benchmarks/vae.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table, write_results  # noqa: E402
from engine import loading  # noqa: E402
from engine.config import VAEConfig, WanConfig  # noqa: E402
from engine.vae_speed import DecodeSettings, FastDecoder, decode_preview, psnr, upscale_lanczos  # noqa: E402
from engine.wan_pipeline import prepare_vae_for_device  # noqa: E402
from engine.wan_vae import WanVAE  # noqa: E402

# Latent h, w of 1.3B-480p (832×480) and 720p (1280×720); the CPU dry run's tiny VAE gets small ones.
SHAPES = {"480p": (60, 104), "720p": (90, 160)}
TINY_SHAPES = {"480p": (8, 14), "720p": (12, 20)}
VARIANTS = "eager,taps,graphed,taps+graphed,compiled,compiled+graphed"
PREVIEWS = ("eager", "graphed")
COLUMNS = ("shape", "variant", "decode_s", "vs_eager", "warmup_s", "max_diff", "mean_diff", "psnr_db", "size",
           "upscale_s", "peak_gb", "reserved_gb", "graphs", "pixel_std", "error")
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peaks(dev: torch.device) -> dict[str, float]:
    if dev.type != "cuda":
        return {}
    return {"peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9,
            "reserved_gb": torch.cuda.max_memory_reserved(dev) / 1e9}


def measure(decode: Callable[[], torch.Tensor], dev: torch.device, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(warm-up s, median s, last frames) of a decode to host frames."""
    sync(dev)
    t = time.perf_counter()
    frames = decode()
    sync(dev)
    warmup = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        frames = decode()
        sync(dev)
        times.append(time.perf_counter() - t)
    return warmup, statistics.median(times), frames


def differences(frames: torch.Tensor, reference: torch.Tensor, dev: torch.device) -> dict[str, float]:
    """Largest and mean |uint8 difference|, on the device (a 720p video is 224 M values)."""
    diff = (frames.to(dev).to(torch.int16) - reference.to(torch.int16)).abs_()
    return {"max_diff": int(diff.max()), "mean_diff": float(diff.float().mean())}


def bench_shape(vae: WanVAE, shape: str, latents: torch.Tensor, variants: list[str], dev: torch.device,
                repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    reference: torch.Tensor | None = None      # eager's frames, on the device
    eager_s = float("nan")
    for name in variants:
        row: dict[str, object] = {"shape": shape, "variant": name}
        log(f"{shape} {name}: start")
        try:  # one failing variant (a capture error) must not stop the others
            free(dev)
            result, frames = bench_variant(vae, name, latents, dev, repeats)
            row.update(result)
            if name == "eager":
                reference, eager_s = frames.to(dev), cast(float, result["decode_s"])
                row["pixel_std"] = float(reference.float().std())   # the frames are not saturated
            row["vs_eager"] = eager_s / cast(float, result["decode_s"])
            if reference is not None:
                row.update(differences(frames, reference, dev))
        except Exception as e:
            row["error"] = _error(e)
        free(dev)
        log(f"{shape} {name}: {row.get('decode_s', row.get('error'))}")
        rows.append(row)
    if reference is None:
        return [{c: r[c] for c in COLUMNS if c in r} for r in rows]
    for name in (p for p in PREVIEWS if p in variants):
        row = {"shape": shape, "variant": f"preview/{name}"}
        log(f"{shape} preview/{name}: start")
        try:
            free(dev)
            result, small = bench_variant(vae, name, latents, dev, repeats, preview=True)
            _, height, width, _ = reference.shape
            t = time.perf_counter()
            big = upscale_lanczos(small, height, width)
            row.update(result, vs_eager=eager_s / cast(float, result["decode_s"]),
                       psnr_db=psnr(big.to(dev), reference), upscale_s=time.perf_counter() - t,
                       size=f"{small.shape[2]}x{small.shape[1]}")
        except Exception as e:
            row["error"] = _error(e)
        free(dev)
        log(f"{shape} preview/{name}: {row.get('decode_s', row.get('error'))}")
        rows.append(row)
    return [{c: r[c] for c in COLUMNS if c in r} for r in rows]


def bench_variant(vae: WanVAE, name: str, latents: torch.Tensor, dev: torch.device, repeats: int,
                  preview: bool = False) -> tuple[dict[str, object], torch.Tensor]:
    """Warm-up, then the median of `repeats` decodes; the decoder (and its graphs' memory pools)
    goes with this frame. Peak VRAM covers the warm-up (capture, compile) too."""
    decoder = FastDecoder(vae, DecodeSettings.from_name(name))
    decode = (lambda: decode_preview(decoder, latents)) if preview else (lambda: decoder.decode_to_uint8(latents))
    warmup, median, frames = measure(decode, dev, repeats)
    return {"decode_s": median, "warmup_s": warmup, **peaks(dev), "graphs": decoder.num_graphs}, frames


def _error(e: Exception) -> str:
    traceback.print_exc(limit=8, file=sys.stdout)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:160]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="480p,720p")
    ap.add_argument("--variants", default=VARIANTS, help=f"comma-separated DecodeSettings names ({VARIANTS})")
    ap.add_argument("--frames", type=int, default=None, help="latent frames (21 on CUDA = 81 video frames; 5 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: dry run with the tiny VAE and small latents")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()

    dev = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        DecodeSettings.from_name(name)   # a typo fails here, not after minutes of decoding
    if "eager" in variants:
        variants.remove("eager")
    variants.insert(0, "eager")           # the reference for speed-ups and differences
    tiny = dev.type != "cuda"
    cfg: VAEConfig = WanConfig.from_name("tiny-t2v").vae if tiny else VAEConfig()
    dtype = torch.float32 if tiny else torch.bfloat16
    frames = args.frames or (5 if tiny else 21)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    vae = prepare_vae_for_device(cast(WanVAE, loading.build_random(lambda: WanVAE(cfg), seed=1, device=dev,
                                                                  dtype=dtype)))
    if not vae.channels_last:
        vae.use_channels_last()   # CPU dry run: the layout the taps need, as on CUDA
    log(f"VAE dim {cfg.dim} on {dev} ({dtype}), {frames} latent frames, variants {', '.join(variants)}")

    rows: list[dict[str, object]] = []
    for shape in args.shapes.split(","):
        h, w = (TINY_SHAPES if tiny else SHAPES)[shape]
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, cfg.z_dim, frames, h, w, generator=g).to(dev, dtype)
        shape_rows = bench_shape(vae, f"{shape}-{8 * w}x{8 * h}", latents, variants, dev, args.repeats)
        print_table(shape_rows)
        sys.stdout.flush()
        rows.extend(shape_rows)
    log("done")

    payload: dict[str, object] = {
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
        "latent_frames": frames, "repeats": args.repeats, "dtype": str(dtype), "vae_dim": cfg.dim, "rows": rows}
    md = ["| shape | variant | decode s | × eager | warm-up s | max / mean uint8 diff | PSNR dB | peak / reserved GB "
          "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['variant']} | {_f(r.get('decode_s'))} | {_f(r.get('vs_eager'), 2)} | "
                  f"{_f(r.get('warmup_s'), 1)} | {r.get('max_diff', '')} / {_f(r.get('mean_diff'), 4)} | "
                  f"{_f(r.get('psnr_db'), 2)} | {_f(r.get('peak_gb'), 1)} / {_f(r.get('reserved_gb'), 1)} | "
                  f"{r.get('error', '')} |")
    if not args.no_write:
        write_results("vae", payload, md, Path(args.out) if args.out else None)
    print()
    print_table(rows)


def _f(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float | int) and not isinstance(v, bool) else ""


if __name__ == "__main__":
    main()
