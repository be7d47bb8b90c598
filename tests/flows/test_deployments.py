"""End to end on a real Prefect stack (see conftest.py): `prefect deployment run 'batch/batch'`
fans shards out to two pinned "GPU" process workers, which upload to a TLS S3 server.

Checks that do not trust the pipeline's own bookkeeping:
- the bucket has versioning on, so every PUT leaves a version: "uploaded exactly once" is one
  version per output key, counted by the S3 server;
- which worker ran a shard comes from the worker's CUDA_VISIBLE_DEVICES as seen by the shard
  process (the metrics' `gpu` column), and from the flow runs' states in the Prefect API;
- the crash is a real SIGKILL of the shard's process, found through the run's infrastructure pid
  and checked against that process's PREFECT__FLOW_RUN_ID.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

e2e = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO_ROOT = Path(__file__).resolve().parents[2]

ROW_IDS = [f"clip-{i}" for i in range(6)]
ASPECTS = ["16:9", "9:16", "1:1", "4:3", "3:4", "16:9"]


def write_manifest(path: Path, ids: list[str], num_frames: int = 9) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "aspect_ratio", "num_frames", "num_steps", "seed"])
        for i, row_id in enumerate(ids):
            w.writerow([row_id, "t2v", f"test clip number {i}", "tiny-t2v", ASPECTS[i % len(ASPECTS)],
                        num_frames, 2, 100 + i])
    return path


def versioned_bucket(stack) -> str:
    client = stack.s3.client()
    bucket = stack.s3.create_bucket()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def versions_per_key(stack, bucket: str, prefix: str) -> Counter:
    client = stack.s3.client()
    counts: Counter = Counter()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            counts[v["Key"]] += 1
    return counts


def read_metrics(stack, bucket: str, prefix: str) -> pl.DataFrame:
    from tests.shards import latest_metrics
    return latest_metrics(f"s3://{bucket}/{prefix}", client=stack.s3.client())


def run_batch(stack, manifest: Path, sink: str, *extra: str) -> None:
    stack.prefect("deployment", "run", "batch/batch", "--param", f"manifest={manifest}",
                  "--param", f"sink={sink}", *extra, "--watch", "--watch-timeout", "300")


def flow_runs(stack, flow_name: str, sink: str):
    """Runs of `flow_name` whose `sink` parameter is this test's sink (parameters are not filterable)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with stack.settings(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [r for r in runs if r.parameters.get("sink") == sink]


def output_keys(prefix: str, counts: Counter, ext: str) -> list[str]:
    """Row outputs only: a run's own files (manifest, metrics, latest pointer) are under runs/."""
    return sorted(k for k in counts if k.startswith(prefix + "/") and k.endswith(ext)
                  and not k.startswith(f"{prefix}/runs/"))


@e2e[0]
@e2e[1]
def test_batch_deployment_fans_out_to_both_gpu_workers_and_uploads_once(prefect_stack, tmp_path):
    stack = prefect_stack
    bucket, prefix = versioned_bucket(stack), "videos"
    sink = f"s3://{bucket}/{prefix}"
    manifest = write_manifest(tmp_path / "six.csv", ROW_IDS)

    t0 = time.monotonic()
    run_batch(stack, manifest, sink, "--param", "max_rows_per_shard=2")
    first_run_s = time.monotonic() - t0

    df = read_metrics(stack, bucket, prefix)
    assert sorted(df["id"].to_list()) == ROW_IDS
    assert df["status"].to_list() == ["succeeded"] * 6, df.select("id", "status", "error")
    assert df["attempts"].to_list() == [1] * 6
    # The two GPU workers each ran shards: the shard process saw its worker's pin.
    assert set(df["gpu"].to_list()) == {"cpu (CUDA_VISIBLE_DEVICES=0)", "cpu (CUDA_VISIBLE_DEVICES=1)"}

    shards = flow_runs(stack, "gpu-shard", sink)
    # Two shards per GPU on engine services (start-workers.sh): 4 shards for 2 workers, ≤ 2 rows each.
    assert len(shards) == 4 and all(r.state_type.value == "COMPLETED" for r in shards)
    assert sorted(len(r.parameters["rows"]) for r in shards) == [1, 1, 2, 2]
    assert all(r.work_queue_name == "default" and r.work_pool_name == "gpu" for r in shards)
    assert all(r.parent_task_run_id is not None for r in shards)   # subflows of the batch run

    counts = versions_per_key(stack, bucket, prefix)
    mp4s, records = output_keys(prefix, counts, ".mp4"), output_keys(prefix, counts, ".json")
    assert len(mp4s) == 6 and len(records) == 6
    assert sorted(f"s3://{bucket}/{k}" for k in mp4s) == sorted(df["output_uri"].to_list())
    once = {k: n for k, n in counts.items() if not k.startswith(f"{prefix}/runs/")}
    assert set(once.values()) == {1}, once
    heads = {k: stack.s3.client().head_object(Bucket=bucket, Key=k) for k in mp4s}
    assert all(h["ContentLength"] > 0 and h["ContentType"] == "video/mp4" for h in heads.values())

    # The batch run's progress artifact reached 100 %.
    _assert_progress_complete(stack, sink)

    # Same manifest again: every row is found complete in the sink, nothing is written again.
    run_batch(stack, manifest, sink, "--param", "max_rows_per_shard=2")
    again = read_metrics(stack, bucket, prefix)
    assert again["status"].to_list() == ["skipped"] * 6
    assert again["output_uri"].to_list() == df["output_uri"].to_list()
    after = versions_per_key(stack, bucket, prefix)
    assert {k: n for k, n in after.items() if not k.startswith(f"{prefix}/runs/")} == once
    for k, h in heads.items():
        assert stack.s3.client().head_object(Bucket=bucket, Key=k)["ETag"] == h["ETag"]
    print(f"first batch {first_run_s:.1f} s")


@e2e[0]
@e2e[1]
def test_i2v_and_t2v_rows_run_on_separate_shards_and_upload_once(prefect_stack, tmp_path):
    from PIL import Image

    stack = prefect_stack
    bucket, prefix = versioned_bucket(stack), "mixed"
    sink = f"s3://{bucket}/{prefix}"
    (tmp_path / "images").mkdir()
    sizes = {"wide": (300, 200), "tall": (200, 300), "square": (256, 256), "cinema": (320, 180)}
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 120)).save(tmp_path / "images" / f"{name}.png")
    # Interleaved, so a shard that mixed modes could not hide behind the manifest's order.
    rows = [("i2v-wide", "i2v", "tiny-i2v", "images/wide.png"), ("t2v-0", "t2v", "tiny-t2v", ""),
            ("i2v-tall", "i2v", "tiny-i2v", "images/tall.png"), ("i2v-square", "i2v", "tiny-i2v",
                                                                  str(tmp_path / "images" / "square.png")),
            ("t2v-1", "t2v", "tiny-t2v", ""), ("i2v-cinema", "i2v", "tiny-i2v", "images/cinema.png")]
    manifest = tmp_path / "mixed.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "image", "num_frames", "num_steps", "seed"])
        for i, (row_id, mode, model, image) in enumerate(rows):
            w.writerow([row_id, mode, f"mixed clip number {i}", model, image, 5, 4, 200 + i])
    ids = [r[0] for r in rows]
    mode_of = {r[0]: r[1] for r in rows}

    run_batch(stack, manifest.resolve(), sink, "--param", "max_rows_per_shard=2")

    df = read_metrics(stack, bucket, prefix)
    assert sorted(df["id"].to_list()) == sorted(ids)
    assert df["status"].to_list() == ["succeeded"] * len(ids), df.select("id", "status", "error")
    for m in df.iter_rows(named=True):
        assert m["mode"] == mode_of[m["id"]]
        assert (m["expert_policy"] == "resident") == (m["mode"] == "i2v"), m

    # Every valid row is in exactly one completed shard, and no shard mixes modes (or models).
    # The shard's `rows` are positions in the run's validated manifest: here every row is valid,
    # so position i is the manifest's i-th data row.
    shards = flow_runs(stack, "gpu-shard", sink)
    assert shards and all(r.state_type.value == "COMPLETED" for r in shards)
    positions = sorted(p for r in shards for p in r.parameters["rows"])
    assert positions == list(range(len(rows)))
    for r in shards:
        assert len({rows[p][1] for p in r.parameters["rows"]}) == 1, (r.name, r.parameters["rows"])
        assert len({rows[p][2] for p in r.parameters["rows"]}) == 1, (r.name, r.parameters["rows"])
    assert {rows[r.parameters["rows"][0]][1] for r in shards} == {"i2v", "t2v"}

    counts = versions_per_key(stack, bucket, prefix)
    mp4s = output_keys(prefix, counts, ".mp4")
    assert len(mp4s) == len(ids) and len(output_keys(prefix, counts, ".json")) == len(ids)
    assert sorted(f"s3://{bucket}/{k}" for k in mp4s) == sorted(df["output_uri"].to_list())
    once = {k: n for k, n in counts.items() if not k.startswith(f"{prefix}/runs/")}
    assert set(once.values()) == {1}, once


@e2e[0]
@e2e[1]
def test_dance_rows_get_their_poses_on_the_cpu_pool_and_generate_on_the_gpu_pool(prefect_stack, tmp_path):
    from PIL import Image
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests.pose.graphs import person_image, write_driving_video

    stack = prefect_stack
    bucket, prefix = versioned_bucket(stack), "dance"
    sink = f"s3://{bucket}/{prefix}"
    Image.fromarray(person_image(120, 160, (40, 20, 80, 140))).save(tmp_path / "dancer.png")
    write_driving_video(tmp_path / "moves.mp4")
    manifest = tmp_path / "dance.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "mode", "prompt", "model", "image", "driving_video", "num_frames", "num_steps",
                    "guidance", "seed"])
        w.writerow(["dance-a", "dance", "a dancer", "tiny-dance", "dancer.png", "moves.mp4", 9, 3, "official", 1])
        w.writerow(["dance-b", "dance", "a dancer", "tiny-dance", "dancer.png", "moves.mp4", 9, 4, "fast", 2])
        w.writerow(["text-c", "t2v", "a lake", "tiny-t2v", "", "", 5, 2, "", 3])

    run_batch(stack, manifest.resolve(), sink)

    df = read_metrics(stack, bucket, prefix)
    assert df["status"].to_list() == ["succeeded"] * 3, df.select("id", "status", "error")
    dance = df.filter(pl.col("mode") == "dance")
    # Made by the batch flow on the CPU pool, taken from the sink by the shards on the GPU pool.
    assert dance["pose_reused"].to_list() == [True, True] and dance["pose_frames"].to_list() == [9, 9]
    (batch,) = flow_runs(stack, "batch", sink)
    assert batch.work_pool_name == "cpu"
    with stack.settings(), get_client(sync_client=True) as client:
        names = [t.name for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[batch.id])))]
    assert sorted(n for n in names if n.startswith("pose-ahead-")) == ["pose-ahead-dance-a", "pose-ahead-dance-b"]
    assert {r.work_pool_name for r in flow_runs(stack, "gpu-shard", sink)} == {"gpu"}

    counts = versions_per_key(stack, bucket, prefix)
    outputs = {k: n for k, n in counts.items() if not k.startswith((f"{prefix}/runs/", f"{prefix}/poses/"))}
    assert set(outputs.values()) == {1}, outputs        # every output uploaded exactly once
    assert len([k for k in outputs if k.endswith(".pose.mp4")]) == 2
    assert len([k for k in outputs if k.endswith(".mp4") and not k.endswith(".pose.mp4")]) == 3


def _assert_progress_complete(stack, sink: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (batch,) = [r for r in flow_runs(stack, "batch", sink)]
    with stack.settings(), get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[batch.id])))
    progress = [a for a in arts if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == pytest.approx(100.0)


@e2e[0]
@e2e[1]
def test_sigkilled_shard_is_resubmitted_and_finished_rows_are_not_uploaded_again(prefect_stack, tmp_path):
    stack = prefect_stack
    bucket, prefix = versioned_bucket(stack), "crash"
    sink = f"s3://{bucket}/{prefix}"
    ids = [f"crash-{i}" for i in range(3)]
    # One shard of three rows with more frames, so the shard is still busy after its first row.
    manifest = write_manifest(tmp_path / "crash.csv", ids, num_frames=17)
    batch = subprocess.Popen(
        ["prefect", "deployment", "run", "batch/batch", "--param", f"manifest={manifest}",
         "--param", f"sink={sink}", "--param", "gpus=1", "--param", "max_rows_per_shard=3",
         "--param", "shards_per_gpu=1", "--watch", "--watch-timeout", "300"],
        env=stack.env, cwd=stack.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        shard = _wait_for(lambda: [r for r in flow_runs(stack, "gpu-shard", sink)
                                   if r.state_type.value == "RUNNING" and r.infrastructure_pid], 180)[0]
        # The shard computes its rows' keys itself; its first record is the first .json to appear.
        _wait_for(lambda: _records(stack, bucket, prefix), 180, poll=0.1)
        pid = _shard_pid(shard)
        os.kill(pid, signal.SIGKILL)
        out, _ = batch.communicate(timeout=400)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, out[-4000:] + stack.worker_logs()

    runs = {r.name: r for r in flow_runs(stack, "gpu-shard", sink)}
    assert runs["shard-0-a1"].state_type.value == "CRASHED"
    assert runs["shard-0-a2"].state_type.value == "COMPLETED"

    df = read_metrics(stack, bucket, prefix)
    assert sorted(df["id"].to_list()) == ids
    assert df["attempts"].to_list() == [2, 2, 2]
    by_id = dict(zip(df["id"].to_list(), df["status"].to_list()))
    first_id = ids[shard.parameters["rows"][0]]          # rows travel as manifest positions
    assert by_id[first_id] == "skipped"                 # finished before the kill: not redone
    assert set(by_id.values()) <= {"succeeded", "skipped"}
    counts = versions_per_key(stack, bucket, prefix)
    assert len(output_keys(prefix, counts, ".mp4")) == 3
    assert {n for k, n in counts.items() if not k.startswith(f"{prefix}/runs/")} == {1}, counts


@e2e[0]
@e2e[1]
def test_engine_services_stay_warm_across_batches_and_a_sigkilled_one_is_replaced(prefect_stack, tmp_path):
    """Two batches in a row on the two GPUs' engine services: the second loads nothing and talks to
    the same processes. Then a SIGKILL of one service mid-row: that row is retried once on the
    restarted service, every row succeeds, and nothing is uploaded twice."""
    from service.client import EngineClient
    stack = prefect_stack
    services = [EngineClient(s) for s in stack.engine_sockets]
    pids = [c.wait_ready(60)["pid"] for c in services]
    bucket = versioned_bucket(stack)

    def batch(prefix: str, ids: list[str], frames: int = 9) -> pl.DataFrame:
        run_batch(stack, write_manifest(tmp_path / f"{prefix}.csv", ids, num_frames=frames),
                  f"s3://{bucket}/{prefix}", "--param", "max_rows_per_shard=2")
        return read_metrics(stack, bucket, prefix)

    first = batch("warm-a", [f"a-{i}" for i in range(4)])
    second = batch("warm-b", [f"b-{i}" for i in range(4)])
    for df in (first, second):
        assert df["status"].to_list() == ["succeeded"] * 4, df.select("id", "status", "error")
    assert second["model_load_s"].to_list() == [0.0] * 4
    assert all(s > 0 for s in second["service_s"].to_list())
    assert [c.health()["pid"] for c in services] == pids
    assert len(set(second["gpu"].to_list())) == 2

    prefix, ids = "killed", [f"k-{i}" for i in range(4)]
    manifest = write_manifest(tmp_path / "killed.csv", ids, num_frames=17)
    run = subprocess.Popen(
        ["prefect", "deployment", "run", "batch/batch", "--param", f"manifest={manifest}",
         "--param", f"sink=s3://{bucket}/{prefix}", "--param", "max_rows_per_shard=2",
         "--watch", "--watch-timeout", "300"],
        env=stack.env, cwd=stack.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for(lambda: [c for c in services if c.health()["busy"]], 180, poll=0.05)[0]
        killed = victim.health()["pid"]
        os.kill(killed, signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:] + stack.worker_logs()
    df = read_metrics(stack, bucket, prefix)
    assert sorted(df["id"].to_list()) == ids
    assert df["status"].to_list() == ["succeeded"] * 4, df.select("id", "status", "error")
    assert victim.wait_ready(60)["pid"] != killed                  # restarted by its supervisor
    assert sum(load > 0 for load in df["model_load_s"].to_list()) == 1   # the retried row reloaded
    counts = versions_per_key(stack, bucket, prefix)
    assert len(output_keys(prefix, counts, ".mp4")) == 4
    assert {n for k, n in counts.items() if not k.startswith(f"{prefix}/runs/")} == {1}, counts
    others = [c for c in services if c is not victim]
    assert [c.health()["pid"] for c in others] == [p for c, p in zip(services, pids) if c is not victim]


def _shard_pid(flow_run) -> int:
    """The shard's process: the run's infrastructure pid, checked against its environment."""
    pid = int(flow_run.infrastructure_pid)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"PREFECT__FLOW_RUN_ID={flow_run.id}".encode() in environ
    return pid


def _records(stack, bucket: str, prefix: str) -> list[str]:
    resp = stack.s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".json")
            and not o["Key"].startswith(f"{prefix}/runs/")]


def _wait_for(probe, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


@e2e[0]
@e2e[1]
def test_nightly_moves_finished_manifests_to_done(prefect_stack, tmp_path):
    stack = prefect_stack
    bucket = versioned_bucket(stack)
    client = stack.s3.client()
    manifest = write_manifest(tmp_path / "night.csv", ["night-0", "night-1"])
    client.upload_file(str(manifest), bucket, "manifests/pending/night.csv")
    client.put_object(Bucket=bucket, Key="manifests/pending/readme.txt", Body=b"not a manifest")
    sink = f"s3://{bucket}/out"

    stack.prefect("deployment", "run", "nightly/nightly",
                  "--param", f"bucket_prefix=s3://{bucket}/manifests/", "--param", f"sink={sink}",
                  "--param", "max_rows_per_shard=1", "--watch", "--watch-timeout", "300")

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="manifests/")["Contents"]}
    assert keys == {"manifests/pending/readme.txt", "manifests/done/night.csv",
                    "manifests/done/night.metrics.parquet", "manifests/done/night.metrics.csv"}
    body = client.get_object(Bucket=bucket, Key="manifests/done/night.metrics.parquet")["Body"].read()
    metrics = pl.read_parquet(io.BytesIO(body))
    assert sorted(metrics["id"].to_list()) == ["night-0", "night-1"]
    assert metrics["status"].to_list() == ["succeeded"] * 2
    assert client.get_object(Bucket=bucket, Key="manifests/done/night.csv")["Body"].read() \
        == manifest.read_bytes()


# ── fast checks of the files, no server ────────────────────────────────────────────────────────

def test_prefect_yaml_is_portable_and_never_pins_gpus():
    import yaml
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    pull = config["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $TURBO_BATCH_HOME }}"
    by_name = {d["name"]: d for d in config["deployments"]}
    assert set(by_name) == {"batch", "gpu-shard", "nightly"}
    for d in by_name.values():
        path, _, func = d["entrypoint"].partition(":")
        assert not Path(path).is_absolute() and (REPO_ROOT / path).is_file()
        assert f"def {func}(" in (REPO_ROOT / path).read_text()
        env = (d["work_pool"].get("job_variables") or {}).get("env") or {}
        assert "CUDA_VISIBLE_DEVICES" not in env
    assert by_name["gpu-shard"]["work_pool"]["name"] == "gpu"
    assert by_name["batch"]["work_pool"]["name"] == by_name["nightly"]["work_pool"]["name"] == "cpu"
    assert by_name["batch"]["parameters"]["launch"] == "deployments"
    (schedule,) = by_name["nightly"]["schedules"]
    assert schedule["cron"] and schedule["timezone"]


def test_start_workers_refuses_to_start_nothing(tmp_path):
    import subprocess
    out = subprocess.run(["bash", str(REPO_ROOT / "deployments/start-workers.sh")], capture_output=True,
                         text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "PREFECT_API_URL": "http://127.0.0.1:9/api",
                              "GPUS": "0", "CPU_WORKER": "0", "LOG_DIR": str(tmp_path)})
    assert out.returncode == 1 and "nothing to start" in out.stderr
    out = subprocess.run(["bash", str(REPO_ROOT / "deployments/start-workers.sh")], capture_output=True,
                         text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "PREFECT_API_URL" in out.stderr


@pytest.mark.parametrize("nvidia_smi", ["missing", "lists none"])
def test_start_workers_without_a_gpu_says_so(tmp_path, nvidia_smi):
    """No GPU and no GPUS: an explicit refusal (exit 1), not a silent cpu-only host; GPUS=0 asks
    for the cpu-only host explicitly. PATH holds only what the script needs, and a fake prefect."""
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("env", "dirname", "mkdir", "true", "sleep", "grep"):
        (bin_dir / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                                                   text=True, check=True).stdout.strip())
    started = tmp_path / "started"
    (bin_dir / "prefect").write_text(f'#!/bin/sh\necho "$*" >> {started}\n')
    if nvidia_smi == "lists none":
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    for name in ("prefect", "nvidia-smi"):
        if (bin_dir / name).exists():
            (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "PREFECT_API_URL": "http://127.0.0.1:9/api", "LOG_DIR": str(tmp_path / "logs"),
           "WORKER_HOST": "t"}

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/bash", str(REPO_ROOT / "deployments/start-workers.sh")],
                              capture_output=True, text=True, timeout=30, env={**env, **extra})

    out = run()     # CPU_WORKER defaults to 1: still refused
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no GPU found (nvidia-smi missing or lists none) and GPUS is not set" in out.stderr
    assert not started.exists()
    out = run(GPUS="0", CPU_WORKER="1")     # the explicit cpu-only batch host starts its cpu worker
    assert started.read_text().split("\n")[0].startswith("worker start --type process --name t-cpu --pool cpu")
    assert "no GPU found" not in out.stderr


@pytest.mark.parametrize("engine_service", ["1", "0"])
def test_start_workers_runs_several_shards_per_gpu_only_on_engine_services(tmp_path, engine_service):
    """With services a GPU worker takes SHARDS_PER_GPU shards at once (their rows queue at the
    service) and the cpu worker's batches plan for it; without, one (a second shard would load a
    second model). A fake prefect records each worker's arguments and setting, then exits, which
    stops the set."""
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("env", "dirname", "mkdir", "true", "sleep", "grep", "kill"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bin_dir / tool).symlink_to(found)
    started = tmp_path / "started"
    (bin_dir / "prefect").write_text(f'#!/bin/sh\necho "$* shards=$TURBO_SHARDS_PER_GPU" >> {started}\nsleep 1\n')
    (bin_dir / "fake-python").write_text("#!/bin/sh\nexec sleep 30\n")     # the engine service
    for name in ("prefect", "fake-python"):
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "PREFECT_API_URL": "http://127.0.0.1:9/api", "LOG_DIR": str(tmp_path / "logs"),
           "WORKER_HOST": "t", "GPUS": "1", "ENGINE_SERVICE": engine_service, "PYTHON": str(bin_dir / "fake-python"),
           "RUN_DIR": str(tmp_path / "run"), "STOP_TIMEOUT": "2"}
    subprocess.run(["/bin/bash", str(REPO_ROOT / "deployments/start-workers.sh")], capture_output=True, text=True,
                   timeout=60, env=env)
    lines = started.read_text().splitlines()
    (gpu,) = [line for line in lines if "--name t-gpu-0" in line]
    (cpu,) = [line for line in lines if "--name t-cpu" in line]
    want = "3" if engine_service == "1" else "1"
    assert gpu.endswith(f"--limit {want} shards={want}"), gpu
    assert cpu.endswith(f"shards={want}"), cpu
    bad = subprocess.run(["/bin/bash", str(REPO_ROOT / "deployments/start-workers.sh")], capture_output=True,
                         text=True, timeout=30, env={**env, "SHARDS_PER_GPU": "0"})
    assert bad.returncode == 1 and "SHARDS_PER_GPU=0: expected a number of shards" in bad.stderr


def test_host_settings_and_worker_logs_are_not_committed():
    import shutil
    import subprocess
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT).returncode == 0
    assert ignored("deployments/worker.env") and ignored("deployments/server.env")
    assert ignored("logs/ci-gpu-0.log") and ignored("logs/workers.pids")
    assert not ignored("deployments/worker.env.example")


@pytest.mark.parametrize("uri, expected", [("s3://b/manifests/", ("b", "manifests/")),
                                           ("s3://b/a/b", ("b", "a/b/")), ("s3://b", ("b", ""))])
def test_queue_prefix(uri, expected):
    from tasks.manifests_queue import split_prefix
    assert split_prefix(uri) == expected


@pytest.mark.parametrize("uri, message", [("/local/manifests", "expected s3://"),
                                          ("s3:///manifests", "names no bucket")])
def test_queue_prefix_rejects_bad_uris(uri, message):
    from tasks.manifests_queue import split_prefix
    with pytest.raises(ValueError, match=message):
        split_prefix(uri)


def test_gpu_label_names_the_pin_on_cpu(monkeypatch):
    import torch

    from tasks.generate import gpu_label
    if torch.cuda.is_available():
        pytest.skip("on a CUDA host the label names the device")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpu_label() == "cpu (CUDA_VISIBLE_DEVICES=3)"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_label() == "cpu"


def test_r2_ca_bundle_is_the_clients_verify_setting(tmp_path):
    from tasks.upload import make_s3_client_from_env
    env = {"R2_ENDPOINT_URL": "https://127.0.0.1:9", "R2_ACCESS_KEY_ID": "k", "R2_SECRET_ACCESS_KEY": "s"}
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked until a connection is made")
    with_ca = make_s3_client_from_env({**env, "R2_CA_BUNDLE": str(ca)})
    without = make_s3_client_from_env(env)
    # botocore keeps the verify setting on the endpoint's HTTP session
    assert with_ca._endpoint.http_session._verify == str(ca)
    assert without._endpoint.http_session._verify != str(ca)
