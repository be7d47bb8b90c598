#!/usr/bin/env bash
# Start the Prefect process workers of one host and wait on them:
#   - one worker per GPU on the `gpu` pool, pinned by CUDA_VISIBLE_DEVICES in its own environment
#     (never in job_variables: a deployment's env would override the worker's);
#   - beside each, pinned to the same GPU, that GPU's engine service (service/server.py under
#     service/supervise.py, which restarts it when it dies): it keeps the models warm across shards
#     and batches, and the worker's shards reach it through TURBO_ENGINE_SOCKET (ENGINE_SERVICE=0:
#     no services, each shard loads its own models); ENGINE_RANDOM_WEIGHTS=1 for benchmarks;
#   - with services, each GPU worker runs SHARDS_PER_GPU (default 3) shards at once: their rows
#     queue at the service's GPU lock, so one shard's Prefect work between rows (fetch, the skip
#     check, the next shard's process start) overlaps the others' GPU work (200 rows on an H200:
#     busy 0.945 with 3, 0.919 with 2; docs/BENCHMARKS.md, pools). The batch flow plans
#     that many shards per GPU (TURBO_SHARDS_PER_GPU, exported to the cpu worker). Without
#     services, --limit 1: a second shard would load a second copy of the model;
#   - one worker on the `cpu` pool for the batch and nightly flows (CPU_WORKER=0 to skip).
# GPUs: GPUS=N overrides the count; otherwise `nvidia-smi -L`; GPUS=2 on a machine without CUDA
# gives two CPU "GPU" workers (tests, the tiny preset). With no GPU found and GPUS unset the script
# says so and exits 1; a CPU-only batch host (only the cpu worker) is asked for with GPUS=0.
# Each worker logs to $LOG_DIR/<name>.log; their pids go to $LOG_DIR/workers.pids.
# SIGINT or SIGTERM to this script is passed on to every worker as SIGINT; a worker still running
# STOP_TIMEOUT seconds later (default 60) is SIGKILLed, and so is every worker on a second signal.
# Workers start with SIGINT at its default even when this script was started with it ignored
# (`start-workers.sh &` from a non-interactive shell): a Prefect worker that inherits an ignored
# SIGINT never stops on SIGINT or SIGTERM. If one worker dies, the others are stopped and the
# script exits non-zero, so systemd or the container runtime restarts the whole set.
set -euo pipefail
set -m   # background jobs in their own process groups, with SIGINT not ignored

: "${PREFECT_API_URL:?set PREFECT_API_URL (e.g. http://prefect-server:4200/api)}"
export TURBO_BATCH_HOME="${TURBO_BATCH_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
LOG_DIR="${LOG_DIR:-$TURBO_BATCH_HOME/logs}"
HOST="${WORKER_HOST:-$(hostname -s)}"
CPU_WORKER="${CPU_WORKER:-1}"
CPU_LIMIT="${CPU_LIMIT:-4}"
GPU_POOL="${GPU_POOL:-gpu}"
CPU_POOL="${CPU_POOL:-cpu}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
ENGINE_SERVICE="${ENGINE_SERVICE:-1}"
SHARDS_PER_GPU="${SHARDS_PER_GPU:-3}"
if [[ ! "$SHARDS_PER_GPU" =~ ^[1-9][0-9]*$ ]]; then
    echo "start-workers: SHARDS_PER_GPU=$SHARDS_PER_GPU: expected a number of shards, 1 or more" >&2
    exit 1
fi
[[ "$ENGINE_SERVICE" == 0 ]] && SHARDS_PER_GPU=1
export TURBO_SHARDS_PER_GPU="$SHARDS_PER_GPU"
# Host-local by design, and named per host (a home folder shared over NFS stays safe): the
# services' sockets, inductor's compile cache (a restarted service compiles from it) and the
# text-embedding cache. A Unix socket path must stay under 108 bytes, hence a short default.
RUN_DIR="${RUN_DIR:-${TMPDIR:-/tmp}/turbo-batch-${UID:-0}}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${HOME:-/tmp}/.cache/turbo-batch/$HOST/inductor}"
export TURBO_EMBED_CACHE="${TURBO_EMBED_CACHE:-${HOME:-/tmp}/.cache/turbo-batch/$HOST/text}"
PYTHON="${PYTHON:-python3}"
# Flow runs send heartbeats (Prefect's minimum, 30 s): the zombie automation of create-pools.sh
# marks a run whose host died Crashed once they stop, and the batch resubmits it.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
mkdir -p "$LOG_DIR" "$RUN_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"   # absolute: the script changes into the checkout below

if [[ -n "${GPUS:-}" ]]; then
    if [[ ! "$GPUS" =~ ^[0-9]+$ ]]; then
        echo "start-workers: GPUS=$GPUS: expected a number of GPU workers (0 for a CPU-only host)" >&2
        exit 1
    fi
    n_gpus="$GPUS"
else
    n_gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n_gpus="$(nvidia-smi -L | grep -c '^GPU ' || true)"
    fi
    if [[ "$n_gpus" -eq 0 ]]; then
        echo "start-workers: no GPU found (nvidia-smi missing or lists none) and GPUS is not set." \
             "Set GPUS=N for N GPU workers, or GPUS=0 CPU_WORKER=1 for a CPU-only batch host." >&2
        exit 1
    fi
fi
if [[ "$n_gpus" -eq 0 && "$CPU_WORKER" == 0 ]]; then
    echo "start-workers: no GPU found (set GPUS=N) and CPU_WORKER=0: nothing to start" >&2
    exit 1
fi

# GNU env (coreutils 8.31+) puts SIGINT back to its default for the worker.
default_sigint=(--default-signal=INT)
env "${default_sigint[@]}" true 2>/dev/null || default_sigint=()

pids=()
launch() {   # launch NAME ENV... -- COMMAND...: one process in the background, logging to its own file
    local name="$1"; shift
    local envs=()
    while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
    shift
    env "${default_sigint[@]}" "${envs[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
    pids+=($!)
    echo "started $name (pid $!), log $LOG_DIR/$name.log"
}
start() {   # start NAME ENV... -- ARGS...: one Prefect process worker
    local name="$1"; shift
    local envs=()
    while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
    shift
    launch "$name" "${envs[@]}" -- prefect worker start --type process --name "$name" "$@"
}

cd "$TURBO_BATCH_HOME"      # the services run `python -m service.…` from the checkout
for ((i = 0; i < n_gpus; i++)); do
    if [[ "$ENGINE_SERVICE" != 0 ]]; then
        socket="$RUN_DIR/$HOST-engine-$i.sock"
        service_args=()
        [[ "${ENGINE_RANDOM_WEIGHTS:-0}" == 1 ]] && service_args+=(--random-weights)
        launch "$HOST-engine-$i" "CUDA_VISIBLE_DEVICES=$i" -- \
            "$PYTHON" -m service.supervise --socket "$socket" --stop-timeout "$STOP_TIMEOUT" -- "${service_args[@]}"
        start "$HOST-gpu-$i" "CUDA_VISIBLE_DEVICES=$i" "TURBO_ENGINE_SOCKET=$socket" -- --pool "$GPU_POOL" \
            --limit "$SHARDS_PER_GPU"
    else
        start "$HOST-gpu-$i" "CUDA_VISIBLE_DEVICES=$i" "TURBO_ENGINE_SOCKET=" -- --pool "$GPU_POOL" --limit 1
    fi
done
if [[ "$CPU_WORKER" != 0 ]]; then
    start "$HOST-cpu" "CUDA_VISIBLE_DEVICES=" "TURBO_ENGINE_SOCKET=" -- --pool "$CPU_POOL" --limit "$CPU_LIMIT"
fi
printf '%s\n' "${pids[@]}" >"$LOG_DIR/workers.pids"

running() {   # any worker still running?
    local pid
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    return 1
}
stop() {   # SIGINT to every worker, SIGKILL to those left after STOP_TIMEOUT s or on a second signal
    trap 'echo "second signal: killing the workers" >&2; kill -KILL "${pids[@]}" 2>/dev/null || true' INT TERM
    echo "stopping ${#pids[@]} worker(s)"
    kill -INT "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while running && ((SECONDS < deadline)); do sleep 0.5; done
    if running; then
        echo "worker(s) still running after ${STOP_TIMEOUT} s: SIGKILL" >&2
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    wait "${pids[@]}" 2>/dev/null || true
    trap - INT TERM
}
trap 'stop; exit 0' INT TERM

# Returns when the first worker exits (or a signal arrives and the trap runs).
wait -n "${pids[@]}" || true
echo "a worker exited; stopping the others" >&2
stop
exit 1
