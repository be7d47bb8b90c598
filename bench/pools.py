"""GPU work pools end to end: a Prefect server, one process worker per GPU, one batch.

    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/pools.py --gpus 4 --rows 20      # real shapes
    python bench/pools.py --gpus 2 --rows 20 --model tiny-t2v --frames 5        # CPU dry run

Starts `prefect server` on loopback (temporary home), creates the pools, deploys prefect.yaml,
starts deployments/start-workers.sh with GPUS=N, runs `prefect deployment run batch/batch` on a
generated manifest into a local folder sink, and reads the metrics. Prints items/hour, the
GPU-busy fraction per GPU (engine seconds: text + denoise + VAE, over the batch's wall time) and
model loads per worker (shard flow runs that worker ran: each shard loads its model once).
With --gpus > 1 and --baseline, also runs the same batch on one GPU and reports scaling_vs_1gpu.
Writes docs/benchmarks/pools.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import card_name, print_table, write_results  # noqa: E402

ENGINE_COLUMNS = ("t_text_s", "t_denoise_s", "t_vae_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"prefect server at {url} not healthy after {timeout} s")


def write_manifest(path: Path, rows: int, model: str, frames: int, resolution: str, tag: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "resolution", "num_frames", "seed"])
        for i in range(rows):
            w.writerow([f"{tag}-{i:03d}", "t2v", f"pool benchmark prompt {i}", model, resolution, frames, i])


def run_batch(env: dict[str, str], manifest: Path, sink: Path, gpus: int, max_rows: int) -> float:
    t = time.perf_counter()
    out = subprocess.run(
        ["prefect", "deployment", "run", "batch/batch", "--watch", "--watch-timeout", "3600",
         "--param", f"manifest={manifest}", "--param", f"sink={sink}",
         "--param", "random_weights=true", "--param", f"gpus={gpus}",
         "--param", f"max_rows_per_shard={max_rows}"],
        env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"batch failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall


def shard_loads(env: dict[str, str], metrics: pl.DataFrame) -> dict[str, int]:
    """Shard runs per GPU label: every shard run loads its model once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    gpu_of = dict(zip(metrics["id"], metrics["gpu"]))
    loads: Counter[str] = Counter()
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        for run in client.read_flow_runs():
            rows = (run.parameters or {}).get("rows")
            if run.name.startswith("shard-") and rows and run.state and run.state.is_completed() \
                    and rows[0]["id"] in gpu_of:       # this batch's shards only
                loads[gpu_of[rows[0]["id"]]] += 1
    return dict(loads)


def measure(env: dict[str, str], root: Path, gpus: int, args: argparse.Namespace, tag: str) -> dict:
    manifest = root / f"{tag}.csv"
    write_manifest(manifest, args.rows, args.model, args.frames, args.resolution, tag)
    sink = root / f"out-{tag}"
    wall = run_batch(env, manifest, sink, gpus, args.max_rows_per_shard)
    from tasks.runs import read_run_metrics
    from tasks.upload import LocalSink
    df = read_run_metrics(LocalSink(sink))
    if set(df["status"]) != {"succeeded"}:
        raise SystemExit(f"not every row succeeded: {df['status'].value_counts()}")
    busy: dict[str, float] = defaultdict(float)
    for r in df.iter_rows(named=True):
        busy[r["gpu"]] += sum(r[c] or 0.0 for c in ENGINE_COLUMNS)
    return {"gpus": gpus, "rows": df.height, "wall_s": wall,
            "items_per_hour": 3600 * df.height / wall,
            "busy_fraction": {g: s / wall for g, s in sorted(busy.items())},
            "model_loads": shard_loads(env, df)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--max-rows-per-shard", type=int, default=25)
    ap.add_argument("--baseline", action="store_true", help="also run on one GPU for scaling_vs_1gpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    for tool in ("prefect", "ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/pools.py needs {tool} on PATH")

    root = Path(tempfile.mkdtemp(prefix="turbo-pools-"))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CUDA_VISIBLE"))}
    env = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
           "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
           "TURBO_EMBED_CACHE": str(root / "text-cache"), "TURBO_ALLOW_RANDOM_WEIGHTS": "1"}
    logs = root / "logs"
    logs.mkdir(parents=True)
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=(logs / "server.log").open("wb"), stderr=subprocess.STDOUT)
    workers = None
    try:
        wait_healthy(env["PREFECT_API_URL"])
        subprocess.run(["bash", "deployments/create-pools.sh"], env=env, cwd=REPO, check=True,
                       capture_output=True)
        deploy_env = {k: v for k, v in env.items() if k != "TURBO_BATCH_HOME"}
        subprocess.run(["prefect", "deploy", "--all", "--no-prompt"], env=deploy_env, cwd=REPO,
                       check=True, capture_output=True)
        workers = subprocess.Popen(["bash", "deployments/start-workers.sh"], cwd=REPO,
                                   env={**env, "GPUS": str(args.gpus), "LOG_DIR": str(logs),
                                        "TURBO_BATCH_HOME": str(REPO)},
                                   stdout=(logs / "workers.log").open("wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        time.sleep(10)
        results = [measure(env, root, args.gpus, args, f"g{args.gpus}")]
        if args.baseline and args.gpus > 1:
            results.append(measure(env, root, 1, args, "g1"))
    finally:
        if workers is not None:
            os.killpg(workers.pid, signal.SIGINT)
            try:
                workers.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(workers.pid, signal.SIGKILL)
        server.terminate()
        server.wait(timeout=30)

    main_run = results[0]
    payload = {**main_run, "model": args.model, "resolution": args.resolution, "frames": args.frames,
               "logs": str(logs)}
    if len(results) > 1:
        payload["scaling_vs_1gpu"] = main_run["items_per_hour"] / results[1]["items_per_hour"]
    print_table([{"gpus": r["gpus"], "rows": r["rows"], "wall_s": r["wall_s"],
                  "items_per_hour": r["items_per_hour"],
                  "busy_min": min(r["busy_fraction"].values()),
                  "loads": json.dumps(r["model_loads"])} for r in results])
    print(json.dumps(payload, indent=1))
    if args.no_write:
        return
    kind = "GPU" if "CPU" not in card_name() else 'CPU "GPU"'
    md = [f"{args.rows} rows of {args.model} {args.resolution} {args.frames} frames on {args.gpus} "
          f"{kind} worker(s): "
          f"{main_run['items_per_hour']:.0f} items/hour, wall {main_run['wall_s']:.1f} s, busy fraction per "
          f"worker {json.dumps({k: round(v, 3) for k, v in main_run['busy_fraction'].items()})}, model loads "
          f"{json.dumps(main_run['model_loads'])}"
          + (f", scaling vs 1 GPU {payload['scaling_vs_1gpu']:.2f}×." if "scaling_vs_1gpu" in payload else ".")]
    write_results("pools", payload, md)


if __name__ == "__main__":
    main()
