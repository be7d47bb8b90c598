"""Run the gpu-shard flow on given rows, the way the batch flow does: the rows saved as the
run's manifest in the sink, the shard given their positions."""

from __future__ import annotations

from typing import Any

from tasks.manifest import Manifest, ManifestRow
from tasks.runs import RunFolder, save_manifest
from tasks.upload import sink_from_uri


def run_shard(rows: list[ManifestRow] | list[dict], sink: str, **kwargs: Any) -> list[dict]:
    from flows.shard import gpu_shard
    items = [r if isinstance(r, ManifestRow) else ManifestRow(**r) for r in rows]
    key = save_manifest.fn(sink_from_uri(sink), RunFolder.new(), Manifest(items, [], [], "test"))
    return gpu_shard(manifest=key, rows=list(range(len(items))), sink=sink, **kwargs)


def latest_metrics(location: str, client: Any = None) -> Any:
    """The metrics of the latest run in a sink (a folder, or s3://bucket/prefix with `client`)."""
    from tasks.runs import read_run_metrics
    return read_run_metrics(sink_from_uri(str(location), client=client))
