"""A Prefect API server owned by this process: one child that dies with it.

`turbo-batch run` used to lean on Prefect's ephemeral API, whose uvicorn outlives a SIGKILLed
CLI (~200 MB each time). `local_api_server()` starts the same server itself, as ONE process
(uvicorn on Prefect's app factory, no `prefect server start` wrapper in between), with the
settings Prefect's own `SubprocessASGIServer` passes to it (ephemeral services, no UI, the
default `$PREFECT_HOME` SQLite database), and points `PREFECT_API_URL` at it.

How the child is tied to us: on Linux the kernel sends it SIGKILL when its parent dies
(`prctl(PR_SET_PDEATHSIG)`, set between fork and exec), whatever the cause. Elsewhere that
call does not exist and the child is only stopped by the `finally`/atexit below, so a SIGKILL
of the parent still leaks it there. `start_tied_child()` is the helper; the local GPU workers
(flows/local_worker.py) are started with it too.

Caveat of PR_SET_PDEATHSIG: "parent" is the *thread* that forked. Start children from a thread
that outlives them (the main thread, or the thread that also waits for them).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
STOP_GRACE_S = 5.0
PORT_IN_USE_EXIT = 3            # uvicorn's exit status when it cannot bind


class LocalServerError(RuntimeError):
    """The local Prefect API server did not come up (the message carries its output)."""


# -- children that die with this process --------------------------------------------------------
def _death_signal_preexec() -> Any:
    """A preexec_fn that asks the kernel to SIGKILL the child when this thread dies (Linux only).

    None where prctl is missing (macOS, Windows): callers then rely on stop_child() at exit.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:   # runs in the forked child, before exec: no allocation-heavy work
        prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:   # the parent died before prctl took effect
            os._exit(1)
    return preexec


def start_tied_child(argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(argv) whose process the kernel kills when this one dies (Linux).

    It is also stopped at interpreter exit if still running, which is all there is elsewhere.
    It gets a session of its own, so a Ctrl-C in the terminal reaches only this process, which
    then stops it (SIGTERM) instead of every child printing its own KeyboardInterrupt.
    """
    popen_kwargs.setdefault("start_new_session", True)
    proc = subprocess.Popen(argv, preexec_fn=_death_signal_preexec(), **popen_kwargs)
    _children.add(proc)
    return proc


def stop_child(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM, then SIGKILL after grace_s; returns the exit status (None if it would not die)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
    _children.discard(proc)
    return proc.returncode


def _stop_children() -> None:
    for proc in list(_children):
        stop_child(proc)


_children: set[subprocess.Popen] = set()    # started by start_tied_child, not yet stopped
atexit.register(_stop_children)


# -- the server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def local_api_server(*, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """A Prefect API server child for the duration of the `with`; yields its API URL.

    If PREFECT_API_URL is already set (environment or active Prefect profile) nothing is
    started and that URL is yielded. Otherwise the server's URL is put in os.environ (and
    Prefect's settings are refreshed if Prefect is already imported) before yielding, so every
    Prefect client made inside, and every child process started inside, uses it. On exit the
    queued logs and events are sent, the server is stopped (SIGTERM, then SIGKILL after a few
    seconds) and the environment restored.
    """
    existing = _configured_api_url()
    if existing:
        yield existing
        return
    server = _ServerProcess()
    try:
        url = server.start(startup_timeout_s)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        _refresh_prefect_settings()
        try:
            yield url
        finally:
            _drain_prefect_clients()
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            _refresh_prefect_settings()
    finally:
        server.stop()


def _configured_api_url() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL  # the active profile may set it
    return PREFECT_API_URL.value() or None


def _refresh_prefect_settings() -> None:
    """Prefect snapshots settings at import; make it read os.environ again."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context
        refresh_global_settings_context()


def _drain_prefect_clients() -> None:
    """Send the logs and events still queued in this process while the server is up."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    except Exception as e:   # best effort: at worst a few log lines miss the UI
        log.debug("could not drain Prefect's log and event workers: %s", e)


def server_environment() -> dict[str, str]:
    """What Prefect's ephemeral SubprocessASGIServer sets for its uvicorn (3.9.1), plus settings
    given in this process (e.g. temporary_settings) when Prefect is already imported."""
    env = {**os.environ,
           "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1",     # ephemeral service set, telemetry says ephemeral
           "PREFECT__SERVER_FINAL": "1"}
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    env.pop("PREFECT_API_URL", None)
    return env


def server_argv(port: int) -> list[str]:
    """The uvicorn command line of Prefect's SubprocessASGIServer: one process, no reloader."""
    import importlib.util
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    app_dir = os.path.dirname(os.path.dirname(spec.origin))   # prefect.__module_path__.parent
    return [sys.executable, "-m", "uvicorn", "--app-dir", app_dir,
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ServerProcess:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.output: IO[bytes] = tempfile.TemporaryFile()   # unlinked: nothing left on SIGKILL
        self.healthy = False
        self.timed_out = False
        # Loopback only: an http_proxy in the environment must not see these requests.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        for _ in range(5):      # another process can take the free port before uvicorn binds it
            port = free_port()
            self.proc = start_tied_child(server_argv(port), env=server_environment(),
                                         stdin=subprocess.DEVNULL, stdout=self.output,
                                         stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}/api"
            if self._wait_healthy(url, deadline):
                self.healthy = True
                log.debug("Prefect API server pid %d on %s", self.proc.pid, url)
                return url
            if self.timed_out or self.proc.returncode != PORT_IN_USE_EXIT:
                break
        raise LocalServerError(f"the local Prefect API server did not start: {self._describe()}")

    def _wait_healthy(self, url: str, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self._http.open(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        self.timed_out = True
        stop_child(self.proc)
        return False

    def _describe(self) -> str:
        assert self.proc is not None
        status = ("no answer from /api/health in time" if self.timed_out
                  else f"exited with status {self.proc.returncode}")
        return f"{status}; its output:\n{self.output_tail()}"

    def output_tail(self, chars: int = 3000) -> str:
        self.output.flush()
        self.output.seek(0)
        return self.output.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None:
            died = self.proc.poll()
            if self.healthy and died is not None:      # it went away during the run
                log.warning("the local Prefect API server had exited with status %s:\n%s",
                            died, self.output_tail())
            stop_child(self.proc)
        self.output.close()
