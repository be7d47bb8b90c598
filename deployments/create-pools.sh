#!/usr/bin/env bash
# Create (or update) the work pools and queues turbo-batch deploys to. Safe to run again.
#   cpu: the batch and nightly flows (they only plan, wait and merge)
#   gpu: gpu-shard flow runs; one worker per GPU, each with --limit 1
# Optional: GPU_POOL_LIMIT caps running shards pool-wide (default: no cap, the workers' limits rule).
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (e.g. http://prefect-server:4200/api)}"

for pool in cpu gpu; do
    if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
        echo "work pool $pool exists"
    else
        prefect work-pool create "$pool" --type process
    fi
done

# A priority queue on the gpu pool: shards sent there with
# run_deployment(..., work_queue_name="urgent") are picked up before those on `default`.
# (Creating a priority-1 queue renumbers the existing queues' priorities; that is expected.)
if ! prefect work-queue inspect urgent --pool gpu >/dev/null 2>&1; then
    prefect work-queue create urgent --pool gpu --priority 1
fi

if [[ -n "${GPU_POOL_LIMIT:-}" ]]; then
    prefect work-pool set-concurrency-limit gpu "$GPU_POOL_LIMIT"
fi

# Runs whose host died stay Running unless their missing heartbeats mark them Crashed (the batch
# then resubmits the shard): an automation on the server, created or updated here.
python3 "$(dirname "${BASH_SOURCE[0]}")/create-zombie-automation.py"
