"""i2v rows in a manifest: the i2v columns, per-mode defaults, image checks and row identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from engine import conditioning
from engine.config import WanConfig
from engine.requests import I2VRequest, T2VRequest
from tasks.fetch import FetchSettings, run_fetch
from tasks.identity import RECIPE_VERSION, row_hash
from tasks.inputs import InputError, check_image
from tasks.manifest import GENERATION_COLUMNS, INPUT_COLUMNS, Manifest, ManifestRow, read_manifest
from tests.s3server import S3TestServer

MODEL_ID = "tiny-i2v/random-init-seed-20260101"
HEADER = "id,mode,prompt,model,image,sigma_max,boundary,adaptive_resolution,resolution,num_frames\n"


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TURBO_STEPS", "ATTENTION_TYPE", "SLA_TOPK", "TURBO_MODEL"):
        monkeypatch.delenv(name, raising=False)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width × height but whose pixel data is a few bytes: it opens (the
    header parses) and cannot decode, so a size error proves the size was checked first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    """A good image and the four kinds of bad one, in the manifest's folder."""
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "cat.png")
    (tmp_path / "notes.png").write_text("hello, I am a text file with a .png name\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    (tmp_path / "bomb.png").write_bytes(_png_header(9000, 8000))          # 72 MP > 64 MP
    return {p.stem: p for p in tmp_path.glob("*.png")}


def _manifest(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


# ── columns and defaults ────────────────────────────────────────────────────────────────────────

def test_i2v_defaults_are_the_i2v_request_s(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,,,,9",
                     "b,t2v,a dog,tiny-t2v,,,,,,9")
    manifest = read_manifest(path, env={})
    assert manifest.errors == []
    i2v, t2v = manifest.rows
    assert (i2v.sigma_max, i2v.boundary, i2v.adaptive_resolution, i2v.resolution) == (200.0, 0.9, True, "720p")
    assert i2v.image == str(images["cat"])
    assert t2v.sigma_max == 80.0    # t2v defaults unchanged
    defaults = I2VRequest(prompt="x")
    assert (i2v.sigma_max, i2v.boundary, i2v.adaptive_resolution) == (
        defaults.sigma_max, defaults.boundary, defaults.adaptive_resolution)


def test_i2v_default_model_is_the_a14b(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,,cat.png,,,,,9")
    [row] = read_manifest(path, env={}).rows
    assert (row.model, row.resolution, row.sigma_max) == ("wan2.2-i2v-a14b", "720p", 200.0)


def test_i2v_explicit_values(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,150,0.5,no,480p,9",
                     "b,i2v,a cat,tiny-i2v,cat.png,,0.875,TRUE,,9")
    manifest = read_manifest(path)
    assert manifest.errors == []
    a, b = manifest.rows
    assert (a.sigma_max, a.boundary, a.adaptive_resolution, a.resolution) == (150.0, 0.5, False, "480p")
    assert (b.sigma_max, b.boundary, b.adaptive_resolution) == (200.0, 0.875, True)


def test_i2v_columns_from_run_params_apply_to_i2v_rows_only(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,,,,9", "b,t2v,a dog,tiny-t2v,,,,,,9")
    manifest = read_manifest(path, run_params={"boundary": 0.7, "adaptive_resolution": "false"})
    assert manifest.errors == []
    a, b = manifest.rows
    assert (a.boundary, a.adaptive_resolution) == (0.7, False)
    assert (b.boundary, b.adaptive_resolution) == (0.9, True)   # unused dataclass defaults
    request = b.request()
    assert type(request) is T2VRequest and not hasattr(request, "boundary")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "x", "-0.1", "nan"])
def test_bad_boundary(tmp_path: Path, images: dict[str, Path], value: str) -> None:
    path = _manifest(tmp_path, f"a,i2v,a cat,tiny-i2v,cat.png,,{value},,,9",
                     "b,i2v,a cat,tiny-i2v,cat.png,,,,,9")
    manifest = read_manifest(path)
    [error] = manifest.errors
    assert (error.row, error.id, error.column, error.value) == (1, "a", "boundary", value)
    assert error.reason.startswith("must be a number")
    assert [r.id for r in manifest.rows] == ["b"]


def test_bad_adaptive_resolution(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,,maybe,,9")
    [error] = read_manifest(path).errors
    assert (error.column, error.value) == ("adaptive_resolution", "maybe")
    assert "true/false" in error.reason


def test_every_bad_i2v_field_is_reported(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,-5,1.5,maybe,1080p,80")
    errors = {e.column: e for e in read_manifest(path).errors}
    assert set(errors) == {"sigma_max", "boundary", "adaptive_resolution", "resolution", "num_frames"}
    assert errors["boundary"].value == "1.5" and "(0, 1)" in errors["boundary"].reason


@pytest.mark.parametrize("column, value", [("boundary", "0.5"), ("adaptive_resolution", "false")])
def test_t2v_row_setting_an_i2v_column_is_refused(tmp_path: Path, column: str, value: str) -> None:
    path = _manifest(tmp_path, f"a,t2v,a dog,tiny-t2v,{value}", "b,t2v,a dog,tiny-t2v,",
                     header=f"id,mode,prompt,model,{column}\n")
    manifest = read_manifest(path)
    [error] = manifest.errors
    assert (error.row, error.column, error.value) == (1, column, value)
    assert f"{column} is for mode i2v only" in error.reason and "t2v" in error.reason
    assert [r.id for r in manifest.rows] == ["b"]


# ── images ──────────────────────────────────────────────────────────────────────────────────────

BAD_IMAGES = {
    "notes": ["not a readable image"],
    "empty": ["empty file (0 bytes)"],
    "dot": ["1×1", "2×2"],
    "bomb": ["9000×8000", "64,000,000 pixels", "not decoded"],
}


def test_bad_images_fail_their_row_only(tmp_path: Path, images: dict[str, Path]) -> None:
    bad = list(BAD_IMAGES)
    path = _manifest(tmp_path, "good,i2v,a cat,tiny-i2v,cat.png,,,,,9",
                     *(f"{name},i2v,a cat,tiny-i2v,{name}.png,,,,,9" for name in bad),
                     "text,t2v,a dog,tiny-t2v,,,,,,9")
    manifest = read_manifest(path)
    assert [r.id for r in manifest.rows] == ["good", "text"]
    assert [(e.row, e.id, e.column, e.value) for e in manifest.errors] == [
        (number, name, "image", f"{name}.png") for number, name in enumerate(bad, start=2)]
    for error in manifest.errors:
        for words in BAD_IMAGES[error.id or ""]:
            assert words in error.reason, str(error)


def test_pillow_decompression_bomb_is_refused_with_the_limit(tmp_path: Path) -> None:
    # 20000 × 10000 is over twice Pillow's own limit: open() refuses it before we see the size
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 10000))
    with pytest.raises(InputError, match="over the limit of 64,000,000 pixels"):
        check_image(tmp_path / "huge.png")


def test_pixel_limit_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    assert check_image(tmp_path / "small.png") == (20, 20)
    monkeypatch.setattr(conditioning, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match=r"20×20 pixels .* over the limit of 100 pixels"):
        check_image(tmp_path / "small.png")


def test_only_the_pipeline_s_formats(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.ppm")
    with pytest.raises(InputError, match="not a readable image .*expected PNG, JPEG, WebP"):
        check_image(tmp_path / "a.ppm")
    for ext in ("jpg", "webp", "gif", "bmp", "tiff"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"a.{ext}")
        assert check_image(tmp_path / f"a.{ext}") == (8, 8), ext


@pytest.mark.parametrize("name", ["dot", "bomb", "notes"])
def test_fetch_stage_gives_the_same_answer(tmp_path: Path, images: dict[str, Path], name: str) -> None:
    """A remote image is checked by the fetch stage with the same check_image (here a local file
    with decode_local=True, which takes the same path as a download)."""
    with pytest.raises(InputError) as manifest_side:
        check_image(images[name])
    if name == "notes":   # no image magic: refused by the fetch stage's sniff before decoding
        expected = "wrong file type"
    else:
        expected = manifest_side.value.reason
    row = ManifestRow(row=3, id="r3", mode="i2v", prompt="x", model="tiny-i2v", image=str(images[name]))
    with pytest.raises(InputError) as fetched:
        run_fetch(row, tmp_path / "work", FetchSettings(decode_local=True))
    assert expected in str(fetched.value)
    assert list((tmp_path / "work" / "inputs").iterdir()) == []


def test_fetch_stage_refuses_a_small_s3_image(tmp_path: Path, images: dict[str, Path],
                                              s3_server: S3TestServer, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="dot.png", Body=images["dot"].read_bytes())
    row = ManifestRow(row=3, id="r3", mode="i2v", prompt="x", model="tiny-i2v",
                      image=f"s3://{s3_bucket}/dot.png")
    with pytest.raises(InputError, match="1×1 pixels, under the minimum of 2×2"):
        run_fetch(row, tmp_path / "work", FetchSettings(), s3_client=client)


# ── request and identity ────────────────────────────────────────────────────────────────────────

def test_request_of_an_i2v_row(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,0.8,false,,9")
    [row] = read_manifest(path).rows
    fetched = tmp_path / "work" / "inputs" / "image.png"
    request = row.request({"image": fetched})
    assert type(request) is I2VRequest
    assert (request.image, request.boundary, request.adaptive_resolution, request.sigma_max) == (
        str(fetched), 0.8, False, 200.0)
    assert (request.prompt, request.num_frames, request.resolution) == ("a cat", 9, "720p")
    assert request.validated(WanConfig.from_name("tiny-i2v")) == request   # already normalised


def test_i2v_fields_survive_the_manifest_round_trip(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,0.8,false,,9")
    manifest = read_manifest(path)
    assert Manifest.from_bytes(manifest.to_bytes()).rows == manifest.rows


def _old_row_hash(row: ManifestRow, model_id: str) -> str:
    """row_hash as it was before the i2v columns, for a row without input files."""
    post = row.postprocess_fields()
    payload = {"recipe_version": RECIPE_VERSION, "model": model_id, "mode": row.mode, "prompt": row.prompt,
               "generation": {**{c: getattr(row, c) for c in GENERATION_COLUMNS},
                              "sampler": row.request().sampler},
               "inputs": {c: getattr(row, c) for c in INPUT_COLUMNS}, "postprocess": post}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_t2v_identity_is_unchanged() -> None:
    rows = read_manifest(Path(__file__).resolve().parents[2] / "examples" / "tiny.csv", env={}).rows
    for row in rows:
        assert row_hash(row, "tiny-t2v/x") == _old_row_hash(row, "tiny-t2v/x"), row.id
        # the i2v fields are not part of a t2v row's identity
        changed = dataclasses.replace(row, boundary=0.5, adaptive_resolution=False)
        assert row_hash(changed, "tiny-t2v/x") == row_hash(row, "tiny-t2v/x")


def test_i2v_fields_change_an_i2v_row_s_identity(tmp_path: Path, images: dict[str, Path]) -> None:
    [row] = read_manifest(_manifest(tmp_path, "a,i2v,a cat,tiny-i2v,cat.png,,,,,9")).rows
    base = row_hash(row, MODEL_ID)
    hashes = {base,
              row_hash(dataclasses.replace(row, boundary=0.5), MODEL_ID),
              row_hash(dataclasses.replace(row, adaptive_resolution=False), MODEL_ID),
              row_hash(dataclasses.replace(row, sigma_max=80.0), MODEL_ID)}
    assert len(hashes) == 4
