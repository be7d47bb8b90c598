"""Several worker hosts share no disk: the batch refuses, before reading anything, a manifest or sink
on its own host's disk and results kept in a local folder (flows/fanout.py)."""

from __future__ import annotations

import pickle

import pytest

from flows.fanout import require_shared_storage, worker_host
from tasks.errors import SharedStorageError

SHARED = {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/turbo-batch-results"}


@pytest.mark.parametrize("name, host", [("gpu-box-1-gpu-0", "gpu-box-1"), ("a-gpu-12", "a"),
                                        ("batch-host-cpu", "batch-host"), ("my-worker", "my-worker"),
                                        ("x-gpu-y", "x-gpu-y")])
def test_worker_names_from_start_workers_give_their_host(name, host):
    assert worker_host(name) == host


def test_one_host_may_use_its_own_disk():
    require_shared_storage(["only"], "/data/m.csv", "/srv/out", {})
    require_shared_storage([], "/data/m.csv", "/srv/out", {})


def test_two_hosts_with_everything_in_s3_pass():
    require_shared_storage(["a", "b"], "s3://b/m.csv", "s3://b/videos", SHARED)


def test_two_hosts_refuse_each_local_place_and_say_where_it_should_go():
    with pytest.raises(SharedStorageError) as e:
        require_shared_storage(["a", "b"], "/data/m.csv", "/srv/out", {})
    text = str(e.value)
    assert "2 hosts (a, b)" in text and "'/data/m.csv' is a local path" in text and "s3://" in text
    assert "the sink '/srv/out' is a local folder" in text and "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK" in text
    again = pickle.loads(pickle.dumps(e.value))           # Prefect pickles a failed flow's exception
    assert str(again) == text
    with pytest.raises(SharedStorageError, match="local path") as only_manifest:
        require_shared_storage(["a", "b"], "m.csv", "s3://b/videos", SHARED)
    assert "local folder" not in str(only_manifest.value) and "STORAGE_BLOCK" not in str(only_manifest.value)
