"""Row identity (tasks/identity.py): what changes the hash, what does not, and stability."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.family import Engine
from engine.registry import get_model
from engine.settings import EngineSettings
from tasks.identity import RECIPE_VERSION, output_key, row_hash, row_key
from tasks.manifest import ManifestRow, read_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
ENGINE = Engine(EngineSettings())
TINY_ID = ENGINE.model_identity(ENGINE.load_spec("tiny-t2v"))


def base_row() -> ManifestRow:
    return read_manifest(EXAMPLES / "tiny.csv", env={}).rows[0]


# One changed value per field; each must be a valid value different from base_row()'s.
CHANGES: dict[str, object] = {
    "prompt": "A different prompt",
    "mode": "i2v",
    "resolution": "720p",
    "aspect_ratio": "9:16",
    "num_frames": 13,
    "num_steps": 2,
    "seed": 99,
    "sigma_max": 40.0,
    "attention_type": "sla",
    "sla_topk": 0.2,
    "quant_linear": "true",
    "fps": 12,
    "interpolate_fps": 30,
    "upscale": 2.0,
    "watermark": "hello",
    "preview": True,
    "audio": "s3://bucket/tone.wav",
    "image": "s3://bucket/cat.png",
    "driving_video": "s3://bucket/moves.mp4",
}


def test_every_field_changes_the_hash() -> None:
    row = base_row()
    base = row_hash(row, TINY_ID)
    hashes = {"base": base}
    for field, value in CHANGES.items():
        assert getattr(row, field) != value, field
        hashes[field] = row_hash(dataclasses.replace(row, **{field: value}), TINY_ID)
        assert hashes[field] != base, field
    hashes["model"] = row_hash(row, "wan2.1-t2v-1.3b|a.pth:1:2")
    assert len(set(hashes.values())) == len(hashes)  # all different from each other too


def test_hash_ignores_id_row_number_output_name_and_sample() -> None:
    row = base_row()
    renamed = dataclasses.replace(row, id="other", row=42, output_name="elsewhere", sample=3,
                                  num_samples=7)
    assert row_hash(renamed, TINY_ID) == row_hash(row, TINY_ID)


def test_row_order_does_not_change_hashes(tmp_path: Path) -> None:
    lines = (EXAMPLES / "tiny.csv").read_text().splitlines()
    header, body = lines[0], lines[1:]
    (tmp_path / "reversed.csv").write_text("\n".join([header, *reversed(body)]) + "\n")
    forward = {r.id: row_hash(r, TINY_ID) for r in read_manifest(EXAMPLES / "tiny.csv").rows}
    backward = {r.id: row_hash(r, TINY_ID) for r in read_manifest(tmp_path / "reversed.csv").rows}
    assert forward == backward and len(set(forward.values())) == len(forward)


def test_hash_is_stable_across_processes() -> None:
    code = ("from engine.family import Engine\nfrom engine.settings import EngineSettings\n"
            "from tasks.identity import row_hash\n"
            "from tasks.manifest import read_manifest\n"
            "e = Engine(EngineSettings())\n"
            "rows = read_manifest('examples/tiny.csv', env={}).rows\n"
            "print(' '.join(row_hash(r, e.model_identity(e.load_spec(r.model))) for r in rows))\n")
    outputs = []
    for hash_seed in ("1", "12345"):  # different str hashing / dict iteration per process
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                              text=True, check=True, timeout=120)
        outputs.append(done.stdout.split())
    here = [row_hash(r, TINY_ID) for r in read_manifest(EXAMPLES / "tiny.csv").rows]
    assert outputs[0] == outputs[1] == here
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in here)


def test_local_inputs_enter_by_content(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(EXAMPLES / "logo.png", tmp_path / name / "logo.png")
    row = base_row()
    at_a = dataclasses.replace(row, watermark=str(tmp_path / "a" / "logo.png"))
    at_b = dataclasses.replace(row, watermark=str(tmp_path / "b" / "logo.png"))
    assert row_hash(at_a, TINY_ID) == row_hash(at_b, TINY_ID)  # moved, same bytes
    (tmp_path / "b" / "logo.png").write_bytes((EXAMPLES / "person.png").read_bytes())
    assert row_hash(at_a, TINY_ID) != row_hash(at_b, TINY_ID)  # same path, new bytes


def test_output_key() -> None:
    row = dataclasses.replace(base_row(), output_name="cat-video")
    digest = row_hash(row, TINY_ID)
    key = output_key(row, digest)
    assert key == "cat-video-" + digest[:12]
    assert re.fullmatch(r"cat-video-[0-9a-f]{12}", key)


def test_model_identity_random_init() -> None:
    assert TINY_ID == "tiny-t2v/random-init-seed-20260101"
    # a folder without the tiny files: still the seeded random weights
    spec = Engine(EngineSettings(checkpoints_dir=Path("/nonexistent"))).load_spec("tiny-t2v")
    assert ENGINE.model_identity(spec) == TINY_ID


def _real_files(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for f in get_model("wan2.1-t2v-1.3b").files:
        path = root / f.name
        if f.folder:
            path.mkdir(parents=True)
            (path / "tokenizer.json").write_text("{}")
        else:
            path.write_bytes(f.name.encode())


def test_model_identity_uses_names_sizes_and_content_digests(tmp_path: Path) -> None:
    _real_files(tmp_path)
    engine = Engine(EngineSettings(checkpoints_dir=tmp_path, digest_cache_dir=tmp_path / "digests"))
    spec = engine.load_spec("wan2.1-t2v-1.3b")
    first = engine.model_identity(spec)
    dit = tmp_path / "TurboWan2.1-T2V-1.3B-480P.pth"
    assert f"dit=TurboWan2.1-T2V-1.3B-480P.pth:{dit.stat().st_size}:sha256:" in first
    assert (tmp_path / "TurboWan2.1-T2V-1.3B-480P.pth.sha256").is_file()     # cached beside the file

    os.utime(dit, ns=(2_000_000_000, 2_000_000_000))          # touched: same bytes, same identity
    assert engine.model_identity(engine.load_spec("wan2.1-t2v-1.3b")) == first
    dit.write_bytes(b"Y" * dit.stat().st_size)                # replaced: same size, new bytes
    os.utime(dit, ns=(2_000_000_000, 2_000_000_000))
    assert engine.model_identity(engine.load_spec("wan2.1-t2v-1.3b")) != first


def test_digest_record_goes_to_the_cache_folder_when_it_cannot_go_beside(tmp_path: Path) -> None:
    _real_files(tmp_path / "ro")
    # A folder where the record file would go: unwritable there even for root (CI runs as root,
    # which ignores a read-only mode).
    (tmp_path / "ro" / "Wan2.1_VAE.pth.sha256").mkdir()
    engine = Engine(EngineSettings(checkpoints_dir=tmp_path / "ro", digest_cache_dir=tmp_path / "d"))
    first = engine.model_identity(engine.load_spec("wan2.1-t2v-1.3b"))
    assert len(list((tmp_path / "d").glob("*.json"))) == 1
    assert engine.model_identity(engine.load_spec("wan2.1-t2v-1.3b")) == first


def test_row_key_runs_on_the_engine_and_follows_the_files(tmp_path: Path) -> None:
    row = dataclasses.replace(base_row(), model="wan2.1-t2v-1.3b")
    _real_files(tmp_path)
    engine = Engine(EngineSettings(checkpoints_dir=tmp_path))
    key = row_key(row, engine, engine.load_spec(row.model))
    assert key == row_key(row, engine, engine.load_spec(row.model))
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"other vae bytes")
    assert row_key(row, engine, engine.load_spec(row.model)) != key


def test_fetched_input_digests_win_over_the_reference() -> None:
    row = dataclasses.replace(base_row(), watermark="s3://b/logo.png")
    a = row_hash(row, TINY_ID, {"watermark": "sha256:" + "a" * 64})
    b = row_hash(row, TINY_ID, {"watermark": "sha256:" + "b" * 64})
    assert a != b and a == row_hash(row, TINY_ID, {"watermark": "sha256:" + "a" * 64})


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="model"):
        ENGINE.load_spec("wan9-t2v-99b")


def test_recipe_version_changes_every_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.identity
    row = base_row()
    before = row_hash(row, TINY_ID)
    monkeypatch.setattr(tasks.identity, "RECIPE_VERSION", RECIPE_VERSION + 1)
    assert row_hash(row, TINY_ID) != before


def test_tiny_identity_follows_the_engine_weight_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.family
    assert str(engine.family.WEIGHT_SEED) in TINY_ID
    monkeypatch.setattr(engine.family, "WEIGHT_SEED", engine.family.WEIGHT_SEED + 1)
    assert ENGINE.model_identity(ENGINE.load_spec("tiny-t2v")) != TINY_ID
