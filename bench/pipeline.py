"""Orchestration overhead of the local pipeline: N tiny rows on the CPU.

    python bench/pipeline.py [--rows 200] [--frames 5]

Runs the same rows twice into fresh output folders:
- peer: a plain Python loop over the same stage functions (generate → post-process → validate →
  upload into a local folder), no Prefect, no threads;
- ours: the batch flow in-process on Prefect's ephemeral API (manifest validation, shard planning,
  shard subflow, one task run per stage per row, overlapped delivery, metrics and artifacts).

overhead_ms_per_row = (our wall − the stage seconds recorded in our metrics) / rows: the issue's
"total minus stage work". Beside it, vs_plain_loop_ms_per_row = (our wall − peer wall) / rows also
counts the stages running slower next to Prefect's ephemeral server on the same cores.
Writes docs/benchmarks/pipeline.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table, write_results  # noqa: E402
from flows.cli import configure_local_prefect  # noqa: E402

configure_local_prefect()   # the same settings `turbo-batch run` uses

STAGES = ("t_fetch_s", "t_text_s", "t_denoise_s", "t_vae_s", "t_postprocess_s", "t_validate_s", "t_upload_s")


def write_manifest(path: Path, rows: int, frames: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "num_frames", "num_steps", "seed"])
        for i in range(rows):
            w.writerow([f"row-{i:04d}", "t2v", f"benchmark prompt {i % 20}", "tiny-t2v", frames, 4, i])


def run_plain_loop(manifest: Path, out: Path) -> float:
    """The same stage functions, called one after another, nothing else."""
    from flows.shard import new_engine
    from tasks.deliver import run_deliver
    from tasks.generate import run_generate
    from tasks.identity import row_key
    from tasks.manifest import read_manifest
    from tasks.upload import LocalSink

    sink = LocalSink(out)
    engine = new_engine()
    t = time.perf_counter()
    rows = read_manifest(manifest).rows
    for row in rows:
        spec = engine.load_spec(row.model, row.quant_linear)
        key = row_key(row, engine, spec)
        gen = run_generate(row, out / "work" / key, engine, spec)
        run_deliver(gen.frames_path, row.postprocess_fields(), key, sink)
    return time.perf_counter() - t


def run_flow(manifest: Path, out: Path) -> tuple[float, dict[str, float]]:

    from flows.batch import batch_flow

    t = time.perf_counter()
    result = batch_flow(manifest=str(manifest), sink=str(out))
    wall = time.perf_counter() - t
    if result["succeeded"] != result["rows"]:
        raise SystemExit(f"benchmark run had failures: {result}")
    from tasks.runs import read_run_metrics
    from tasks.upload import LocalSink
    df = read_run_metrics(LocalSink(out))
    return wall, {c: float(df[c].sum()) for c in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="turbo-bench-") as tmp:
        root = Path(tmp)
        os.environ["TURBO_EMBED_CACHE"] = str(root / "text-cache")
        manifest = root / "bench.csv"
        write_manifest(manifest, args.rows, args.frames)
        plain_s = run_plain_loop(manifest, root / "plain")
        flow_s, stages = run_flow(manifest, root / "flow")

    n = args.rows
    stage_s = sum(stages.values())
    row = {"rows": n, "flow_wall_s": flow_s, "plain_loop_wall_s": plain_s,
           "flow_ms_per_row": 1000 * flow_s / n, "plain_ms_per_row": 1000 * plain_s / n,
           "in_run_stage_ms_per_row": 1000 * stage_s / n,
           "overhead_ms_per_row": 1000 * (flow_s - stage_s) / n,
           "vs_plain_loop_ms_per_row": 1000 * (flow_s - plain_s) / n}
    print_table([row])
    if args.no_write:
        return
    md = ["| rows | flow wall s | in-run stage s | overhead ms/row (wall − stages; target ≤ 100) | "
          "plain loop wall s | flow − plain loop, ms/row |",
          "|---|---|---|---|---|---|",
          f"| {n} | {flow_s:.1f} | {stage_s:.1f} | {row['overhead_ms_per_row']:.1f} | {plain_s:.1f} | "
          f"{row['vs_plain_loop_ms_per_row']:.1f} |",
          "", f"Tiny preset, {args.frames} frames per row, local folder sink, Prefect's ephemeral API. "
          "The peer is a plain loop over the same stage functions in the same process."]
    write_results("pipeline", {**row, "frames": args.frames, "stage_seconds": stages}, md)


if __name__ == "__main__":
    main()
