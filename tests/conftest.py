"""Suite-wide settings: GPU tests skip without CUDA; Prefect runs against a temporary home."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import pytest

# Isolate Prefect (ephemeral API, results, SQLite) from the developer's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="turbo-batch-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "true")
# The ephemeral API server's 20 s default is too short on a loaded CI machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TURBO_EMBED_CACHE", tempfile.mkdtemp(prefix="turbo-batch-text-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give Prefect's console log handlers (and plain StreamHandlers) the real stderr, warnings
    and errors only.

    They were made while pytest captured output, so they hold pytest's capture stream, which
    pytest closes on its way out. Prefect's ephemeral API server logs "Stopping temporary server"
    from an atexit hook, after that; on the closed stream it printed "--- Logging error ---" and a
    traceback at the end of every session that ran a flow. Any other late record (a log or event
    worker failing to drain) would do the same. This hook runs before pytest closes its streams.
    """
    if "prefect.logging.handlers" not in sys.modules:
        return
    real = sys.__stderr__
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            ours = type(handler) is logging.StreamHandler or type(handler).__module__.startswith("prefect.")
            if not ours or not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            if handler.stream in (sys.__stderr__, sys.__stdout__):
                continue
            if real is None:
                logger.removeHandler(handler)
                continue
            handler.acquire()
            try:
                handler.stream = real               # not setStream: it would flush the old stream
                if hasattr(handler, "console"):     # Prefect's PrefectConsoleHandler prints through rich
                    handler.console.file = real
            finally:
                handler.release()
            handler.setLevel(max(handler.level, logging.WARNING))
