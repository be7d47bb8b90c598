"""GPU work pools end to end: a Prefect server, one process worker and one engine service per GPU,
batches back to back.

    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/pools.py --gpus 1 --batches 20,200     # issue 12
    TURBO_ALLOW_RANDOM_WEIGHTS=1 python bench/pools.py --gpus 4 --batches 200 --baseline   # scaling
    python bench/pools.py --gpus 2 --batches 4,8 --model tiny-t2v --frames 5          # CPU dry run

Starts `prefect server` on loopback (temporary home), creates the pools, deploys prefect.yaml,
starts deployments/start-workers.sh with GPUS=N (engine services on, random weights, three shards at
once per GPU), sends every service one row straight through its client (it loads and compiles the
model), runs an unmeasured --warmup batch through Prefect, then runs
`prefect deployment run batch/batch` once per entry of --batches, each on a fresh manifest into a
local folder sink. Per batch: rows, shards, the wall time from the batch run's creation to its end
(the server's timestamps), items/hour, per GPU its busy fraction (GPU seconds inside its engine
service over the wall time, the service's own counter), the same between its first and last GPU
work, its idle time at the end against the GPU that finished last (the balance), the first-row
latency (submission to the first GPU work, polled from the services' /health), model loads, and the
timeline (batch claimed by a worker and running, shards created, claimed and running, first GPU work,
last GPU work, batch done: claimed to running is the flow-run process start).
The services stay up between batches: the later ones find the model warm. --baseline then starts a
pool of one GPU and runs the largest batch on it (scaling_vs_1gpu). Writes docs/benchmarks/pools.json
and a section of docs/BENCHMARKS.md (and copies to --out, default $OUT).
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import card_name, print_table, write_results  # noqa: E402


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
    """`prefect deployment run … --watch` as a user runs it; the CLI's own wall time."""
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
    """The engine services' /health: each GPU's first work of a batch (polled), its GPU seconds and
    its last work's end (the service's own counters), model loads."""

    def __init__(self, sockets: list[Path]):
        from service.client import EngineClient
        self.clients = [EngineClient(sock, wait_s=600, random_weights=True) for sock in sockets]
        self.first_busy: dict[str, float] = {}
        self._stop = False

    def ready(self) -> list[dict]:
        return [c.wait_ready() for c in self.clients]

    def warm(self, args: argparse.Namespace, work: Path) -> list[dict]:
        """One row of the benchmark's shape on every service at once, straight through the client:
        each loads and compiles its model (a pool that has run before starts here)."""
        from concurrent.futures import ThreadPoolExecutor

        from engine.requests import T2VRequest
        row = T2VRequest(prompt="warm-up", num_frames=args.frames, resolution=args.resolution, seed=0)

        def one(i: int) -> dict:
            client = self.clients[i]
            t = time.perf_counter()
            out = client.generate(client.load_spec(args.model), row, work / f"warm-{i}")
            return {"gpu": out.gpu, "s": round(time.perf_counter() - t, 2), "model_load_s": out.model_load_s}

        with ThreadPoolExecutor(len(self.clients)) as pool:
            return list(pool.map(one, range(len(self.clients))))

    def snapshot(self) -> dict[str, dict]:
        return {h["gpu"]: h for h in (c.health() for c in self.clients)}

    def watch(self) -> None:
        """From now on, each GPU's first work: the start time its service stamps on its latest work,
        the first time that changes (polled every 50 ms, much shorter than a row)."""
        import threading
        self.first_busy, self._stop = {}, False
        seen = {h["gpu"]: h["last_work_start"] for h in self.snapshot().values()}

        def run() -> None:
            while not self._stop and len(self.first_busy) < len(self.clients):
                for h in (c.health() for c in self.clients):
                    if h["gpu"] not in self.first_busy and h["last_work_start"] != seen[h["gpu"]]:
                        self.first_busy[h["gpu"]] = h["last_work_start"]
                time.sleep(0.05)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)


def flow_runs(env: dict[str, str], sink: Path) -> tuple[Any, list[Any]]:
    """The batch's flow run and its shards' (the Prefect API's own timestamps)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if (r.parameters or {}).get("sink") == str(sink)]
    (batch,) = [r for r in runs if r.name and not r.name.startswith("shard-")]
    return batch, [r for r in runs if r.name and r.name.startswith("shard-")]


def claimed_at(env: dict[str, str], runs: list[Any]) -> float | None:
    """When a worker first claimed any of these runs (its Pending state): between a run's creation
    and its start, this splits the worker's polling from the flow-run process's start."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        times = [st.timestamp.timestamp() for r in runs for st in client.read_flow_run_states(r.id)
                 if st.type.value == "PENDING"]
    return min(times, default=None)


def measure(env: dict[str, str], root: Path, gpus: int, rows: int, args: argparse.Namespace, tag: str,
            services: ServiceWatch) -> dict:
    """One batch. Its wall time runs from the batch run's creation (the server's clock) to its end;
    a GPU's busy fraction is its service's GPU seconds over that wall time."""
    manifest = root / f"{tag}.csv"
    write_manifest(manifest, rows, args.model, args.frames, args.resolution, tag)
    sink = root / f"out-{tag}"
    before = services.snapshot()
    services.watch()
    cli_wall = run_batch(env, manifest, sink, gpus, args.max_rows_per_shard)
    services.stop()
    after = services.snapshot()
    from tasks.runs import read_run_metrics
    from tasks.upload import LocalSink
    df = read_run_metrics(LocalSink(sink))
    if set(df["status"]) != {"succeeded"}:
        raise SystemExit(f"not every row succeeded: {df['status'].value_counts()}")
    batch, shards = flow_runs(env, sink)
    t0 = batch.created.timestamp()

    def at(t: float | None) -> float | None:
        return round(t - t0, 2) if t is not None else None

    wall = batch.end_time.timestamp() - t0
    rows_on = df.group_by("gpu").len()
    per_gpu = {}
    for gpu, h in sorted(after.items()):
        busy_s = h["busy_s"] - before[gpu]["busy_s"]
        n = int(rows_on.filter(rows_on["gpu"] == gpu)["len"].sum())
        first, last = services.first_busy.get(gpu), h["last_work_end"] if n else None
        working = last - first if first is not None and last is not None and last > first else None
        per_gpu[gpu] = {"rows": n, "busy_s": round(busy_s, 2), "busy_fraction": round(busy_s / wall, 3),
                        "first_work_s": at(first), "last_work_end_s": at(last),
                        "row_s": round(busy_s / n, 3) if n else None,
                        # between its first and its last GPU work: the fixed costs left out
                        "busy_fraction_working": round(busy_s / working, 3) if working else None}
    last_end = max((g["last_work_end_s"] for g in per_gpu.values() if g["last_work_end_s"] is not None), default=None)
    for g in per_gpu.values():   # what the balance leaves idle at the end, against one row's time
        g["tail_idle_s"] = round(last_end - g["last_work_end_s"], 2) if g["last_work_end_s"] is not None else None
    starts = sorted(r.start_time.timestamp() for r in shards if r.start_time)
    first_work = min(services.first_busy.values(), default=None)
    line = {"batch_claimed_s": at(claimed_at(env, [batch])),
            "batch_started_s": at(batch.start_time.timestamp()) if batch.start_time else None,
            "shards_created_s": at(min(r.created.timestamp() for r in shards)) if shards else None,
            "first_shard_claimed_s": at(claimed_at(env, shards)),
            "first_shard_started_s": at(starts[0]) if starts else None,
            "first_gpu_work_s": at(first_work),
            "last_gpu_work_end_s": last_end,
            "last_shard_done_s": at(max(r.end_time.timestamp() for r in shards if r.end_time)) if shards else None,
            "batch_done_s": round(wall, 2)}
    result = {"gpus": gpus, "rows": df.height, "shards": len(shards), "wall_s": round(wall, 2),
            "cli_wall_s": round(cli_wall, 2),
            "items_per_hour": round(3600 * df.height / wall, 1),
            "busy_fraction": {g: v["busy_fraction"] for g, v in per_gpu.items()},
            "first_row_latency_s": line["first_gpu_work_s"],
            "model_loads": sum(h["model_loads"] - before[g]["model_loads"] for g, h in after.items()),
            "model_load_s": round(float(df["model_load_s"].fill_null(0).sum()), 2),
            "queue_wait_s": round(float(df["queue_wait_s"].fill_null(0).sum()), 2),
            "per_gpu": per_gpu, "timeline": line}
    print(f"batch {tag}: {json.dumps(result)}", flush=True)
    if args.out:                      # what is done so far survives a run cut short
        partial = Path(args.out) / "pools.partial.json"
        done = json.loads(partial.read_text()) if partial.exists() else {}
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({**done, tag: result}, indent=1))
    return result


class Pool:
    """start-workers.sh with GPUS=n: a process worker and an engine service per GPU, and the cpu worker."""

    def __init__(self, env: dict[str, str], logs: Path, gpus: int, tag: str):
        self.run_dir = Path(tempfile.mkdtemp(prefix="tbp-", dir="/tmp"))        # short: Unix socket paths
        self.logs = logs / tag
        self.logs.mkdir(parents=True)
        self.proc = subprocess.Popen(
            ["bash", "deployments/start-workers.sh"], cwd=REPO,
            env={**env, "GPUS": str(gpus), "LOG_DIR": str(self.logs), "WORKER_HOST": "bench",
                 "TURBO_BATCH_HOME": str(REPO), "RUN_DIR": str(self.run_dir), "ENGINE_RANDOM_WEIGHTS": "1"},
            stdout=(self.logs / "workers.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.services = ServiceWatch([self.run_dir / f"bench-engine-{i}.sock" for i in range(gpus)])
        self.services.ready()
        time.sleep(5)                       # the workers' first heartbeats

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(5)    # the stopped workers' heartbeats age out before the next pool counts its own


def run_pool(env: dict[str, str], root: Path, logs: Path, gpus: int, sizes: list[int],
             args: argparse.Namespace, tag: str) -> tuple[dict, list[dict]]:
    """A pool of `gpus`: warm every service, an unmeasured warm-up batch through Prefect, then the
    measured batches."""
    pool = Pool(env, logs, gpus, tag)
    try:
        warm: dict = {"services": pool.services.warm(args, root / f"{tag}-warm")}
        if args.warmup:
            warm["batch"] = measure(env, root, gpus, args.warmup, args, f"{tag}-warmup", pool.services)
        return warm, [measure(env, root, gpus, n, args, f"{tag}-b{i}-{n}", pool.services)
                      for i, n in enumerate(sizes)]
    finally:
        pool.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--batches", default="20,200", help="rows of each batch, run back to back on the same services")
    ap.add_argument("--warmup", type=int, default=2,
                    help="rows of an unmeasured first batch, after one row straight on each service that loads "
                    "and compiles its model (0: no batch)")
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--max-rows-per-shard", type=int, default=25)
    ap.add_argument("--baseline", action="store_true",
                    help="then the largest batch again on a pool of one GPU (scaling_vs_1gpu)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    for tool in ("prefect", "ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/pools.py needs {tool} on PATH")

    if args.out:
        (Path(args.out) / "pools.partial.json").unlink(missing_ok=True)
    root = Path(tempfile.mkdtemp(prefix="turbo-pools-"))
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CUDA_VISIBLE"))}
    env = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           # workers of a stopped pool stop counting for the next one after 3 missed heartbeats
           "PREFECT_WORKER_HEARTBEAT_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
           "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
           "TURBO_EMBED_CACHE": str(root / "text-cache"), "TURBO_ALLOW_RANDOM_WEIGHTS": "1",
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))}
    logs = root / "logs"
    logs.mkdir(parents=True)
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=(logs / "server.log").open("wb"), stderr=subprocess.STDOUT)
    sizes = [int(n) for n in args.batches.split(",")]
    baseline = None
    try:
        wait_healthy(env["PREFECT_API_URL"])
        subprocess.run(["bash", "deployments/create-pools.sh"], env=env, cwd=REPO, check=True,
                       capture_output=True)
        deploy_env = {k: v for k, v in env.items() if k != "TURBO_BATCH_HOME"}
        subprocess.run(["prefect", "deploy", "--all", "--no-prompt"], env=deploy_env, cwd=REPO,
                       check=True, capture_output=True)
        warmup, results = run_pool(env, root, logs, args.gpus, sizes, args, f"g{args.gpus}")
        if args.baseline and args.gpus > 1:
            _, (baseline,) = run_pool(env, root, logs, 1, [max(sizes)], args, "g1")
    finally:
        server.terminate()
        server.wait(timeout=30)

    payload: dict = {"gpus": args.gpus, "model": args.model, "resolution": args.resolution, "frames": args.frames,
                     "shards_per_gpu": int(env.get("SHARDS_PER_GPU") or 3), "warmup": warmup, "batches": results,
                     "logs": str(logs)}
    if baseline is not None:
        same = next(r for r in results if r["rows"] == baseline["rows"])
        payload["baseline_1gpu"] = baseline
        payload["scaling_vs_1gpu"] = round(same["items_per_hour"] / baseline["items_per_hour"], 3)
    table = [("warm-up", warmup["batch"])] if "batch" in warmup else []
    table += [("measured", r) for r in results] + ([("1 GPU", baseline)] if baseline else [])
    print_table([{"batch": name, "gpus": r["gpus"], "rows": r["rows"], "shards": r["shards"], "wall_s": r["wall_s"],
                  "items_per_hour": r["items_per_hour"], "busy_min": min(r["busy_fraction"].values()),
                  "busy_max": max(r["busy_fraction"].values()),
                  "tail_idle_max_s": max(g["tail_idle_s"] or 0 for g in r["per_gpu"].values()),
                  "first_row_latency_s": r["first_row_latency_s"], "model_loads": r["model_loads"]}
                 for name, r in table])
    print(json.dumps(payload, indent=1))
    if "scaling_vs_1gpu" in payload:
        print(f"scaling vs 1 GPU: {payload['scaling_vs_1gpu']}x on {args.gpus} GPUs")
    if args.no_write:
        return
    kind = "GPU" if "CPU" not in card_name() else 'CPU "GPU"'
    md = [f"{args.model} {args.resolution} {args.frames} frames on {args.gpus} {kind} worker(s), each with its "
          f"engine service and {payload['shards_per_gpu']} shards at once, batches back to back after a "
          f"{args.warmup}-row warm-up batch (targets on a warm pool: 20 rows busy ≥ 0.85, 200 rows busy ≥ 0.97, "
          "submission to first GPU work ≤ 8 s; wall time from the batch run's creation to its end):", "",
          "| batch | GPUs | rows | shards | wall s | items/hour | busy fraction per GPU | busy while working "
          "| tail idle s | first row latency s | model loads | timeline (s from submission) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {name} | {r['gpus']} | {r['rows']} | {r['shards']} | {r['wall_s']} | {r['items_per_hour']} | "
           f"{json.dumps(r['busy_fraction'])} | "
           f"{json.dumps({g: v['busy_fraction_working'] for g, v in r['per_gpu'].items()})} | "
           f"{max(g['tail_idle_s'] or 0 for g in r['per_gpu'].values())} | {r['first_row_latency_s']} | "
           f"{r['model_loads']} | {json.dumps(r['timeline'])} |" for name, r in table]
    if "scaling_vs_1gpu" in payload:
        md += ["", f"Scaling: {payload['scaling_vs_1gpu']}× on {args.gpus} GPUs against the same batch on one."]
    write_results("pools", payload, md, out_dir=Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
