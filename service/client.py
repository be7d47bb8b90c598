"""The shard's side of the engine service: what RowRunner needs of an Engine, over a Unix socket.

    client = EngineClient("/run/turbo-batch/engine-gpu-0.sock")
    client.wait_ready(120)                 # bounded: a service that stays down fails the shard
    spec = client.load_spec("wan2.1-t2v-1.3b")
    out = client.generate(spec, row.request(), work_dir)     # frames in work_dir/frames.npy

No torch here: a shard that talks to a service imports neither torch nor the engine's models.
A service that is not answering, or dies during a row (connection refused, reset, closed), is
`EngineUnavailableError` (transient): the generate task retries it once, after waiting for the
supervisor to bring the service back. Any error the service reports is `EngineServiceError`
with the class and message it had there.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tasks.errors import EngineServiceError, EngineUnavailableError
from tasks.generated import GenerateOutput

__all__ = ["EngineClient", "PendingRow", "RemoteSpec"]


@dataclass(frozen=True)
class RemoteSpec:
    """What selects the loaded weights, as the service resolves it on its host."""
    model: str
    quant_linear: str = "auto"
    lora: str | None = None
    checkpoints_dir: str | None = None
    random_weights: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PendingRow:
    """A row started on the service (sequential expert policy); its tensors stay there."""
    handle: str
    socket: str


class EngineClient:
    def __init__(self, socket: str | Path, *, checkpoints_dir: str | None = None, random_weights: bool = False,
                 wait_s: float = 120.0, connect_timeout_s: float = 5.0):
        self.socket = str(socket)
        self.checkpoints_dir, self.random_weights = checkpoints_dir, random_weights
        self.wait_s = wait_s
        # No read timeout: a 40-step dance row runs for minutes. A dead service closes the socket.
        self._timeout = httpx.Timeout(None, connect=connect_timeout_s)
        self._identities: dict[RemoteSpec, str] = {}

    # -- the service's state ---------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def wait_ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The service's health once it answers; EngineUnavailableError after `timeout_s`."""
        deadline = time.monotonic() + (self.wait_s if timeout_s is None else timeout_s)
        while True:
            try:
                return self.health()
            except EngineUnavailableError as e:
                if time.monotonic() >= deadline:
                    raise EngineUnavailableError(
                        f"engine service at {self.socket} not answering after "
                        f"{self.wait_s if timeout_s is None else timeout_s:.0f} s ({e}); is "
                        "deployments/start-workers.sh running on this host?") from None
                time.sleep(0.5)

    # -- what RowRunner calls (the same names as engine.family.Engine) ----------------------------
    def load_spec(self, model: str, quant_linear: str = "auto", lora: str | None = None) -> RemoteSpec:
        return RemoteSpec(model, quant_linear, lora, self.checkpoints_dir, self.random_weights)

    def model_identity(self, spec: RemoteSpec) -> str:
        if spec not in self._identities:
            self._identities[spec] = self._call("POST", "/identity", {"spec": spec.to_json()})["identity"]
        return self._identities[spec]

    def rows_per_group(self, spec: RemoteSpec, expected_rows: int) -> int:
        return int(self._call("POST", "/group", {"spec": spec.to_json(), "expected_rows": expected_rows})
                   ["rows_per_group"])

    def generate(self, spec: RemoteSpec, request: Any, work_dir: Path, *, expected_rows: int = 1) -> GenerateOutput:
        self.wait_ready()                   # after a restart: the retry waits here, bounded
        body = {"spec": spec.to_json(), **_request_json(request), "work_dir": str(work_dir),
                "expected_rows": expected_rows}
        return GenerateOutput.from_json(self._call("POST", "/generate", body))

    def start(self, spec: RemoteSpec, request: Any) -> PendingRow:
        self.wait_ready()
        answer = self._call("POST", "/start", {"spec": spec.to_json(), **_request_json(request)})
        return PendingRow(answer["handle"], self.socket)

    def finish(self, spec: RemoteSpec, pending: object, work_dir: Path) -> GenerateOutput:
        if not isinstance(pending, PendingRow):
            raise TypeError(f"finish takes the PendingRow start returned, not {type(pending).__name__}")
        answer = self._call("POST", "/finish", {"spec": spec.to_json(), "handle": pending.handle,
                                                "work_dir": str(work_dir)})
        return GenerateOutput.from_json(answer)

    # -- the wire ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=self._timeout) as http:
                response = http.request(method, f"http://engine{path}", json=body)
        except (httpx.TransportError, OSError) as e:   # refused, reset, closed mid-row: the service is gone
            raise EngineUnavailableError(f"engine service at {self.socket}: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            try:
                data = response.json()
                raise EngineServiceError(str(data.get("error", "error")), str(data.get("message", "")))
            except ValueError:
                raise EngineServiceError(f"HTTP {response.status_code}", response.text[:500]) from None
        return dict(response.json())


def _request_json(request: Any) -> dict[str, Any]:
    from engine.requests import REQUEST_TYPES  # plain dataclasses, no torch
    mode = next(m for m, cls in REQUEST_TYPES.items() if type(request) is cls)
    return {"mode": mode, "request": dataclasses.asdict(request)}
