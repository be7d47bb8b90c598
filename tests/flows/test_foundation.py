"""One house for every mode, through the shard the pools run (in-process, real parts):

- rows that differ only in attention settings share one load and one shard, and differ in output;
- inputs from s3:// (ministack behind TLS) and https:// (a loopback TLS server) are fetched,
  checked and used (a watermark image and an audio track reach the encoded video);
- bad inputs fail their row before any generation, and the other rows still succeed;
- the row key follows the checkpoint files the engine loads: same files → skipped, a replaced
  file → regenerated.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import torch

from engine import loading
from engine.attention import AttentionSpec
from engine.config import AttentionType, WanConfig
from engine.registry import get_model
from engine.umt5 import UMT5Encoder
from engine.wan_dit import WanDiT
from engine.wan_vae import WanVAE
from flows.shard import new_engine
from tasks.manifest import ManifestRow
from tasks.planning import plan_shards
from tests.s3server import _write_tls_material, run_s3_server
from tests.shards import run_shard

REPO = Path(__file__).resolve().parents[2]
TINY = WanConfig.from_name("tiny-t2v")


def _row(n: int, **fields) -> dict:
    base = dict(row=n, id=f"r{n}", mode="t2v", prompt=f"prompt {n}", model="tiny-t2v",
                num_frames=5, num_steps=1, seed=n)
    return dataclasses.asdict(ManifestRow(**{**base, **fields}))


# ── attention settings per request ───────────────────────────────────────────────────────────

def test_rows_differing_only_in_topk_share_one_shard_one_load_and_differ(tmp_path):
    same = dict(resolution="720p", num_frames=33, seed=5, prompt="the same prompt",
                attention_type="sla")
    rows = [_row(1, sla_topk=0.1, **same), _row(2, sla_topk=0.5, **same)]
    shards = plan_shards([ManifestRow(**r) for r in rows], gpus=1)
    assert len(shards) == 1 and len(shards[0].rows) == 2

    engine = new_engine()
    out = run_shard(rows, sink=str(tmp_path / "out"), engine=engine)
    assert [m["status"] for m in out] == ["succeeded", "succeeded"]
    assert engine.cache.loads == 1
    assert out[0]["sha256"] != out[1]["sha256"]
    assert out[0]["output_uri"] != out[1]["output_uri"]      # top-k is part of the row's identity


# ── inputs fetched before GPU time ───────────────────────────────────────────────────────────

class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def https_files(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """(base URL, served folder, CA file) of a loopback TLS file server."""
    root = tmp_path_factory.mktemp("served")
    ca, cert, key = _write_tls_material(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = lambda *a, **kw: _Files(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", root, ca
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with run_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def remote_env(monkeypatch, s3, https_files):
    base, _, ca = https_files
    for k, v in {"R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
                 "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path),
                 "R2_REGION": s3.region, "TURBO_FETCH_ALLOW": "127.0.0.1",
                 "TURBO_FETCH_CA_BUNDLE": str(ca)}.items():
        monkeypatch.setenv(k, v)


def _tone(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    str(path)], check=True, timeout=60)
    return path


def _streams(video: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "json",
                          str(video)], capture_output=True, text=True, check=True)
    return [s["codec_type"] for s in json.loads(out.stdout)["streams"]]


def test_s3_watermark_and_https_audio_are_fetched_checked_and_used(tmp_path, s3, https_files, remote_env):
    base, served, _ = https_files
    bucket = s3.create_bucket()
    s3.client().upload_file(str(REPO / "examples" / "logo.png"), bucket, "in/logo.png")
    _tone(served / "tone.wav")
    rows = [_row(1, watermark=f"s3://{bucket}/in/logo.png", audio=f"{base}/tone.wav")]
    [m] = run_shard(rows, sink=str(tmp_path / "out"))
    assert m["status"] == "succeeded", m["error"]
    assert m["t_fetch_s"] > 0
    video = Path(m["output_uri"].removeprefix("file://"))
    assert sorted(_streams(video)) == ["audio", "video"]      # the fetched audio was muxed in

    # The watermark's bytes are part of the identity: another logo is another row.
    s3.client().upload_file(str(REPO / "examples" / "person.png"), bucket, "in/logo.png")
    [again] = run_shard(rows, sink=str(tmp_path / "out"))
    assert again["status"] == "succeeded" and again["output_uri"] != m["output_uri"]


def test_bad_inputs_fail_their_row_before_generation(tmp_path, s3, https_files, remote_env, monkeypatch):
    base, served, _ = https_files
    (served / "notes.png").write_text("not a png at all")
    bucket = s3.create_bucket()
    monkeypatch.setenv("TURBO_FETCH_ALLOW", "127.0.0.1")
    rows = [_row(1, watermark="https://example.invalid/logo.png"),      # host not on the allowlist
            _row(2, watermark=f"{base}/notes.png"),                     # wrong magic number
            _row(3, watermark=f"{base}/missing.png"),                   # 404
            _row(4, watermark=f"s3://{bucket}/nope.png"),               # s3 404
            _row(5)]
    out = {m["id"]: m for m in run_shard(rows, sink=str(tmp_path / "out"))}
    assert out["r5"]["status"] == "succeeded"
    for rid, needle in (("r1", "allow"), ("r2", "png"), ("r3", "404"), ("r4", "not found")):
        m = out[rid]
        assert m["status"] == "invalid", m
        assert m["error"].startswith("fetch: ") and "column watermark" in m["error"], m["error"]
        assert needle in m["error"].lower(), m["error"]
        assert m["t_denoise_s"] is None                    # no GPU time was spent on it
    assert s3.secret_access_key not in json.dumps(out)


def test_size_limit_is_a_row_error(tmp_path, https_files, remote_env, monkeypatch):
    base, served, _ = https_files
    from PIL import Image
    Image.new("RGB", (64, 64), "red").save(served / "big.png")
    monkeypatch.setenv("TURBO_FETCH_MAX_WATERMARK_BYTES", "100")
    [m] = run_shard([_row(1, watermark=f"{base}/big.png")], sink=str(tmp_path / "out"))
    assert m["status"] == "invalid" and "limit" in m["error"]


# ── one identity: the files the engine loads ─────────────────────────────────────────────────

def _save_tiny_checkpoints(root: Path, vae_seed: int = 2) -> None:
    spec = get_model("tiny-t2v")
    cpu, f32 = torch.device("cpu"), torch.float32
    parts = {"dit": (lambda: WanDiT(TINY, AttentionSpec(AttentionType.SLA)), 1),
             "vae": (lambda: WanVAE(TINY.vae), vae_seed),
             "text_encoder": (lambda: UMT5Encoder(TINY.umt5), 3)}
    root.mkdir(parents=True, exist_ok=True)
    for role, (build, seed) in parts.items():
        module = loading.build_random(build, seed=seed, device=cpu, dtype=f32)
        torch.save(module.state_dict(), root / spec.file(role).name)


def test_same_checkpoints_skip_a_replaced_checkpoint_regenerates(tmp_path):
    ckpt = tmp_path / "ckpt"
    _save_tiny_checkpoints(ckpt)
    rows = [_row(1), _row(2)]
    sink = str(tmp_path / "out")
    first = run_shard(rows, sink=sink, checkpoints_dir=str(ckpt))
    assert [m["status"] for m in first] == ["succeeded"] * 2
    again = run_shard(rows, sink=sink, checkpoints_dir=str(ckpt))
    assert [m["status"] for m in again] == ["skipped"] * 2

    _save_tiny_checkpoints(ckpt, vae_seed=9)                 # a new VAE file under the same name
    third = run_shard(rows, sink=sink, checkpoints_dir=str(ckpt))
    assert [m["status"] for m in third] == ["succeeded"] * 2
    assert {m["output_uri"] for m in third}.isdisjoint(m["output_uri"] for m in first)
    # Random weights are another model again (no checkpoint folder).
    fourth = pl.DataFrame(run_shard(rows, sink=sink))
    assert set(fourth["status"]) == {"succeeded"}


def test_samples_of_one_row_overlapping_on_a_gpu_keep_their_own_work_folders(tmp_path, monkeypatch):
    """num_samples expands one row into several items with the same row number; on a GPU the
    next sample generates while the previous one is delivered, so each needs its own folder."""
    import tasks.generated
    monkeypatch.setattr(tasks.generated, "gpu_label", lambda: "cuda:0 (pretend: overlap deliveries)")
    rows = [_row(1, id=f"s-s{i}", seed=i, sample=i, num_samples=3) for i in range(3)]
    out = run_shard(rows, sink=str(tmp_path / "out"))
    assert [m["status"] for m in out] == ["succeeded"] * 3, [m["error"] for m in out]
    assert len({m["sha256"] for m in out}) == 3
