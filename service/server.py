"""Engine service: one long-lived process per GPU that owns that GPU's warm models.

    python -m service.server --socket /run/turbo-batch/engine-gpu-0.sock     # CUDA_VISIBLE_DEVICES=0

Prefect's process worker starts a fresh interpreter for every shard flow run, so a model loaded
there dies with the shard. This process outlives them: the shards (and `turbo-batch run
--engine-socket`) send it rows over a Unix socket, one at a time per GPU, and it keeps the
`Engine` — its model cache (least recently used evicted within the VRAM budget), its text-embedding
cache and the compiled blocks — for its whole life. Torch's inductor cache lives on disk
(TORCHINDUCTOR_CACHE_DIR, set per host by deployments/start-workers.sh), so a restarted service
compiles from cache.

The wire carries only small JSON: the load spec (model, quant_linear, lora), the request fields,
and the row's work folder. The service writes the frames to `<work_dir>/frames.npy` on the same
host and answers with the numbers (tasks/generated.py). Endpoints:

    GET  /health     pid, device, loaded models, VRAM, rows done, busy
    POST /identity   the row hash's model identity of a load spec (file digests, on this host)
    POST /group      rows per group for a spec (loads it; the compile decision)
    POST /generate   one row -> frames.npy + GenerateOutput
    POST /start      the first phase of a grouped row -> a handle (the paused row stays here)
    POST /finish     the rest of a started row -> frames.npy + GenerateOutput

Errors come back as {"error": class name, "message": …} (HTTP 422 for a request the engine
refuses, 500 otherwise); the client turns them into `EngineServiceError`. Settings come from the
environment once, here, like every edge. uvicorn and FastAPI ship with Prefect.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine.errors import RequestError, TurboBatchError
from engine.family import Engine, LoadSpec
from engine.requests import REQUEST_TYPES, GenerationRequest
from engine.settings import EngineSettings
from tasks.generated import gpu_label, save_generation

__all__ = ["EngineService", "create_app", "main", "service_settings"]

log = logging.getLogger("turbo-batch.engine-service")


class EngineService:
    """The engine and what the endpoints share: one GPU lock, the paused rows, counters."""

    def __init__(self, engine: Engine, *, checkpoints_dir: str | None, random_weights: bool):
        self.engine = engine
        self.checkpoints_dir, self.random_weights = checkpoints_dir, random_weights
        self.gpu_lock = threading.Lock()        # one row at a time on this GPU
        self.busy = False
        self.rows_done = 0
        self.busy_s = 0.0                       # seconds of GPU work (under the lock), for busy fractions
        self.last_work_start: float | None = None   # epoch seconds of the latest GPU work
        self.last_work_end: float | None = None
        self.started = time.time()
        self._specs: dict[tuple, LoadSpec] = {}
        self._pending: dict[str, tuple[LoadSpec, object]] = {}
        self._ids = itertools.count(1)

    # -- what a call names ------------------------------------------------------------------------
    def spec(self, body: dict[str, Any]) -> LoadSpec:
        want_dir, want_random = body.get("checkpoints_dir"), bool(body.get("random_weights", False))
        if want_dir and str(Path(want_dir).resolve()) != str(Path(self.checkpoints_dir or "checkpoints").resolve()):
            raise RequestError("checkpoints_dir", want_dir,
                               f"this engine service reads {self.checkpoints_dir or './checkpoints'}; "
                               "restart it with CHECKPOINTS_DIR set to that folder, or leave the parameter unset")
        if want_random != self.random_weights:
            raise RequestError("random_weights", want_random,
                               f"this engine service runs with random_weights={self.random_weights} "
                               "(start it with --random-weights for benchmarks)")
        key = (body["model"], body.get("quant_linear", "auto"), body.get("lora"))
        if key not in self._specs:
            self._specs[key] = self.engine.load_spec(key[0], key[1], lora=key[2])
        return self._specs[key]

    @staticmethod
    def request(body: dict[str, Any]) -> GenerationRequest:
        mode = body["mode"]
        if mode not in REQUEST_TYPES:
            raise RequestError("mode", mode, " | ".join(REQUEST_TYPES))
        return REQUEST_TYPES[mode](**body["request"])

    # -- the GPU ---------------------------------------------------------------------------------
    def run(self, work: Any) -> tuple[Any, float, float]:
        """work() under the GPU lock -> (its value, seconds waited for the lock, seconds it ran)."""
        t0 = time.perf_counter()
        with self.gpu_lock:
            waited = time.perf_counter() - t0
            self.busy, self.last_work_start = True, time.time()
            t1 = time.perf_counter()
            try:
                value = work()
                return value, waited, time.perf_counter() - t1
            finally:
                self.busy_s += time.perf_counter() - t1
                self.busy, self.last_work_end = False, time.time()

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        spec, request = self.spec(body["spec"]), self.request(body)

        def work():
            self.engine.pipeline(spec).prepare(int(body.get("expected_rows", 1)))
            result = self.engine.generate(spec, request)
            return result, self.engine.take_load_seconds(spec)

        (result, load_s), waited, ran = self.run(work)
        self.rows_done += 1
        out = save_generation(result, Path(body["work_dir"]), model_load_s=load_s, queue_wait_s=waited,
                              service_s=ran)
        return out.to_json()

    def group(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec(body["spec"])
        expected = int(body.get("expected_rows", 1))
        warm = self.engine.warm_pipeline(spec)
        if warm is not None and not warm.needs_prepare(expected):
            # Nothing to load or compile: answer now. Under the GPU lock this call waited for the
            # other shard's row, and the GPU then idled while this shard sent its own row.
            return {"rows_per_group": warm.rows_per_group(expected)}

        def work() -> int:
            pipeline = self.engine.pipeline(spec)
            pipeline.prepare(expected)
            return pipeline.rows_per_group(expected)

        rows, _, _ = self.run(work)
        return {"rows_per_group": rows}

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        spec, request = self.spec(body["spec"]), self.request(body)
        pending, waited, ran = self.run(lambda: self.engine.start(spec, request))
        handle = f"{os.getpid()}-{next(self._ids)}"
        self._pending[handle] = (spec, pending)
        return {"handle": handle, "queue_wait_s": waited, "service_s": ran}

    def finish(self, body: dict[str, Any]) -> dict[str, Any]:
        handle = body["handle"]
        if handle not in self._pending:
            raise RequestError("handle", handle, "a row started on this engine service (it was restarted "
                                                 "since, or the row was finished already)")
        spec, pending = self._pending.pop(handle)
        result, waited, ran = self.run(lambda: self.engine.finish(spec, pending))
        self.rows_done += 1
        return save_generation(result, Path(body["work_dir"]), model_load_s=self.engine.take_load_seconds(spec),
                               queue_wait_s=waited, service_s=ran).to_json()

    def health(self) -> dict[str, Any]:
        import torch
        dev = self.engine.device
        cuda = dev.type == "cuda"
        budget = self.engine.cache.budget_bytes
        return {"status": "ok", "pid": os.getpid(), "device": str(dev), "gpu": gpu_label(),
                "loaded": [str(k[0]) for k in self.engine.cache.keys()],   # type: ignore[index]
                "model_loads": self.engine.cache.loads, "rows_done": self.rows_done, "busy": self.busy,
                "busy_s": round(self.busy_s, 3), "last_work_start": self.last_work_start,
                "last_work_end": self.last_work_end,
                "vram_allocated_gb": round(torch.cuda.memory_allocated(dev) / 1e9, 2) if cuda else 0.0,
                "vram_reserved_gb": round(torch.cuda.memory_reserved(dev) / 1e9, 2) if cuda else 0.0,
                "vram_budget_gb": round(budget / 1e9, 2) if budget else None,
                "checkpoints_dir": self.checkpoints_dir, "random_weights": self.random_weights,
                "uptime_s": round(time.time() - self.started, 1)}


def create_app(service: EngineService) -> FastAPI:
    app = FastAPI(title="turbo-batch engine service")

    async def errors(_: Request, exc: Exception) -> JSONResponse:
        refused = isinstance(exc, RequestError | KeyError | TypeError)
        if not isinstance(exc, TurboBatchError):
            log.error("engine service: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse(status_code=422 if refused else 500,
                            content={"error": type(exc).__name__, "message": str(exc)})

    # Not one handler for Exception: Starlette answers that one and then re-raises it.
    for kind in (TurboBatchError, RuntimeError, ValueError, KeyError, TypeError, OSError, MemoryError):
        app.add_exception_handler(kind, errors)

    # Plain `def` endpoints run in uvicorn's thread pool; the GPU lock keeps rows one at a time
    # while /health answers at once.
    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.post("/identity")
    def identity(body: dict[str, Any]) -> dict[str, Any]:
        return {"identity": service.engine.model_identity(service.spec(body["spec"]))}

    @app.post("/group")
    def group(body: dict[str, Any]) -> dict[str, Any]:
        return service.group(body)

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:
        return service.generate(body)

    @app.post("/start")
    def start(body: dict[str, Any]) -> dict[str, Any]:
        return service.start(body)

    @app.post("/finish")
    def finish(body: dict[str, Any]) -> dict[str, Any]:
        return service.finish(body)

    return app


def service_settings(env: Mapping[str, str], checkpoints_dir: str | None) -> EngineSettings:
    """The engine settings of a service. It outlives its shards, so the rows of its whole life pay
    for compiling: under TURBO_COMPILE=auto it compiles on its first row (a shard's own row count,
    at most max_rows_per_shard, would never reach the threshold). TURBO_COMPILE_MIN_ROWS, when
    set, and TURBO_COMPILE=0 still rule."""
    settings = EngineSettings.from_env(env, checkpoints_dir=checkpoints_dir)
    if settings.compile_min_rows is None:
        settings = dataclasses.replace(settings, compile_min_rows=1)
    return settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    ap = argparse.ArgumentParser(description="turbo-batch engine service: one per GPU, rows over a Unix socket")
    ap.add_argument("--socket", required=True, help="Unix socket path to listen on")
    ap.add_argument("--checkpoints-dir", default=None, help="default: CHECKPOINTS_DIR or ./checkpoints")
    ap.add_argument("--random-weights", action="store_true",
                    help="real-size presets with random weights (benchmarks; needs TURBO_ALLOW_RANDOM_WEIGHTS=1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from prompts.embedding_cache import EmbeddingCache
    settings = service_settings(os.environ, args.checkpoints_dir)
    engine = Engine(settings, embedding_cache=EmbeddingCache(settings.embed_cache_dir),
                    random_weights=args.random_weights)
    service = EngineService(engine, checkpoints_dir=str(settings.checkpoints_dir) if settings.checkpoints_dir else None,
                            random_weights=args.random_weights)
    socket = Path(args.socket)
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)           # a socket file left by a killed predecessor
    log.info("engine service pid %d on %s, socket %s", os.getpid(), engine.device, socket)
    uvicorn.run(create_app(service), uds=str(socket), log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()

