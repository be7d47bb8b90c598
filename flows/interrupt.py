"""Ctrl-C and SIGTERM for runs on this machine: the CLI and its local GPU worker processes.

    first signal    stop starting rows: the rows running now finish, metrics are written,
                    the CLI exits 130; rows not started are recorded as interrupted
    second signal   abandon the running row at once (KeyboardInterrupt)

Signals belong to the process, so the request is process state by nature (one Event, not a
model or a setting). `arm()` is called once by the edge that owns the process (the CLI, a local
worker); deployed shards run under Prefect's own SIGTERM handling and are not armed. Prefect's
flow engine installs its own SIGTERM handler while a flow runs, so the shard flow re-installs
ours around its row loop (`rows_scope`) when armed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["arm", "requested", "rows_scope"]

_requested = threading.Event()
_armed = threading.Event()
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def arm() -> None:
    """Handle SIGINT and SIGTERM gracefully in this process from now on."""
    _armed.set()
    _install()


def requested() -> bool:
    return _requested.is_set()


@contextmanager
def rows_scope() -> Iterator[None]:
    """Our handlers around a loop of rows (they outrank Prefect's SIGTERM bridge meanwhile)."""
    if not _armed.is_set() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _install()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _install() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, _handle)


def _handle(signum: int, frame: FrameType | None) -> Any:
    if _requested.is_set():
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise KeyboardInterrupt
    _requested.set()
    name = signal.Signals(signum).name
    # Straight to the descriptor: inside a flow run, print() is captured as a log line.
    os.write(2, f"turbo-batch: {name}: finishing the rows running now, starting no more "
                f"(again to abandon them)\n".encode())
