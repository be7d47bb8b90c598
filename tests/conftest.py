"""Suite-wide settings: GPU tests skip without CUDA; Prefect runs against a temporary home."""

from __future__ import annotations

import os
import tempfile

import pytest

# Isolate Prefect (ephemeral API, results, SQLite) from the developer's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="turbo-batch-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "true")
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
