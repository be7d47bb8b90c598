"""Image-to-video benchmark: Wan2.2 A14B (two 14B experts) at 720p, random weights at real shapes.

    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/i2v.py                      # resident and swap
    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/i2v.py --td-repo .devcarry/td   # + the official loop
    python bench/i2v.py --device cpu --model tiny-i2v --no-write            # dry run of the script

Per memory policy, a fresh Engine runs the whole row the way a shard does (`Engine.generate`:
umT5 encoding of a new prompt, image → VAE encode, 4 rCM steps with the expert switch, VAE
decode to uint8), once to warm up (first loads, compile, autotune; twice for swap, whose second
row makes the low expert's host copy), then `--rows` measured rows.
Reported per policy: denoise_s, switch_s (the high→low switch inside a row), expert_in_s (bringing
the high-noise expert back at a row's start: swap only), peak_vram_gb, row_s (the wall time of the
row). Beside them, with --td-repo, the peer: TurboDiffusion's own sampling loop from
`wan2.2_i2v_infer.py` on its own network (`rcm/networks/wan2pt2.py`) with its `.cpu()`/`.cuda()`
expert swap, same shapes and SLA, and one forward of our expert against the official network on
the same weights (parity). Writes docs/benchmarks/i2v.json and a section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table, write_results  # noqa: E402
from engine.family import Engine, GenerationResult  # noqa: E402
from engine.requests import I2VRequest  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402

TARGETS = {"resident": {"denoise_s": 17.0, "switch_s": 0.05, "row_s": 22.0},
           "swap": {"switch_s": 1.5, "row_s": 22.0}}


def test_image(path: Path) -> str:
    """A 1280×720 gradient (the content does not change the speed)."""
    y, x = np.mgrid[0:720, 0:1280]
    rgb = np.stack([x * 255 // 1279, y * 255 // 719, (x + y) * 255 // 1998], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def run_policy(policy: str, args: argparse.Namespace, image: str) -> dict[str, object]:
    settings = EngineSettings(allow_random_weights=True, expert_policy=policy,
                              compile="0" if args.no_compile else "1")
    engine = Engine(settings, device=args.device, random_weights=args.model != "tiny-i2v")
    spec = engine.load_spec(args.model)
    t0 = time.perf_counter()
    pipe = engine.pipeline(spec)
    pipe.prepare(args.rows + 1)
    load_s = time.perf_counter() - t0

    def row(i: int) -> tuple[float, GenerationResult]:
        req = I2VRequest(prompt=f"row {i}: a slow dolly shot of the scene, soft light, detailed",
                         image=image, num_frames=args.frames, num_steps=args.steps, seed=abs(i),
                         attention_type=args.attention, sla_topk=args.topk)
        start = time.perf_counter()
        result = engine.generate(spec, req)
        return time.perf_counter() - start, result

    # Swap's first two rows make the experts' host copies (the low one's on the second row).
    warmups = 1 if policy == "resident" else 2
    warm_s = sum(row(-1 - i)[0] for i in range(warmups))
    measured = [row(i + 1) for i in range(args.rows)]

    def med(key: str) -> float:
        return statistics.median(r.timings[key] for _, r in measured)
    out: dict[str, object] = {
        "policy": policy,
        "denoise_s": round(med("denoise_s"), 3),
        "switch_s": round(med("switch_s"), 3),
        "expert_in_s": round(med("expert_in_s"), 3),
        "text_s": round(med("text_s"), 3),
        "image_s": round(med("image_s"), 3),
        "vae_s": round(med("vae_s"), 3),
        "row_s": round(statistics.median(wall for wall, _ in measured), 3),
        "peak_vram_gb": round(max(r.peak_vram_gb for _, r in measured), 2),
        "expert_loads_per_row": [r.expert_loads for _, r in measured],
        "size": f"{measured[0][1].width}x{measured[0][1].height}x{args.frames}",
        "load_s": round(load_s, 2),
        "warmup_row_s": round(warm_s, 2),
    }
    engine.cache.clear()        # the caller collects the rest once this frame is gone
    return out


def run_td_peer(args: argparse.Namespace) -> dict[str, object]:
    """TurboDiffusion's i2v loop on its own wan2pt2 network: both experts built on the GPU,
    the idle one moved with `.cpu()` and the next with `.cuda()`, as the official script does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from td_peer import official_a14b_expert, official_rcm_i2v
    h, w = 720, 1280
    lat = (16, 1 + (args.frames - 1) // 4, h // 8, w // 8)
    high = official_a14b_expert(args.td_repo, args.topk, seed=1).cpu()
    low = official_a14b_expert(args.td_repo, args.topk, seed=2).cpu()
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(1, 20, *lat[1:], device="cuda", generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    runs = []
    for i in range(1 + args.peer_rows):
        torch.cuda.reset_peak_memory_stats()
        runs.append(official_rcm_i2v(high, low, y, ctx, lat, steps=args.steps, seed=i))
    measured = runs[1:]
    return {"policy": "official .cpu()/.cuda() swap",
            "denoise_s": round(statistics.median(r["denoise_s"] for r in measured), 3),
            "switch_s": round(statistics.median(r["switch_s"] for r in measured), 3),
            "expert_in_s": round(statistics.median(r["expert_in_s"] for r in measured), 3),
            "peak_vram_gb": round(max(r["peak_vram_gb"] for r in measured), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.2-i2v-a14b")
    ap.add_argument("--policies", default="resident,swap")
    ap.add_argument("--rows", type=int, default=2, help="measured rows per policy (after one warm-up row)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--attention", default="sla")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--td-repo", default=None, help="a TurboDiffusion checkout: also time the official loop")
    ap.add_argument("--peer-rows", type=int, default=1, help="measured rows of the official loop")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()
    if args.device == "cpu":
        args.attention = "sla"

    image = test_image(Path(args.tmp) / "bench-i2v.png")
    results = []
    for policy in args.policies.split(","):
        r = run_policy(policy, args, image)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print_table([r])
        print(r, flush=True)      # a run cut short by a time limit still leaves each policy's numbers
        results.append(r)
    parity = None
    if args.td_repo:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from td_peer import parity_a14b
        parity = parity_a14b(args.td_repo, args.frames)
        print("parity with the official wan2pt2 expert:", parity)
    peer = run_td_peer(args) if args.td_repo else None
    rows = results + ([peer] if peer else [])
    print_table(rows)

    md = ["| policy | denoise | switch | expert in | text | image enc | VAE decode | row | peak VRAM |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['policy']} | {r['denoise_s']} s | {r['switch_s']} s | {r['expert_in_s']} s | "
                  f"{r.get('text_s', '')} | {r.get('image_s', '')} | {r.get('vae_s', '')} | "
                  f"{r.get('row_s', '')} | {r['peak_vram_gb']} GB |")
    md.append(f"\n{args.model}, {results[0]['size'] if results else ''}, {args.steps} steps, SLA top-k "
              f"{args.topk}, random weights; row = text + image encode + denoise + decode, wall time. "
              "Targets on an H200: resident denoise ≤ 17 s, switch ≤ 0.05 s; swap switch ≤ 1.5 s; "
              "row ≤ 22 s. Published peer: LightX2V 4-step Wan2.1-I2V-14B 720p, 44 s end to end (H200).")
    payload = {"model": args.model, "frames": args.frames, "steps": args.steps, "sla_topk": args.topk,
               "policies": {r["policy"]: r for r in results}, "peer": peer, "parity_official": parity,
               "targets": TARGETS}
    if parity:
        md.append(f"One forward of our expert vs the official wan2pt2 network on the same weights and inputs "
                  f"(x, y, 720p): relative error {parity['rel_err']} (keys match: {parity['keys_match']}).")
    if not args.no_write:
        write_results("i2v", payload, md, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
