"""GPU work pools end to end: a Prefect server, one process worker and one engine service per GPU,
batches back to back.

    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/pools.py --gpus 1 --batches 20,200     # real shapes
    python bench/pools.py --gpus 2 --batches 4,8 --model tiny-t2v --frames 5          # CPU dry run

Starts `prefect server` on loopback (temporary home), creates the pools, deploys prefect.yaml,
starts deployments/start-workers.sh with GPUS=N (engine services on, random weights), then runs
`prefect deployment run batch/batch` once per entry of --batches, each on a fresh manifest into a
local folder sink. Per batch: rows, wall time from submission to the batch's end, items/hour, the
busy fraction per GPU (seconds inside the engine service over the wall time), the first-row latency
(submission to the first row's GPU work, seen by polling the services' /health), model loads (the
services' own counters), and the timeline from the Prefect API (batch picked up, shards picked up,
first GPU work, last row, batch done). The services stay up between batches: the later ones find
the model warm. With --baseline and --gpus > 1, the first batch size also runs on one GPU
(scaling_vs_1gpu). Writes docs/benchmarks/pools.json and a section of docs/BENCHMARKS.md.
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
from collections import defaultdict
from pathlib import Path

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


class ServiceWatch:
    """Polls the engine services' /health: when the first row of a batch starts, and model loads."""

    def __init__(self, sockets: list[Path]):
        from service.client import EngineClient
        self.clients = [EngineClient(sock, wait_s=300) for sock in sockets]
        self.first_busy: float | None = None
        self._stop = False

    def ready(self) -> list[dict]:
        return [c.wait_ready() for c in self.clients]

    def loads(self) -> int:
        return sum(int(c.health()["model_loads"]) for c in self.clients)

    def watch(self) -> None:
        import threading
        self.first_busy, self._stop = None, False

        def run() -> None:
            while not self._stop and self.first_busy is None:
                if any(c.health()["busy"] for c in self.clients):
                    self.first_busy = time.time()
                time.sleep(0.05)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)


def timeline(env: dict[str, str], submitted: float, sink: Path, first_busy: float | None,
             done: float) -> dict[str, float | None]:
    """Seconds from submission: batch run picked up and started, shards created / started, first GPU
    work, last shard finished, batch finished (the Prefect API's own timestamps)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def at(t) -> float | None:
        return round(t.timestamp() - submitted, 2) if t is not None else None

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if (r.parameters or {}).get("sink") == str(sink)]
    batch = [r for r in runs if r.name and not r.name.startswith("shard-")]
    shards = [r for r in runs if r.name and r.name.startswith("shard-")]
    first = min((r.start_time for r in shards if r.start_time), default=None)
    return {"batch_started_s": at(batch[0].start_time) if batch else None,
            "shards_created_s": at(min((r.created for r in shards if r.created), default=None)),
            "first_shard_started_s": at(first),
            "first_gpu_work_s": round(first_busy - submitted, 2) if first_busy else None,
            "last_shard_done_s": at(max((r.end_time for r in shards if r.end_time), default=None)),
            "batch_done_s": round(done - submitted, 2)}


def measure(env: dict[str, str], root: Path, gpus: int, rows: int, args: argparse.Namespace, tag: str,
            services: ServiceWatch) -> dict:
    manifest = root / f"{tag}.csv"
    write_manifest(manifest, rows, args.model, args.frames, args.resolution, tag)
    sink = root / f"out-{tag}"
    loads_before = services.loads()
    services.watch()
    submitted = time.time()
    wall = run_batch(env, manifest, sink, gpus, args.max_rows_per_shard)
    done = time.time()
    services.stop()
    from tasks.runs import read_run_metrics
    from tasks.upload import LocalSink
    df = read_run_metrics(LocalSink(sink))
    if set(df["status"]) != {"succeeded"}:
        raise SystemExit(f"not every row succeeded: {df['status'].value_counts()}")
    busy: dict[str, float] = defaultdict(float)
    for r in df.iter_rows(named=True):
        busy[r["gpu"]] += r["service_s"] or sum(r[c] or 0.0 for c in ENGINE_COLUMNS)
    line = timeline(env, submitted, sink, services.first_busy, done)
    return {"gpus": gpus, "rows": df.height, "wall_s": round(wall, 2),
            "items_per_hour": round(3600 * df.height / wall, 1),
            "busy_fraction": {g: round(s / wall, 3) for g, s in sorted(busy.items())},
            "first_row_latency_s": line["first_gpu_work_s"],
            "model_loads": services.loads() - loads_before,
            "model_load_s": round(float(df["model_load_s"].fill_null(0).sum()), 2),
            "queue_wait_s": round(float(df["queue_wait_s"].fill_null(0).sum()), 2),
            "timeline": line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--batches", default="20,200", help="rows of each batch, run back to back on the same services")
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--max-rows-per-shard", type=int, default=25)
    ap.add_argument("--baseline", action="store_true", help="also run the first batch on one GPU (scaling_vs_1gpu)")
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
        run_dir = Path(tempfile.mkdtemp(prefix="tbp-", dir="/tmp"))        # short: Unix socket paths
        workers = subprocess.Popen(["bash", "deployments/start-workers.sh"], cwd=REPO,
                                   env={**env, "GPUS": str(args.gpus), "LOG_DIR": str(logs), "WORKER_HOST": "bench",
                                        "TURBO_BATCH_HOME": str(REPO), "RUN_DIR": str(run_dir),
                                        "ENGINE_RANDOM_WEIGHTS": "1"},
                                   stdout=(logs / "workers.log").open("wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        services = ServiceWatch([run_dir / f"bench-engine-{i}.sock" for i in range(args.gpus)])
        services.ready()
        time.sleep(5)                       # the workers' first heartbeats
        sizes = [int(n) for n in args.batches.split(",")]
        results = [measure(env, root, args.gpus, n, args, f"b{i}-{n}", services) for i, n in enumerate(sizes)]
        if args.baseline and args.gpus > 1:
            baseline = measure(env, root, 1, sizes[0], args, "g1", services)
    finally:
        if workers is not None:
            os.killpg(workers.pid, signal.SIGINT)
            try:
                workers.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(workers.pid, signal.SIGKILL)
        server.terminate()
        server.wait(timeout=30)

    payload: dict = {"gpus": args.gpus, "model": args.model, "resolution": args.resolution, "frames": args.frames,
                     "batches": results, "logs": str(logs)}
    if args.baseline and args.gpus > 1:
        payload["scaling_vs_1gpu"] = round(results[0]["items_per_hour"] / baseline["items_per_hour"], 3)
    print_table([{"rows": r["rows"], "wall_s": r["wall_s"], "items_per_hour": r["items_per_hour"],
                  "busy_min": min(r["busy_fraction"].values()), "first_row_latency_s": r["first_row_latency_s"],
                  "model_loads": r["model_loads"]} for r in results])
    print(json.dumps(payload, indent=1))
    if args.no_write:
        return
    kind = "GPU" if "CPU" not in card_name() else 'CPU "GPU"'
    md = [f"{args.model} {args.resolution} {args.frames} frames on {args.gpus} {kind} worker(s), each with its "
          "engine service, batches back to back (targets on a warm pool: 20 rows busy ≥ 0.85, 200 rows busy ≥ "
          "0.97, submission to first GPU work ≤ 8 s):", "",
          "| rows | wall s | items/hour | busy fraction | first row latency s | model loads "
          "| timeline (s from submission) |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['wall_s']} | {r['items_per_hour']} | {json.dumps(r['busy_fraction'])} | "
           f"{r['first_row_latency_s']} | {r['model_loads']} | {json.dumps(r['timeline'])} |" for r in results]
    write_results("pools", payload, md)


if __name__ == "__main__":
    main()
