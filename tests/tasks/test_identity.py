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

from engine.config import PRESETS
from tasks.identity import RECIPE_VERSION, model_identity, output_key, row_hash
from tasks.manifest import ManifestRow, read_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TINY_ID = model_identity("tiny-t2v", None)


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
    code = ("from tasks.identity import model_identity, row_hash\n"
            "from tasks.manifest import read_manifest\n"
            "rows = read_manifest('examples/tiny.csv', env={}).rows\n"
            "print(' '.join(row_hash(r, model_identity(r.model, None)) for r in rows))\n")
    outputs = []
    for hash_seed in ("1", "12345"):  # different str hashing / dict iteration per process
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                              text=True, check=True, timeout=120)
        outputs.append(done.stdout.split())
    here = [row_hash(r, model_identity(r.model, None)) for r in read_manifest(EXAMPLES / "tiny.csv").rows]
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
    identity = model_identity("tiny-t2v", Path("/nonexistent"))
    assert identity == model_identity("tiny-t2v", None)
    assert "tiny-t2v" in identity


def test_model_identity_real_preset_uses_file_stats(tmp_path: Path) -> None:
    config = PRESETS["wan2.1-t2v-1.3b"]
    names_only = model_identity(config.name, tmp_path)
    for name in (config.files.dit, config.files.dit_quant, config.files.vae, config.files.text_encoder):
        assert name in names_only
    assert names_only == model_identity(config.name, None)

    dit = tmp_path / config.files.dit
    dit.write_bytes(b"x" * 10)
    os.utime(dit, ns=(1_000_000_000, 1_000_000_000))
    with_file = model_identity(config.name, tmp_path)
    assert with_file != names_only
    assert f"{config.files.dit}:10:1000000000" in with_file

    os.utime(dit, ns=(2_000_000_000, 2_000_000_000))          # touched
    touched = model_identity(config.name, tmp_path)
    dit.write_bytes(b"x" * 11)
    os.utime(dit, ns=(2_000_000_000, 2_000_000_000))          # same mtime, other size
    resized = model_identity(config.name, tmp_path)
    assert len({with_file, touched, resized}) == 3


def test_model_identity_unknown_model() -> None:
    with pytest.raises(ValueError, match="model"):
        model_identity("wan9-t2v-99b", None)


def test_recipe_version_changes_every_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.identity
    row = base_row()
    before = row_hash(row, TINY_ID)
    monkeypatch.setattr(tasks.identity, "RECIPE_VERSION", RECIPE_VERSION + 1)
    assert row_hash(row, TINY_ID) != before


def test_tiny_identity_follows_the_engine_weight_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.pipeline
    before = model_identity("tiny-t2v", None)
    assert str(engine.pipeline.WEIGHT_SEED) in before
    monkeypatch.setattr(engine.pipeline, "WEIGHT_SEED", engine.pipeline.WEIGHT_SEED + 1)
    assert model_identity("tiny-t2v", None) != before
