"""Generate stage: one manifest row → frames.npy in the row's work folder.

On the worker's in-process Engine, or through the GPU's engine service (service/client.py,
TURBO_ENGINE_SOCKET), which writes the frames into the same work folder itself: frames travel
through files, never through the RPC. A row is one `generate` task run, or, for two-expert models
under the sequential policy, two: `generate-start` (up to the expert switch) for each row of a
group, then `generate-finish`.

Torch is imported only by the in-process path, so a shard that talks to a service stays light."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.generated import GenerateOutput, gpu_label, save_generation
from tasks.manifest import ManifestRow

if TYPE_CHECKING:
    from engine.family import Engine
    from service.client import EngineClient

__all__ = ["GenerateOutput", "generate", "generate_finish", "generate_start", "gpu_label", "rows_per_group",
           "run_generate", "run_generate_finish", "run_generate_start"]


def _remote(engine: Engine | EngineClient) -> EngineClient | None:
    from service.client import EngineClient
    return engine if isinstance(engine, EngineClient) else None


def _local(engine: Engine | EngineClient) -> Engine:
    return cast("Engine", engine)


def rows_per_group(engine: Engine | EngineClient, spec: Any, expected_rows: int) -> int:
    """How many rows the shard starts before finishing them (>1 only under the sequential
    expert policy); loads the model and makes its warm-up decisions for the rows to come."""
    if (client := _remote(engine)) is not None:
        return client.rows_per_group(spec, expected_rows)
    pipeline = _local(engine).pipeline(spec)
    pipeline.prepare(expected_rows)
    return pipeline.rows_per_group(expected_rows)


def run_generate(row: ManifestRow, work_dir: Path, engine: Engine | EngineClient, spec: Any, *,
                 inputs: Mapping[str, Path] | None = None, expected_rows: int = 1) -> GenerateOutput:
    """expected_rows: rows this worker will run on this model from here on (compile decision)."""
    if (client := _remote(engine)) is not None:
        return client.generate(spec, row.request(inputs), work_dir, expected_rows=expected_rows)
    import time
    t0 = time.perf_counter()
    local = _local(engine)
    local.pipeline(spec).prepare(expected_rows)
    result = local.generate(spec, row.request(inputs))
    return save_generation(result, work_dir, model_load_s=local.take_load_seconds(spec),
                           service_s=time.perf_counter() - t0)


def run_generate_start(row: ManifestRow, engine: Engine | EngineClient, spec: Any, *,
                       inputs: Mapping[str, Path] | None = None) -> object:
    """The first phase of a grouped row (conditioning, the high-noise steps): a paused row."""
    if (client := _remote(engine)) is not None:
        return client.start(spec, row.request(inputs))
    return _local(engine).start(spec, row.request(inputs))


def run_generate_finish(row: ManifestRow, work_dir: Path, engine: Engine | EngineClient, spec: Any,
                        pending: object) -> GenerateOutput:
    """The rest of a row `run_generate_start` paused: its frames in the work folder."""
    if (client := _remote(engine)) is not None:
        return client.finish(spec, pending, work_dir)
    local = _local(engine)
    return save_generation(local.finish(spec, pending), work_dir, model_load_s=local.take_load_seconds(spec))


def _engine_restarted(task, task_run, state) -> bool:
    """Retry only a row whose engine service went away under it (it is restarted by its
    supervisor; the retry waits for it): a bad request or CUDA OOM does not get better."""
    from service.client import EngineUnavailableError
    try:
        state.result()
    except EngineUnavailableError:
        return True
    except Exception:
        return False
    return False


generate = task(name="generate", task_run_name="generate-{row.id}", cache_policy=NO_CACHE,
                retries=1, retry_condition_fn=_engine_restarted)(run_generate)
# A paused row holds tensors: kept in memory between its two task runs, never persisted.
generate_start = task(name="generate-start", task_run_name="generate-start-{row.id}",
                      cache_policy=NO_CACHE, persist_result=False)(run_generate_start)
generate_finish = task(name="generate-finish", task_run_name="generate-finish-{row.id}",
                       cache_policy=NO_CACHE)(run_generate_finish)
