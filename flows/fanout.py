"""Fan shards out and collect their metrics rows.

Local: each shard is a subflow in this process; with several GPUs, one worker process per GPU
(flows/local_worker.py, pinned with CUDA_VISIBLE_DEVICES, one warm model each) takes shards from
a queue folder and runs them as flow runs on this process's Prefect API.

Deployments: each shard is a flow run of the gpu-shard deployment, created with
`run_deployment(timeout=0, idempotency_key=…)`, a few at a time (SQLite answered 503 past about 16
concurrent creations), then awaited. A shard that ends Crashed (SIGKILL, OOM killer, segfault:
Prefect applies no retries then) or Failed is resubmitted with the next attempt number; rows it
had finished are found complete in the sink and come back as skipped, so nothing is uploaded twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
CREATE_CONCURRENCY = 4


@dataclass
class ShardSpec:
    index: int
    rows: list            # ManifestRow

    def parameters(self, common: dict[str, Any], attempt: int) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in self.rows],
                "shard": self.index, "attempt": attempt, **common}

    def failed_rows(self, error: str, attempts: int) -> list[dict]:
        """Every row of a shard that never returned (crashed, refused, its worker died)."""
        from tasks.metrics import MetricsRow
        return [MetricsRow.start(r, attempts).failed("shard", error).as_dict() for r in self.rows]


def local_gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def pool_worker_count(deployment: str) -> int:
    """Online workers of the deployment's work pool: one per GPU, so shards to plan for (0 if unknown)."""
    async def count() -> int:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            if dep.work_pool_name is None:
                return 0
            workers = await client.read_workers_for_work_pool(
                dep.work_pool_name, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
            return len(workers)
    try:
        return _run_coro(count())
    except Exception as e:   # planning still works with one shard per max_rows
        log.warning("could not count the workers of %s's pool: %s", deployment, e)
        return 0


def run_local(shard_flow: Callable[..., list[dict]], specs: list[ShardSpec], common: dict,
              n_gpus: int, *, engine: Any = None) -> list[dict]:
    """Run the shards on this machine.

    n_gpus <= 1: one after the other as subflows in this process (`engine`, if given, is the
    warm engine passed to each). More: on one worker process per GPU (flows/local_worker.py),
    each pinned with CUDA_VISIBLE_DEVICES, keeping its own warm models for all the shards it
    runs, and reporting to this process's Prefect API.
    """
    if n_gpus <= 1:
        extra = {} if engine is None else {"engine": engine}
        results: list[dict] = []
        for spec in specs:
            results += _run_one_local(shard_flow, spec, common, **extra)
        return results
    from flows import local_worker
    return local_worker.run_workers(specs, common, n_gpus,
                                    entrypoint=local_worker.entrypoint_of(shard_flow),
                                    api_url=current_api_url())


def current_api_url() -> str:
    """The Prefect API this process reports to, for child processes to use the same one
    (with Prefect's ephemeral API, the URL of the server it started)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def _run_one_local(shard_flow: Callable[..., list[dict]], spec: ShardSpec, common: dict,
                   **extra: Any) -> list[dict]:
    try:
        return shard_flow(**spec.parameters(common, attempt=1), **extra)
    except Exception as e:  # a shard-level failure (sink down, …) fails its rows, not the batch
        log.error("shard %d failed: %s", spec.index, e)
        return spec.failed_rows(f"shard {spec.index} failed: {e}", 1)


def run_deployments(deployment: str, specs: list[ShardSpec], common: dict, *,
                    max_attempts: int = 3, poll_s: float = 2.0) -> list[dict]:
    return _run_coro(_run_deployments(deployment, specs, common, max_attempts, poll_s))


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _run_coro(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, in a fresh thread if a loop already runs here."""
    return asyncio.run(coro) if not _in_event_loop() else _run_in_thread(coro)


def _run_in_thread(coro: Any) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    # Carry the flow-run context (batch run id, artifact owner) into the thread.
    t = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _run_deployments(deployment: str, specs: list[ShardSpec], common: dict,
                           max_attempts: int, poll_s: float) -> list[dict]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    batch_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else f"adhoc-{time.time_ns()}"
    progress = await _Progress.create(sum(len(s.rows) for s in specs))
    results: list[dict] = []
    sem = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one_shard(spec: ShardSpec) -> None:
        for attempt in range(1, max_attempts + 1):
            flow_run = await _submit(deployment, spec, common, attempt, batch_id, sem)
            state = await _wait(flow_run.id, poll_s,
                                on_poll=lambda n: progress.shard_rows(spec.index, n))
            if state.is_completed():
                rows = await state.aresult()
                results.extend(rows)
                await progress.shard_rows(spec.index, len(spec.rows))
                return
            log.warning("shard %d attempt %d ended %s: %s", spec.index, attempt, state.type.value,
                        state.message)
            last = f"shard {spec.index} ended {state.type.value} {attempt} time(s): {state.message}"
        results.extend(spec.failed_rows(last, max_attempts))
        await progress.shard_rows(spec.index, len(spec.rows))

    await asyncio.gather(*(one_shard(s) for s in specs))
    return results


async def _submit(deployment: str, spec: ShardSpec, common: dict, attempt: int, batch_id: str,
                  sem: asyncio.Semaphore):
    # The a-prefixed API: the plain names dispatch on the caller's flow, and batch_flow is sync.
    from prefect.deployments.flow_runs import arun_deployment

    async with sem:   # bounded concurrent creations: SQLite locks up past ~16
        return await arun_deployment(
            deployment, parameters=spec.parameters(common, attempt), timeout=0,
            idempotency_key=f"{batch_id}:shard-{spec.index}:attempt-{attempt}",
            flow_run_name=f"shard-{spec.index}-a{attempt}")


async def _wait(flow_run_id, poll_s: float, on_poll: Callable[[int], Any] | None = None):
    """Poll until the run is final; between polls, pass on how many of its rows have finished."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run.state
            if on_poll is not None:
                await on_poll(await _rows_finished(client, flow_run_id))
            await asyncio.sleep(poll_s)


async def _rows_finished(client: Any, flow_run_id: Any) -> int:
    """Rows of a running shard that are done: deliver task runs that ended, generate runs that failed.

    Rows the shard skips (already in the sink) run no task and are counted when the shard ends.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    try:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))))
    except Exception:   # progress is best effort; the wait goes on
        return 0
    return sum(1 for r in runs if r.name.startswith("deliver-")
               or (r.name.startswith("generate-") and r.state_type != StateType.COMPLETED))


class _Progress:
    """A Prefect progress artifact on the batch run: rows finished over all shards."""

    def __init__(self, total: int, artifact_id: Any):
        self.total, self.artifact_id = total, artifact_id
        self.per_shard: dict[int, int] = {}
        self.reported = -1

    @classmethod
    async def create(cls, total: int) -> _Progress:
        from prefect.artifacts import acreate_progress_artifact
        try:
            aid = await acreate_progress_artifact(progress=0.0, key="batch-progress",
                                                  description=f"rows finished of {total}")
        except Exception:   # outside a flow run there is nothing to attach it to
            aid = None
        return cls(total, aid)

    @property
    def done(self) -> int:
        return sum(self.per_shard.values())

    async def shard_rows(self, shard: int, finished: int) -> None:
        """Shard `shard` has finished `finished` rows (never goes back: a resubmitted shard
        starts its count over, but the rows it finished before stay finished)."""
        from prefect.artifacts import aupdate_progress_artifact
        self.per_shard[shard] = max(self.per_shard.get(shard, 0), finished)
        if self.artifact_id is not None and self.done != self.reported:
            self.reported = self.done
            await aupdate_progress_artifact(self.artifact_id,
                                            progress=100.0 * self.done / max(self.total, 1))
