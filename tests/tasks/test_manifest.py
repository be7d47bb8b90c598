"""Manifest v1 reading and validation (tasks/manifest.py) and input checks (tasks/inputs.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest

from engine.config import WanConfig
from engine.requests import GenerationRequest, T2VRequest
from tasks.inputs import InputError, check_audio, check_image, check_video
from tasks.manifest import (
    ManifestFileError,
    ManifestRow,
    ManifestRowsError,
    RowError,
    r2_storage_options,
    read_manifest,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that use os.environ must not see the caller's TURBO_* settings."""
    for name in ("TURBO_STEPS", "ATTENTION_TYPE", "SLA_TOPK", "TURBO_MODEL"):
        monkeypatch.delenv(name, raising=False)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short silent video, a short audio file and a video with sound, made with ffmpeg."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    folder = tmp_path_factory.mktemp("media")
    files = {"video": folder / "clip.mp4", "audio": folder / "tone.wav",
             "video_with_audio": folder / "both.mp4"}
    ffmpeg = ["ffmpeg", "-v", "error", "-y"]
    subprocess.run(ffmpeg + ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", "4",
                             "-pix_fmt", "yuv420p", str(files["video"])], check=True)
    subprocess.run(ffmpeg + ["-f", "lavfi", "-i", "sine=frequency=440:duration=0.2",
                             str(files["audio"])], check=True)
    subprocess.run(ffmpeg + ["-i", str(files["video"]), "-i", str(files["audio"]), "-c:v", "copy",
                             "-shortest", str(files["video_with_audio"])], check=True)
    return files


# ── examples/bad_rows.csv: every bad row exactly, every good row valid ─────────────────────────

# row → {column: reason substring}; the set of (row, column) pairs must match exactly.
BAD_ROWS: dict[int, dict[str, str]] = {
    2: {"id": "required"},
    3: {"id": "duplicate id: rows 1 and 3"},
    4: {"id": "not a safe id"},
    5: {"mode": "must be t2v | i2v | dance"},
    6: {"prompt": "required"},
    7: {"model": "model wan9-t2v-99b is not available in this version; available: steadydancer-14b, tiny-dance, "
          "tiny-i2v, tiny-t2v"},
    8: {"resolution": "480p | 720p"},
    9: {"aspect_ratio": "16:9"},
    10: {"num_frames": "4k+1 between 1 and 125"},
    11: {"num_steps": "1, 2, 3 or 4"},
    12: {"seed": "[0, 2^63)"},
    13: {"attention_type": "original | sla | sagesla | auto"},
    14: {"sla_topk": "(0, 1]"},
    15: {"quant_linear": "auto | true | false"},
    16: {"fps": "between 1 and 60"},
    17: {"interpolate_fps": "above fps (16)"},
    18: {"upscale": "(1, 4]"},
    19: {"watermark": "file not found"},
    20: {"image": "not a readable image"},
    21: {"watermark": "escapes the allowed folders"},
    22: {"watermark": "http:// is not allowed"},
    23: {"image": "i2v needs an image"},
    24: {"image": "t2v takes no image"},
    25: {"output_name": "not a safe name"},
    26: {"preview": "true/false"},
    27: {"num_samples": "between 1 and 1000"},
    29: {"driving_video": "dance needs a driving_video", "num_steps": "1 to 100"},
    30: {"image": "file:// is not allowed"},
    31: {"model": "tiny-t2v is a t2v model, not i2v"},
}


def test_bad_rows_are_each_reported_exactly() -> None:
    manifest = read_manifest(EXAMPLES / "bad_rows.csv")
    found = {(e.row, e.column) for e in manifest.errors}
    expected = {(row, column) for row, columns in BAD_ROWS.items() for column in columns}
    assert found == expected
    assert len(manifest.errors) == len(expected)  # one error per bad cell, no repeats
    for error in manifest.errors:
        assert BAD_ROWS[error.row][error.column] in error.reason, str(error)
    distinct_reasons = {BAD_ROWS[r][c] for r, c in expected}
    assert len(distinct_reasons) >= 15


def test_bad_rows_errors_carry_id_and_value() -> None:
    errors = {(e.row, e.column): e for e in read_manifest(EXAMPLES / "bad_rows.csv").errors}
    assert errors[(2, "id")].id is None and errors[(2, "id")].value is None
    assert errors[(10, "num_frames")].id == "frames-01"
    assert errors[(10, "num_frames")].value == "80"
    assert errors[(3, "id")].value == "good-01"
    assert errors[(23, "image")].value is None


def test_bad_rows_good_rows_are_returned_valid() -> None:
    manifest = read_manifest(EXAMPLES / "bad_rows.csv")
    assert [(r.row, r.id) for r in manifest.rows] == [
        (1, "good-01"), (28, "good-02-s0"), (28, "good-02-s1"), (32, "good-03")]
    for row in manifest.rows:
        config = WanConfig.from_name(row.model)
        assert row.request().validated(config) == row.request()  # already normalised
    good3 = manifest.rows[-1]
    assert good3.watermark == str((EXAMPLES / "logo.png").resolve())
    assert good3.watermark_is_image and good3.preview is True
    assert good3.postprocess_fields() == {"fps": 12, "interpolate_fps": 24, "upscale": 2.0,
                                          "watermark": good3.watermark, "preview": True,
                                          "audio": None}
    assert good3.output_name == "good-three"


def test_bad_rows_strict_refuses_the_batch() -> None:
    with pytest.raises(ManifestRowsError) as caught:
        read_manifest(EXAMPLES / "bad_rows.csv", strict=True)
    assert len(caught.value.errors) == sum(len(c) for c in BAD_ROWS.values())
    assert "row 10 (id \"frames-01\"), column num_frames" in str(caught.value)


def test_tiny_example_is_all_good_and_small() -> None:
    manifest = read_manifest(EXAMPLES / "tiny.csv")
    assert manifest.errors == [] and manifest.warnings == []
    assert 4 <= len(manifest.rows) <= 6
    assert {r.model for r in manifest.rows} == {"tiny-t2v"}
    assert all(r.num_frames <= 17 for r in manifest.rows)
    assert sum(r.interpolate_fps is not None for r in manifest.rows) == 1


def test_row_error_message_format() -> None:
    error = RowError(7, "cat-02", "num_frames", "80",
                     "must be 4k+1 between 1 and 125 (e.g. 33, 81, 121)")
    assert str(error) == ('row 7 (id "cat-02"), column num_frames = "80": '
                          "must be 4k+1 between 1 and 125 (e.g. 33, 81, 121)")
    assert str(RowError(2, None, "id", None, "required")) == "row 2 (no id), column id = (empty): required"


# ── file formats ────────────────────────────────────────────────────────────────────────────────

def test_bom_crlf_quoted_commas_and_newlines(tmp_path: Path) -> None:
    text = ('id,mode,prompt,model,num_frames\r\n'
            'a,t2v,"a cat, a dog",tiny-t2v,9\r\n'
            'b,t2v,"line one\r\nline two ""quoted""",tiny-t2v,9\r\n')
    path = write(tmp_path / "m.csv", b"\xef\xbb\xbf" + text.encode("utf-8"))
    manifest = read_manifest(path)
    assert manifest.errors == [] and manifest.warnings == []
    assert [r.prompt for r in manifest.rows] == ["a cat, a dog", 'line one\nline two "quoted"']
    assert [r.row for r in manifest.rows] == [1, 2]


def test_row_numbers_count_data_rows_across_multiline_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", 'id,mode,prompt,num_frames\n'
                                     'a,t2v,"two\nlines",9\n'
                                     'b,t2v,third line of the file,80\n')
    [error] = read_manifest(path).errors
    assert (error.row, error.id, error.column) == (2, "b", "num_frames")


def test_parquet_matches_csv(tmp_path: Path) -> None:
    csv_rows = read_manifest(EXAMPLES / "tiny.csv").rows
    table = pl.read_csv(EXAMPLES / "tiny.csv")  # typed columns: ints, floats, bools
    assert table.schema["num_frames"] == pl.Int64
    table.write_parquet(tmp_path / "tiny.parquet")
    parquet_rows = read_manifest(tmp_path / "tiny.parquet").rows
    assert parquet_rows == csv_rows


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"id,mode,prompt\n", "no data rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV or Parquet file"),
    (b"id,mode,prompt\n\xff\xfe,t2v,x\n", "not UTF-8"),
    (b"id,mode,prompt\na,t2v,x,extra,fields\n", "cannot read it as CSV"),
    (b"id,prompt\na,x\n", "required column(s) missing: mode"),
    (b"name,text\na,x\n", "required column(s) missing: id, mode, prompt"),
])
def test_file_level_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    path = write(tmp_path / "m.csv", content)
    with pytest.raises(ManifestFileError) as caught:
        read_manifest(path)
    assert reason in caught.value.reason
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_and_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(ManifestFileError, match="file not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestFileError, match="https:// is not supported"):
        read_manifest("https://example.com/m.csv")


def test_unknown_columns_refuse_the_file_unless_ignored(tmp_path: Path) -> None:
    """More in tests/tasks/test_manifest_truth.py (did-you-mean, CLI flags)."""
    path = write(tmp_path / "m.csv", "id,mode,prompt,model,colour,num_frame\na,t2v,x,tiny-t2v,red,9\n")
    with pytest.raises(ManifestFileError, match="unknown column"):
        read_manifest(path)
    manifest = read_manifest(path, ignore_unknown=True)
    assert len(manifest.rows) == 1 and manifest.errors == []
    assert len(manifest.warnings) == 1
    assert "colour" in manifest.warnings[0] and "num_frame" in manifest.warnings[0]


# ── precedence and defaults ─────────────────────────────────────────────────────────────────────

def _two_rows(tmp_path: Path) -> Path:
    # row 1 sets everything itself, row 2 leaves the cells empty
    return write(tmp_path / "m.csv", "id,mode,prompt,model,num_steps,attention_type,sla_topk\n"
                                     "a,t2v,x,tiny-t2v,1,original,0.5\n"
                                     "b,t2v,y,,,,\n")


@pytest.mark.parametrize("use_params, use_env, expected_b", [
    (True, True, ("wan2.1-t2v-14b", 2, "sla", 0.25)),
    (False, True, ("tiny-t2v", 3, "sagesla", 0.75)),
    (False, False, ("wan2.1-t2v-1.3b", 4, "auto", 0.1)),
])
def test_precedence_row_then_params_then_env_then_defaults(
        tmp_path: Path, use_params: bool, use_env: bool, expected_b: tuple[object, ...]) -> None:
    params = {"model": "wan2.1-t2v-14b", "num_steps": 2, "attention_type": "sla", "sla_topk": 0.25}
    env = {"TURBO_MODEL": "tiny-t2v", "TURBO_STEPS": "3", "ATTENTION_TYPE": "sagesla",
           "SLA_TOPK": "0.75"}
    manifest = read_manifest(_two_rows(tmp_path), run_params=params if use_params else None,
                             env=env if use_env else {})
    assert manifest.errors == []
    a, b = manifest.rows
    assert (a.model, a.num_steps, a.attention_type, a.sla_topk) == ("tiny-t2v", 1, "original", 0.5)
    assert (b.model, b.num_steps, b.attention_type, b.sla_topk) == expected_b


def test_defaults_follow_the_engine(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt\na,t2v,x\n")
    [row] = read_manifest(path, env={}).rows
    reference = GenerationRequest(prompt="x")
    assert row.model == "wan2.1-t2v-1.3b"
    assert row.resolution == WanConfig.from_name("wan2.1-t2v-1.3b").default_resolution
    for column in ("aspect_ratio", "num_frames", "num_steps", "seed", "sigma_max",
                   "attention_type", "sla_topk", "quant_linear"):
        assert getattr(row, column) == getattr(reference, column), column
    assert (row.fps, row.interpolate_fps, row.upscale, row.watermark, row.preview, row.audio) == (
        16, None, None, None, False, None)
    assert row.output_name == "a" and row.num_samples == 1 and row.sample is None
    [big] = read_manifest(write(tmp_path / "b.csv", "id,mode,prompt,model\na,t2v,x,wan2.1-t2v-14b\n"),
                          env={}).rows
    assert big.resolution == "720p"


def test_bad_value_from_env_says_where_it_came_from(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt,model\na,t2v,x,tiny-t2v\n")
    [error] = read_manifest(path, env={"TURBO_STEPS": "7"}).errors
    assert (error.column, error.value) == ("num_steps", "7")
    assert "environment TURBO_STEPS" in error.reason


def test_run_params_reject_unknown_and_per_row_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt\na,t2v,x\n")
    with pytest.raises(ValueError, match="unknown column.*steps"):
        read_manifest(path, run_params={"steps": 2})
    with pytest.raises(ValueError, match="per-row column.*prompt"):
        read_manifest(path, run_params={"prompt": "x"})


@pytest.mark.parametrize("word, expected", [("true", True), ("Yes", True), ("1", True),
                                            ("false", False), ("NO", False), ("0", False)])
def test_booleans(tmp_path: Path, word: str, expected: bool) -> None:
    path = write(tmp_path / "m.csv", f"id,mode,prompt,model,preview\na,t2v,x,tiny-t2v,{word}\n")
    assert read_manifest(path).rows[0].preview is expected


def test_num_samples_expands_seeds_and_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt,model,seed,num_samples,output_name\n"
                                     "one,t2v,x,tiny-t2v,,,\n"
                                     "cat,t2v,y,tiny-t2v,40,3,kitty\n")
    manifest = read_manifest(path)
    assert manifest.errors == []
    assert [(r.row, r.id, r.seed, r.sample, r.output_name) for r in manifest.rows] == [
        (1, "one", 0, None, "one"),
        (2, "cat-s0", 40, 0, "kitty-s0"), (2, "cat-s1", 41, 1, "kitty-s1"),
        (2, "cat-s2", 42, 2, "kitty-s2")]
    # everything else is the same row
    strip = {"id": "", "seed": 0, "sample": None, "output_name": "z"}
    assert len({dataclasses.replace(r, **strip) for r in manifest.rows[1:]}) == 1


def test_num_samples_duplicate_after_expansion(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt,model,num_samples\n"
                                     "cat,t2v,x,tiny-t2v,2\n"
                                     "cat-s1,t2v,y,tiny-t2v,\n")
    manifest = read_manifest(path)
    assert [r.id for r in manifest.rows] == ["cat-s0", "cat-s1"]
    [error] = manifest.errors
    assert (error.row, error.column) == (2, "id") and "rows 1 and 2" in error.reason


@pytest.mark.parametrize("bad_id", ["..hidden", "a..b", "-lead", ".lead", "a b", "a/b", "é", "x" * 129])
def test_unsafe_ids(tmp_path: Path, bad_id: str) -> None:
    path = write(tmp_path / "m.csv", f'id,mode,prompt,model\n"{bad_id}",t2v,x,tiny-t2v\n')
    [error] = read_manifest(path).errors
    assert error.column == "id" and "not a safe id" in error.reason


def test_mode_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mode,prompt,model\na,T2V,x,tiny-t2v\n")
    assert read_manifest(path).rows[0].mode == "t2v"


# ── file references ─────────────────────────────────────────────────────────────────────────────

def _watermark_row(tmp_path: Path, value: str) -> Path:
    return write(tmp_path / "m.csv", f'id,mode,prompt,model,watermark\na,t2v,x,tiny-t2v,"{value}"\n')


def test_https_only_when_allowed(tmp_path: Path) -> None:
    path = _watermark_row(tmp_path, "https://cdn.example.com/logo.png")
    [error] = read_manifest(path, env={}).errors
    assert "cdn.example.com" in error.reason and "TURBO_FETCH_ALLOW" in error.reason
    [error] = read_manifest(path, fetch_allow=["example.com", "*.other.com"]).errors
    assert "cdn.example.com" in error.reason
    for allowed in (read_manifest(path, allow_https=True),              # any host (older callers)
                    read_manifest(path, fetch_allow=["CDN.example.com"]),
                    read_manifest(path, fetch_allow=["*.example.com"]),
                    read_manifest(path, env={"TURBO_FETCH_ALLOW": "x.org, *.example.com"})):
        [row] = allowed.rows
        assert row.watermark == "https://cdn.example.com/logo.png"


@pytest.mark.parametrize("uri, ok", [("s3://bucket/music/a.wav", True), ("s3://bucket", False),
                                     ("s3:///key.wav", False), ("s3://bucket/dir/", False),
                                     ("s3:bucket/a.wav", False), ("ftp://host/a.wav", False),
                                     ("file:///tmp/a.wav", False), ("http://host/a.wav", False)])
def test_uri_syntax_only(tmp_path: Path, uri: str, ok: bool) -> None:
    path = write(tmp_path / "m.csv", f"id,mode,prompt,model,audio\na,t2v,x,tiny-t2v,{uri}\n")
    manifest = read_manifest(path)
    assert (len(manifest.rows), len(manifest.errors)) == ((1, 0) if ok else (0, 1))
    if ok:
        assert manifest.rows[0].audio == uri


def test_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(EXAMPLES / "logo.png", outside / "logo.png")
    inside = tmp_path / "batch"
    inside.mkdir()
    (inside / "logo.png").symlink_to(outside / "logo.png")
    path = _watermark_row(inside, "logo.png")
    [error] = read_manifest(path).errors
    assert "escapes the allowed folders" in error.reason
    [row] = read_manifest(path, allowed_roots=[tmp_path]).rows
    assert row.watermark == str((outside / "logo.png").resolve())


def test_check_inputs_off_checks_existence_but_does_not_decode(tmp_path: Path) -> None:
    """The batch reads with check_inputs=False: the fetch stage decodes each input once."""
    missing = _watermark_row(tmp_path, "not-here.png")
    [error] = read_manifest(missing, check_inputs=False).errors
    assert error.column == "watermark" and "file not found" in error.reason
    shutil.copy(EXAMPLES / "not_an_image.png", tmp_path / "wm.png")
    undecodable = _watermark_row(tmp_path, "wm.png")
    assert len(read_manifest(undecodable).errors) == 1
    [row] = read_manifest(undecodable, check_inputs=False).rows
    assert row.watermark == str(tmp_path / "wm.png")
    # the root rule still holds without file checks
    assert len(read_manifest(_watermark_row(tmp_path, "/etc/x.png"), check_inputs=False).errors) == 1


def test_watermark_png_that_does_not_decode(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "not_an_image.png", tmp_path / "wm.png")
    [error] = read_manifest(_watermark_row(tmp_path, "wm.png")).errors
    assert error.column == "watermark" and "not a readable image" in error.reason


def test_audio_column(tmp_path: Path, media: dict[str, Path]) -> None:
    shutil.copy(media["audio"], tmp_path / "tone.wav")
    shutil.copy(media["video"], tmp_path / "silent.mp4")
    path = write(tmp_path / "m.csv", "id,mode,prompt,model,audio\n"
                                     "a,t2v,x,tiny-t2v,tone.wav\n"
                                     "b,t2v,x,tiny-t2v,silent.mp4\n")
    manifest = read_manifest(path)
    assert [r.audio for r in manifest.rows] == [str(tmp_path / "tone.wav")]
    [error] = manifest.errors
    assert (error.row, error.column) == (2, "audio") and "no audio stream" in error.reason


# ── tasks/inputs.py ─────────────────────────────────────────────────────────────────────────────

def test_check_image() -> None:
    from PIL import Image
    with Image.open(EXAMPLES / "person.png") as image:
        expected = image.size
    assert check_image(EXAMPLES / "person.png") == expected == (64, 64)
    with pytest.raises(InputError, match="not a readable image"):
        check_image(EXAMPLES / "not_an_image.png")
    with pytest.raises(InputError, match="file not found"):
        check_image(EXAMPLES / "missing.png")


def test_check_truncated_image(tmp_path: Path) -> None:
    from PIL import Image
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    write(tmp_path / "cut.jpg", data[: len(data) // 2])  # header intact, pixels cut
    with pytest.raises(InputError):
        check_image(tmp_path / "cut.jpg")


def test_check_video_and_audio(media: dict[str, Path]) -> None:
    info = check_video(media["video"])
    [stream] = info["streams"]
    assert (stream["codec_type"], stream["width"], stream["height"]) == ("video", 64, 48)
    assert check_audio(media["audio"])["streams"][0]["codec_type"] == "audio"
    both = check_video(media["video_with_audio"])
    assert {s["codec_type"] for s in both["streams"]} == {"video", "audio"}
    check_audio(media["video_with_audio"])
    with pytest.raises(InputError, match="no video stream"):
        check_video(media["audio"])
    with pytest.raises(InputError, match="no audio stream"):
        check_audio(media["video"])
    with pytest.raises(InputError, match="not a readable"):
        check_video(EXAMPLES / "not_an_image.png")
    with pytest.raises(InputError, match="still image"):
        check_video(EXAMPLES / "person.png")
    with pytest.raises(InputError, match="not a readable media file"):
        check_video(EXAMPLES / "tiny.csv")


# ── s3:// manifests ─────────────────────────────────────────────────────────────────────────────

def test_r2_storage_options_from_env() -> None:
    assert r2_storage_options({}) is None
    options = r2_storage_options({"R2_ACCOUNT_ID": "abc", "R2_ACCESS_KEY_ID": "k",
                                  "R2_SECRET_ACCESS_KEY": "s"})
    assert options is not None
    assert options["aws_endpoint_url"] == "https://abc.r2.cloudflarestorage.com"
    assert (options["aws_access_key_id"], options["aws_secret_access_key"]) == ("k", "s")
    assert "aws_allow_http" not in options
    explicit = r2_storage_options({"R2_ENDPOINT_URL": "http://127.0.0.1:9", "R2_ACCOUNT_ID": "abc"})
    assert explicit is not None and explicit["aws_endpoint_url"] == "http://127.0.0.1:9"
    assert explicit["aws_allow_http"] == "true"


@pytest.fixture()
def s3_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    ministack = shutil.which("ministack")
    if ministack is None:
        pytest.skip("ministack is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "ministack.log").open("wb")
    server = subprocess.Popen([ministack], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "GATEWAY_PORT": str(port), "BIND_HOST": "127.0.0.1"})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.skip("ministack did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_read_manifest_from_s3(s3_server: str, tmp_path: Path) -> None:
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    s3.create_bucket(Bucket="manifests")
    s3.put_object(Bucket="manifests", Key="nightly/tiny.csv", Body=(EXAMPLES / "tiny.csv").read_bytes())
    pl.read_csv(EXAMPLES / "tiny.csv").write_parquet(tmp_path / "tiny.parquet")
    s3.put_object(Bucket="manifests", Key="nightly/tiny.parquet",
                  Body=(tmp_path / "tiny.parquet").read_bytes())
    env = {"R2_ENDPOINT_URL": s3_server, "R2_ACCESS_KEY_ID": "test", "R2_SECRET_ACCESS_KEY": "test"}
    local = read_manifest(EXAMPLES / "tiny.csv").rows
    for key in ("nightly/tiny.csv", "nightly/tiny.parquet"):
        manifest = read_manifest(f"s3://manifests/{key}", env=env)
        assert manifest.rows == local and manifest.errors == []
    with pytest.raises(ManifestFileError) as caught:
        read_manifest("s3://manifests/nightly/missing.csv",
                      env={**env, "R2_SECRET_ACCESS_KEY": "s3cr3t-never-logged"})
    assert "s3cr3t" not in str(caught.value)


def test_manifest_row_direct_construction_defaults_output_name() -> None:
    row = ManifestRow(row=1, id="x", mode="t2v", prompt="p")
    assert row.output_name == "x"
    assert row.request() == T2VRequest(prompt="p")


def test_dance_inputs_are_probed(tmp_path: Path, media: dict[str, Path]) -> None:
    shutil.copy(media["video"], tmp_path / "moves.mp4")
    shutil.copy(EXAMPLES / "person.png", tmp_path / "person.png")
    path = write(tmp_path / "m.csv", "id,mode,prompt,image,driving_video\n"
                                     "a,dance,x,person.png,moves.mp4\n"
                                     "b,dance,x,person.png,person.png\n")
    errors = {(e.row, e.column): e.reason for e in read_manifest(path).errors}
    # the inputs are checked at validation: a still image is no driving video
    assert set(errors) == {(2, "driving_video")}
    assert "still image" in errors[(2, "driving_video")]


def test_num_samples_suffix_must_keep_the_id_safe(tmp_path: Path) -> None:
    long_id = "a" * 126
    path = write(tmp_path / "m.csv", f"id,mode,prompt,model,num_samples\n{long_id},t2v,x,tiny-t2v,2\n"
                                     f"{long_id[:-1]},t2v,x,tiny-t2v,\n")
    manifest = read_manifest(path)
    [error] = manifest.errors
    assert (error.row, error.column) == (1, "num_samples") and "-s1 suffix" in error.reason
    assert [r.row for r in manifest.rows] == [2]


def test_an_s3_manifest_behind_tls_with_its_own_ca_is_read_with_the_sinks_client(tmp_path: Path) -> None:
    """polars' object_store takes no CA file; with R2_CA_BUNDLE the manifest comes through boto3."""
    from tests.s3server import run_s3_server
    with run_s3_server(tmp_path / "s3") as s3:
        bucket = s3.create_bucket()
        s3.client().put_object(Bucket=bucket, Key="m/a.csv",
                               Body=b"id,mode,prompt,model\none,t2v,a quiet lake,tiny-t2v\n")
        env = {"R2_ENDPOINT_URL": s3.endpoint_url, "R2_ACCESS_KEY_ID": s3.access_key_id,
               "R2_SECRET_ACCESS_KEY": s3.secret_access_key, "R2_CA_BUNDLE": str(s3.ca_path)}
        m = read_manifest(f"s3://{bucket}/m/a.csv", env=env)
        assert [r.id for r in m.rows] == ["one"] and not m.errors
        with pytest.raises(ManifestFileError, match="not found"):
            read_manifest(f"s3://{bucket}/m/missing.csv", env=env)
        with pytest.raises(ManifestFileError, match="cannot be read"):
            read_manifest(f"s3://{bucket}/m/a.csv", env={**env, "R2_SECRET_ACCESS_KEY": "wrong"})
