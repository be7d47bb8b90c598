"""Engine benchmark at real shapes with random weights (speed does not depend on the values).

    python bench/engine.py                       # 1.3B-480p-81f and 14B-720p-81f, 4 steps
    python bench/engine.py --shapes 1.3b-480p --no-peer

For each shape: our denoise (4 rCM steps, SLA topk 0.1, bf16, regional torch.compile), our VAE
decode, peak VRAM; beside them, in the same process, the peer: diffusers' WanTransformer3DModel
with the same TurboDiffusion SLA swapped into self-attention and regional compile, and diffusers'
AutoencoderKLWan decoding the same latents; with --td-repo also the official TurboDiffusion network
(uncompiled, as its inference script runs it). Once: umT5-XXL text encoding of a 512-token prompt,
and cold start (loading a saved 1.3B checkpoint vs reading the same file raw). Per shape also: the
same DiT with FP8 block linears (`denoise_fp8_s`, `fp8_rel_err` of one forward against bf16 on the
same weights), and a whole row as a shard runs it (`row_s`: denoise + decode to uint8 with the
previous row's H.264 encode beside it; `rows_per_gpu_hour`).
Writes docs/benchmarks/engine.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table, write_results  # noqa: E402
from engine import loading  # noqa: E402
from engine.attention import AttentionSpec, resolve_attention  # noqa: E402
from engine.config import WanConfig, latent_shape  # noqa: E402
from engine.registry import get_model  # noqa: E402
from engine.sampler import rcm_sample  # noqa: E402
from engine.umt5 import HashTokenizer, TextEncoder, UMT5Encoder  # noqa: E402
from engine.vae_speed import DecodeSettings, FastDecoder  # noqa: E402
from engine.wan_dit import WanDiT  # noqa: E402
from engine.wan_pipeline import prepare_vae_for_device  # noqa: E402
from engine.wan_vae import WanVAE  # noqa: E402

SHAPES = {
    "1.3b-480p": ("wan2.1-t2v-1.3b", "480p"),
    "14b-720p": ("wan2.1-t2v-14b", "720p"),
    "tiny-480p": ("tiny-t2v", "480p"),     # dry run of this script on a CPU: --device cpu
}
DEV = torch.device("cuda")
DT = torch.bfloat16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def free() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else 0.0


# -- ours ------------------------------------------------------------------------------------
def bench_ours(cfg: WanConfig, resolution: str, frames: int, steps: int, topk: float,
               repeats: int, compile_blocks: bool) -> dict[str, float]:
    w, h = cfg.size(resolution, "16:9")
    spec = AttentionSpec(type=resolve_attention("sla", DEV), topk=topk)
    dit = loading.build_random(lambda: WanDiT(cfg, spec), seed=0, device=DEV, dtype=DT)
    if compile_blocks:
        dit.compile_blocks()
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEV, dtype=DT)
    shape = (1, *latent_shape(cfg, frames, w, h))

    def denoise() -> torch.Tensor:
        with torch.inference_mode():
            return rcm_sample(lambda x, t: dit(x.to(DT), t, context), shape, sigma_max=80.0,
                              num_steps=steps, generator=torch.Generator().manual_seed(0),
                              device=DEV)

    t = time.perf_counter()
    latents = denoise()          # warm-up: Triton autotune + compile
    sync()
    warmup_s = time.perf_counter() - t
    reset_peak()
    times = timed(denoise, repeats)
    peak_dit = peak_gb()

    vae = prepare_vae_for_device(loading.build_random(lambda: WanVAE(cfg.vae), seed=1, device=DEV, dtype=DT))
    z = latents.to(DT)
    # The decode a compiling shard runs (WanPipelineBase.prepare): the compiled decoder step.
    decoder = FastDecoder(vae, DecodeSettings(compile=compile_blocks)) if compile_blocks else vae
    with torch.inference_mode():
        vae.decode_to_uint8(z)   # warm-up (cuDNN autotuning)
        eager_times = timed(lambda: vae.decode_to_uint8(z), repeats)
        t = time.perf_counter()
        decoder.decode_to_uint8(z)   # warm-up: the decoder step's compile
        vae_warmup_s = time.perf_counter() - t
        reset_peak()
        vae_times = timed(lambda: decoder.decode_to_uint8(z), repeats)
    peak_vae = peak_gb()
    log(f"{cfg.name}: denoise {statistics.median(times):.3f} s, VAE decode {statistics.median(vae_times):.3f} s "
        f"(eager {statistics.median(eager_times):.3f} s)")
    row = bench_row(denoise, lambda lat: decoder.decode_to_uint8(lat.to(DT)), cfg.fps)
    log(f"{cfg.name}: row {row['row_s']:.3f} s")
    fp8 = bench_fp8(dit, context, shape, denoise, repeats)
    log(f"{cfg.name}: FP8 denoise {fp8['denoise_fp8_s']:.3f} s, rel err {fp8['fp8_rel_err']:.4f}")
    dit = vae = decoder = None  # noqa: F841  (free before the next model)
    free()
    return {"denoise_s": statistics.median(times), "warmup_s": warmup_s,
            "vae_decode_s": statistics.median(vae_times), "vae_decode_eager_s": statistics.median(eager_times),
            "vae_warmup_s": vae_warmup_s, **row, **fp8,
            "peak_vram_gb": max(peak_dit, peak_vae), "latents": z}  # type: ignore[dict-item]


def bench_row(denoise, decode, fps: int) -> dict[str, float]:
    """A row the way a shard runs it, text from the cache: denoise, decode to uint8 on the host;
    the previous row's H.264 encode (ffmpeg, CPU) runs beside it. GPU seconds per row, and rows
    per GPU-hour. Without ffmpeg on the machine the encode is left out (said in the result)."""
    import shutil
    import subprocess
    import threading
    ffmpeg = shutil.which("ffmpeg")

    def encode(frames) -> None:
        if ffmpeg is None:
            return
        n, h, w, _ = frames.shape
        subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                        "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4",
                        "/dev/null"], input=frames.numpy().tobytes(), check=True)

    with torch.inference_mode():
        previous = decode(denoise())
        times = []
        for _ in range(2):
            encoder = threading.Thread(target=encode, args=(previous,))
            encoder.start()
            sync()
            t0 = time.perf_counter()
            previous = decode(denoise())
            sync()
            times.append(time.perf_counter() - t0)
            encoder.join()
    row_s = statistics.median(times)
    return {"row_s": row_s, "rows_per_gpu_hour": 3600.0 / row_s, "row_encode_overlapped": ffmpeg is not None}


def bench_fp8(dit, context, shape, denoise, repeats: int) -> dict[str, float]:
    """The same DiT with its block linears in FP8 (engine/fp8.py): one forward's relative error
    against bf16 on the same weights and inputs, then the 4-step denoise."""
    from engine.fp8 import quantize_model
    g = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(shape, device=DEV, generator=g, dtype=DT)
    t = torch.full((1,), 934.0, device=DEV)
    with torch.inference_mode():
        reference = dit(x, t, context).float()
        path = quantize_model(dit, DEV)
        out = dit(x, t, context).float()
    rel_err = float((out - reference).norm() / reference.norm())
    denoise()                    # warm-up: the compiled blocks see new modules
    fp8_times = timed(denoise, repeats)
    return {"denoise_fp8_s": statistics.median(fp8_times), "fp8_rel_err": rel_err, "fp8_path": path}  # type: ignore[dict-item]


# -- the peer: diffusers' Wan DiT + the same SLA + regional compile ------------------------------
def bench_peer(cfg: WanConfig, resolution: str, frames: int, steps: int, topk: float,
               repeats: int, latents: torch.Tensor) -> dict[str, float]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from engine.attention import SparseLinearAttentionReference
    if DEV.type == "cuda":
        from turbodiffusion.SLA import SparseLinearAttention

    w, h = cfg.size(resolution, "16:9")
    with torch.device(DEV):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(DT)
        try:
            model = WanTransformer3DModel(
                num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=16,
                out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers)
        finally:
            torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    for block in model.blocks:
        sla = SparseLinearAttention(cfg.head_dim, topk, BLKQ=128, BLKK=64) if DEV.type == "cuda" \
            else SparseLinearAttentionReference(cfg.head_dim, topk)   # CPU dry run only
        block.attn1.set_processor(_SLAProcessor(sla.to(DEV)))
    model.compile_repeated_blocks(fullgraph=False)
    _, lt, lh, lw = latent_shape(cfg, frames, w, h)
    x = torch.randn(1, 16, lt, lh, lw, device=DEV, dtype=DT)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEV, dtype=DT)
    ts = torch.tensor([987.7], device=DEV)

    def forward() -> None:
        with torch.inference_mode():
            model(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)

    forward()
    per_forward = statistics.median(timed(forward, repeats))
    model = None  # noqa: F841
    free()

    vae = AutoencoderKLWan().to(DEV, DT).eval()
    with torch.inference_mode():
        _ = vae.decode(latents).sample  # warm-up
        vae_times = timed(lambda: vae.decode(latents).sample, repeats)
    vae = None  # noqa: F841
    free()
    return {"peer_forward_s": per_forward, "peer_denoise_s": per_forward * steps,
            "peer_vae_decode_s": statistics.median(vae_times)}


def bench_official(cfg: WanConfig, resolution: str, frames: int, steps: int, topk: float, repeats: int,
                   td_repo: str) -> dict[str, float]:
    """The official TurboDiffusion network (bench/td_peer.py: built from the repo's own files, as
    its inference script runs it, uncompiled), one forward on the same shapes."""
    from bench.td_peer import official_network
    name = {"wan2.1-t2v-1.3b": "Wan2.1-1.3B", "wan2.1-t2v-14b": "Wan2.1-14B"}[cfg.name]
    net = official_network(td_repo, name, topk, seed=0, fused_norms=cfg.param_billions < 5)
    w, h = cfg.size(resolution, "16:9")
    _, lt, lh, lw = latent_shape(cfg, frames, w, h)
    x = torch.randn(1, 16, lt, lh, lw, device=DEV, dtype=DT)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEV, dtype=DT)
    t = torch.tensor([[987.7]], device=DEV).to(DT)

    def forward() -> None:
        with torch.inference_mode():
            net(x_B_C_T_H_W=x, timesteps_B_T=t, crossattn_emb=ctx)

    forward()
    per_forward = statistics.median(timed(forward, repeats))
    net = None  # noqa: F841
    free()
    return {"official_forward_s": per_forward, "official_denoise_s": per_forward * steps}


class _SLAProcessor:
    """diffusers self-attention with TurboDiffusion's SLA in place of SDPA (same math as ours)."""

    def __init__(self, sla: torch.nn.Module):
        self.sla = sla

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = self.sla(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


# -- text encoder and cold start ------------------------------------------------------------
def bench_text(ucfg, repeats: int) -> float:
    enc = loading.build_random(lambda: UMT5Encoder(ucfg), seed=2, device=DEV, dtype=DT)
    te = TextEncoder(enc, HashTokenizer(ucfg.vocab_size), ucfg.text_len)
    prompt = " ".join(f"word{i}" for i in range(600))   # fills all 512 positions
    with torch.inference_mode():
        te.encode([prompt])
        t = statistics.median(timed(lambda: te.encode([prompt]), repeats))
    te = enc = None  # noqa: F841
    free()
    return t


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_cold_start(cfg: WanConfig, tmp: Path) -> dict[str, object]:
    spec = AttentionSpec(type=resolve_attention("sla", DEV), topk=0.1)
    dit = loading.build_random(lambda: WanDiT(cfg, spec), seed=0, device=DEV, dtype=DT)
    path = tmp / get_model(cfg.name).file("dit").name
    torch.save(dit.state_dict(), path)
    dit = None  # noqa: F841  (free before the next model)
    free()
    # Import everything a load touches first: dropping the page cache also evicts Python's and
    # torch's module files, and a first meta build measured 7.7 s of cold imports, not loading.
    with torch.device("meta"):
        WanDiT(cfg, spec)
    cold = drop_page_cache()
    t = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    raw_s = time.perf_counter() - t
    if cold:
        drop_page_cache()
    sync()
    t = time.perf_counter()
    phases: dict[str, float] = {}
    dit = loading.load_module(lambda: WanDiT(cfg, spec), path, device=DEV, dtype=DT, timings=phases)
    sync()
    load_s = time.perf_counter() - t
    dit = None  # noqa: F841
    free()
    t = time.perf_counter()
    dit = loading.load_module(lambda: WanDiT(cfg, spec), path, device=DEV, dtype=DT)
    sync()
    warm_load_s = time.perf_counter() - t
    dit = None  # noqa: F841
    size_gb = path.stat().st_size / 1e9
    free()
    path.unlink()
    return {"load_s": load_s, "raw_read_s": raw_s, "file_gb": size_gb, "load_phases": phases,
            "warm_load_s": warm_load_s,
            "page_cache": "dropped before each" if cold else "warm (could not drop)"}


def update_cold_start(cold: dict[str, object], args: argparse.Namespace) -> None:
    import json

    from bench.report import ROOT
    path = ROOT / "docs" / "benchmarks" / "engine.json"
    payload = json.loads(path.read_text()) if path.exists() else {"shapes": {}}
    payload["cold_start"] = cold
    for row in payload.get("shapes", {}).values():
        if "load_s" in row:
            row.update(load_s=cold["load_s"], raw_read_s=cold["raw_read_s"])
    payload = {k: v for k, v in payload.items() if k not in ("date", "card", "command")}
    md = [f"Cold start (1.3B, {cold['file_gb']:.2f} GB, page cache {cold['page_cache']}): "
          f"load {cold['load_s']:.2f} s vs raw read {cold['raw_read_s']:.2f} s "
          f"({cold['load_s'] / cold['raw_read_s']:.2f}×); phases {cold['load_phases']}; "
          f"warm load {cold['warm_load_s']:.2f} s."]
    print(md[0])
    if not args.no_write:
        write_results("engine", payload, md, Path(args.out) if args.out else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1.3b-480p,14b-720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--td-repo", help="the TurboDiffusion source (bench/DEVICE.md): also time its own network")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the script with --shapes tiny-480p")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--no-cold-start", action="store_true",
                    help="leave the checkpoint-load measurement out (kept from the last engine.json)")
    ap.add_argument("--cold-start-only", action="store_true",
                    help="measure only the checkpoint load and update engine.json's cold_start")
    args = ap.parse_args()
    global DEV, DT
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/engine.py needs a CUDA device (or --device cpu for a dry run)")
    if DEV.type == "cpu":
        DT = torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True

    results: dict[str, dict[str, object]] = {}
    table = []
    first = WanConfig.from_name(SHAPES[args.shapes.split(",")[0]][0])
    text_s = bench_text(first.umt5, args.repeats)
    log(f"text encoder: {text_s:.3f} s")
    if args.no_cold_start:
        import json

        from bench.report import ROOT
        previous = ROOT / "docs" / "benchmarks" / "engine.json"
        old = json.loads(previous.read_text()) if previous.exists() else {}
        cold = {**old.get("cold_start", {}), "measured": f"not in this run: {old.get('date')} on {old.get('card')}"}
    else:
        cold = bench_cold_start(first, Path(args.tmp))   # the 1.3B file in a real run
    if args.cold_start_only:
        return update_cold_start(cold, args)
    print(f"text encoder (umT5-XXL, 512 tokens): {text_s:.3f} s; cold start {cold}", flush=True)
    for name in args.shapes.split(","):
        model, res = SHAPES[name]
        cfg = WanConfig.from_name(model)
        repeats = args.repeats if cfg.param_billions < 5 else 1
        ours = bench_ours(cfg, res, args.frames, args.steps, args.topk, repeats, not args.no_compile)
        latents = ours.pop("latents")
        row: dict[str, object] = {"shape": f"{name}-{args.frames}f", **ours, "text_encoder_s": text_s}
        if not args.no_peer:
            row.update(bench_peer(cfg, res, args.frames, args.steps, args.topk, repeats, latents))
            row["denoise_vs_peer"] = row["denoise_s"] / row["peer_denoise_s"]
            row["vae_vs_peer"] = row["vae_decode_s"] / row["peer_vae_decode_s"]
        if args.td_repo and DEV.type == "cuda":
            row.update(bench_official(cfg, res, args.frames, args.steps, args.topk, repeats, args.td_repo))
            log(f"{cfg.name}: official network forward {row['official_forward_s']:.3f} s")
        if cfg.name == first.name:
            row.update({k: v for k, v in cold.items() if k in ("load_s", "raw_read_s")})
        results[f"{name}-{args.frames}f"] = row
        table.append(row)
        print_table([row])
        sys.stdout.flush()
        if args.out:                      # what is done so far survives a run cut short
            import json
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "engine.partial.json").write_text(json.dumps(results, indent=2, default=str))

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    payload = {"torch": torch.__version__, "triton": triton_version, "steps": args.steps,
               "sla_topk": args.topk, "cold_start": cold, "shapes": results}
    md = ["| shape | denoise s | FP8 denoise s (rel err) | peer denoise s | VAE decode s | peer VAE s | row s "
          "(rows/GPU-h) | peak VRAM GB | text s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        md.append(f"| {r['shape']} | {r['denoise_s']:.3f} | {r['denoise_fp8_s']:.3f} ({r['fp8_rel_err']:.4f}, "
                  f"{r['fp8_path']}) | {r.get('peer_denoise_s', float('nan')):.3f} | "
                  f"{r['vae_decode_s']:.3f} | {r.get('peer_vae_decode_s', float('nan')):.3f} | "
                  f"{r['row_s']:.3f} ({r['rows_per_gpu_hour']:.0f}) | "
                  f"{r['peak_vram_gb']:.1f} | {r['text_encoder_s']:.3f} |")
    for r in table:
        if "official_forward_s" in r:
            md.append(f"\nOfficial TurboDiffusion network, {r['shape']} (same run, uncompiled): forward "
                      f"{r['official_forward_s']:.3f} s, {args.steps} steps {r['official_denoise_s']:.3f} s.")
    if "load_s" in cold:
        md.append(f"\nCold start (1.3B, {cold['file_gb']:.2f} GB, page cache {cold['page_cache']}): "
                  f"load {cold['load_s']:.2f} s vs raw read {cold['raw_read_s']:.2f} s "
                  f"({cold['load_s'] / cold['raw_read_s']:.2f}×){'; ' + str(cold.get('measured', 'this run'))}.")
    md.append("\nVAE decode: the compiled decoder step a compiling shard runs (eager in `vae_decode_eager_s`). "
              "Row: denoise + decode to uint8, the previous row's H.264 encode beside it (text from the cache).")
    if not args.no_write:
        write_results("engine", payload, md, Path(args.out) if args.out else None)
    print()
    print_table(table)


if __name__ == "__main__":
    main()
