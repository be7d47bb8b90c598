"""Manifest validation tells the whole truth once, and its output cannot be forged or injected.

Every bad cell of a row is reported; counts are rows; an unknown column stops the batch (with a
"did you mean") unless ignored; integers written as floats are accepted; a NUL byte or an
oversized cell fails its row, not the file; every echoed user value is escaped and capped.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from flows.cli import _parser, main
from tasks.manifest import ManifestFileError, ManifestRowsError, RowError, read_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_CELL_BYTES = 64 * 1024


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TURBO_STEPS", "ATTENTION_TYPE", "SLA_TOPK", "TURBO_MODEL"):
        monkeypatch.delenv(name, raising=False)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def one_row(tmp_path: Path, **cells: str) -> Path:
    """A one-row t2v manifest on the tiny model with `cells` added (values CSV-quoted)."""
    columns = {"id": "a", "mode": "t2v", "prompt": "x", "model": "tiny-t2v", **cells}
    quoted = ['"' + v.replace('"', '""') + '"' for v in columns.values()]
    return write(tmp_path / "m.csv", ",".join(columns) + "\n" + ",".join(quoted) + "\n")


# ── every bad cell of a row ─────────────────────────────────────────────────────────────────────

def test_every_bad_generation_cell_of_a_row_is_reported(tmp_path: Path) -> None:
    path = one_row(tmp_path, num_frames="80", num_steps="5", seed="-1", sla_topk="1.5",
                   attention_type="flash", quant_linear="maybe", sigma_max="-3")
    errors = {e.column: e for e in read_manifest(path).errors}
    assert set(errors) == {"num_frames", "num_steps", "seed", "sla_topk", "attention_type",
                           "quant_linear", "sigma_max"}
    assert "4k+1 between 1 and 125" in errors["num_frames"].reason
    assert errors["num_frames"].value == "80" and errors["seed"].value == "-1"
    assert "[0, 2^63)" in errors["seed"].reason


def test_bad_resolution_and_bad_aspect_ratio_are_both_reported(tmp_path: Path) -> None:
    errors = read_manifest(one_row(tmp_path, resolution="1080p", aspect_ratio="21:9",
                                   num_frames="80")).errors
    assert [e.column for e in errors] == ["resolution", "aspect_ratio", "num_frames"]


def test_good_generation_cells_beside_a_bad_one_are_not_reported(tmp_path: Path) -> None:
    [error] = read_manifest(one_row(tmp_path, num_frames="9", num_steps="2", seed="-1")).errors
    assert error.column == "seed"


def test_env_value_and_row_value_both_bad(tmp_path: Path) -> None:
    path = one_row(tmp_path, seed="-1")
    errors = {e.column: e for e in read_manifest(path, env={"TURBO_STEPS": "9"}).errors}
    assert set(errors) == {"seed", "num_steps"}
    assert "environment TURBO_STEPS" in errors["num_steps"].reason


# ── counts are rows ─────────────────────────────────────────────────────────────────────────────

def test_validate_counts_rows_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = read_manifest(EXAMPLES / "bad_rows.csv")
    n_rows = len({e.row for e in manifest.errors})
    assert n_rows < len(manifest.errors)      # some rows have two bad cells
    assert main(["validate", str(EXAMPLES / "bad_rows.csv")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (f"{len(manifest.rows)} valid rows, {n_rows} invalid rows "
                       f"({len(manifest.errors)} errors)")
    assert out[:-1] == [f"invalid {e}" for e in manifest.errors]


def test_validate_counts_one_row_with_two_errors(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = one_row(tmp_path, num_frames="80", seed="-1")
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "0 valid rows, 1 invalid row (2 errors)"


def test_strict_counts_rows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["validate", "--strict", str(EXAMPLES / "bad_rows.csv")])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    manifest = read_manifest(EXAMPLES / "bad_rows.csv")
    n_rows = len({e.row for e in manifest.errors})
    assert f"{n_rows} invalid rows ({len(manifest.errors)} errors), nothing was run" in err
    with pytest.raises(ManifestRowsError) as rows_error:
        read_manifest(EXAMPLES / "bad_rows.csv", strict=True)
    assert str(rows_error.value).startswith(f"{n_rows} invalid rows ({len(manifest.errors)} errors)")


# ── unknown columns ─────────────────────────────────────────────────────────────────────────────

def _unknown(tmp_path: Path) -> Path:
    return write(tmp_path / "m.csv", "id,mode,prompt,model,colour,num_frame\na,t2v,x,tiny-t2v,red,9\n")


def test_unknown_column_is_a_file_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ManifestFileError) as caught:
        read_manifest(_unknown(tmp_path))
    reason = caught.value.reason
    assert "unknown column(s)" in reason
    assert "num_frame (did you mean num_frames?)" in reason and "colour" in reason
    assert "ignore_unknown" in reason
    with pytest.raises(ManifestFileError):
        read_manifest(_unknown(tmp_path), strict=True)


def test_unknown_column_ignored_on_request(tmp_path: Path) -> None:
    manifest = read_manifest(_unknown(tmp_path), ignore_unknown=True)
    assert len(manifest.rows) == 1 and manifest.errors == []
    [warning] = manifest.warnings
    assert "ignored" in warning and "colour" in warning
    assert "num_frame (did you mean num_frames?)" in warning
    assert manifest.rows[0].num_frames == 81          # the misspelt column really is ignored


def test_unknown_column_beside_a_missing_required_one(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "id,mod,prompt\na,t2v,x\n")
    with pytest.raises(ManifestFileError) as caught:
        read_manifest(path, ignore_unknown=True)
    assert "required column(s) missing: mode" in caught.value.reason
    assert "mod (did you mean mode?)" in caught.value.reason


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("strict", [False, True])
def test_cli_refuses_unknown_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     command: str, strict: bool) -> None:
    argv = [command, str(_unknown(tmp_path))] + (["--strict"] if strict else [])
    if command == "run":
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "num_frame (did you mean num_frames?)" in err and "--ignore-unknown" in err
    assert not (tmp_path / "out").exists()           # nothing ran


def test_cli_ignore_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--ignore-unknown", str(_unknown(tmp_path))]) == 0
    captured = capsys.readouterr()
    assert "warning: unknown column(s) ignored" in captured.err and "num_frames?" in captured.err
    assert captured.out.splitlines()[-1] == "1 valid row, 0 invalid rows (0 errors)"
    assert main(["validate", "--strict", "--ignore-unknown", str(_unknown(tmp_path))]) == 0
    assert _parser().parse_args(["run", "m.csv", "--ignore-unknown"]).ignore_unknown is True


# ── integers written as floats ──────────────────────────────────────────────────────────────────

INTEGER_CELLS = [("num_frames", "17.0", 17), ("num_steps", "2.0", 2), ("seed", "5.0", 5),
                 ("fps", "12.0", 12), ("interpolate_fps", "24.0", 24), ("num_samples", "2.0", 2)]


@pytest.mark.parametrize("column, text, expected", INTEGER_CELLS)
def test_integral_floats_in_csv(tmp_path: Path, column: str, text: str, expected: int) -> None:
    manifest = read_manifest(one_row(tmp_path, **{column: text}))
    assert manifest.errors == []
    first = manifest.rows[0]
    assert (len(manifest.rows) if column == "num_samples" else getattr(first, column)) == expected


@pytest.mark.parametrize("column, text, expected", INTEGER_CELLS)
def test_integral_floats_in_parquet_with_nulls(tmp_path: Path, column: str, text: str,
                                               expected: int) -> None:
    """What pandas writes for an int column with a missing value: float64 with a null."""
    table = pl.DataFrame({"id": ["a", "b"], "mode": ["t2v", "t2v"], "prompt": ["x", "y"],
                          "model": ["tiny-t2v", "tiny-t2v"], column: [float(text), None]})
    assert table.schema[column] == pl.Float64
    table.write_parquet(tmp_path / "m.parquet")
    manifest = read_manifest(tmp_path / "m.parquet")
    assert manifest.errors == []
    a = [r for r in manifest.rows if r.id.startswith("a")]
    assert (len(a) if column == "num_samples" else getattr(a[0], column)) == expected


@pytest.mark.parametrize("column, text", [("num_frames", "17.5"), ("seed", "1.25"),
                                          ("num_steps", "nan"), ("fps", "inf"), ("seed", "1e400")])
def test_non_integral_numbers_are_still_refused(tmp_path: Path, column: str, text: str) -> None:
    [error] = read_manifest(one_row(tmp_path, **{column: text})).errors
    assert (error.column, error.value) == (column, text)


def test_large_integral_seed_keeps_its_exact_value(tmp_path: Path) -> None:
    [row] = read_manifest(one_row(tmp_path, seed="9223372036854775807.0")).rows
    assert row.seed == 2**63 - 1


# ── NUL bytes and oversized cells ───────────────────────────────────────────────────────────────

def test_nul_in_a_cell_fails_that_row_only(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", b"id,mode,prompt,model,watermark\n"
                                     b"a,t2v,fine,tiny-t2v,\n"
                                     b'b,t2v,"bad\x00prompt",tiny-t2v,\n'
                                     b"c,t2v,x,tiny-t2v,logo\x00.png\n")
    manifest = read_manifest(path)
    assert [r.id for r in manifest.rows] == ["a"]
    assert [(e.row, e.id, e.column) for e in manifest.errors] == [(2, "b", "prompt"),
                                                                    (3, "c", "watermark")]
    assert all("contains a NUL byte" in e.reason for e in manifest.errors)
    assert all("\x00" not in str(e) and "\\x00" in str(e) for e in manifest.errors)


def test_nul_in_the_id_reports_once(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", b"id,mode,prompt,model\na\x00b,t2v,x,tiny-t2v\n")
    [error] = read_manifest(path).errors
    assert error.column == "id" and "contains a NUL byte" in error.reason


@pytest.mark.parametrize("content", [b"\x00\x01\x02 not a manifest",
                                     b"id,mo\x00de,prompt\na,t2v,x\n",
                                     b"id,mode,prompt\na,t2v,x,\x00,extra\n"])
def test_binary_files_are_still_refused(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ManifestFileError, match="binary content"):
        read_manifest(write(tmp_path / "m.csv", content))


def test_cell_over_64_kib_is_refused_with_a_capped_echo(tmp_path: Path) -> None:
    big = "p" * (MAX_CELL_BYTES + 1)
    path = write(tmp_path / "m.csv", "id,mode,prompt,model,watermark\n"
                                     f"a,t2v,{big},tiny-t2v,\n"
                                     f"b,t2v,x,tiny-t2v,{big}\n"
                                     "c,t2v,x,tiny-t2v,\n")
    manifest = read_manifest(path)
    assert [r.id for r in manifest.rows] == ["c"]
    assert [(e.row, e.column) for e in manifest.errors] == [(1, "prompt"), (2, "watermark")]
    for error in manifest.errors:
        assert f"cell of {MAX_CELL_BYTES + 1} bytes, over the 64 KiB limit" in error.reason
        assert len(str(error)) < 500


def test_cell_size_counts_utf8_bytes(tmp_path: Path) -> None:
    text = "é" * (MAX_CELL_BYTES // 2 + 1)     # under the limit in characters, over it in bytes
    [error] = read_manifest(one_row(tmp_path, prompt=text)).errors
    assert f"cell of {MAX_CELL_BYTES + 2} bytes" in error.reason


def test_long_prompt_under_64_kib_is_accepted(tmp_path: Path) -> None:
    prompt = "a cat walks " * 5000                  # ~60 KB, far over the text encoder's limit
    [row] = read_manifest(one_row(tmp_path, prompt=prompt)).rows
    assert row.prompt == prompt.strip()


# ── output that cannot be forged ────────────────────────────────────────────────────────────────

FORGED = 'x\ninvalid row 9 (id "ok"), column seed = "1": fine\r\x1b[2J\x1b[31mred\x9b\x7f'


def test_row_error_escapes_control_characters() -> None:
    error = RowError(3, FORGED, "seed", FORGED, "must be " + FORGED)
    text = str(error)
    assert len(text.splitlines()) == 1
    for ch in ("\n", "\r", "\x1b", "\x9b", "\x7f"):
        assert ch not in text
    assert "\\n" in text and "\\x1b[2J" in text and "\\x9b" in text and "\\x7f" in text


def test_forged_id_in_a_csv_gives_one_line_per_error(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = one_row(tmp_path, id=FORGED, seed="-1")
    manifest = read_manifest(path)
    assert {e.column for e in manifest.errors} == {"id", "seed"}
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == len(manifest.errors) + 1
    assert sum(line.startswith("invalid row") for line in lines) == len(manifest.errors)
    assert "\x1b" not in captured.out + captured.err


def test_long_id_is_echoed_once_and_capped(tmp_path: Path) -> None:
    long_id = "a" * 10_000
    manifest = read_manifest(one_row(tmp_path, id=long_id, seed="-1"))
    errors = {e.column: str(e) for e in manifest.errors}
    assert set(errors) == {"id", "seed"}
    assert errors["id"].count("a" * 150) == 1       # the id is not repeated beside its value
    assert "(10000 characters)" in errors["id"]
    for text in errors.values():
        assert len(text) < 600


def test_user_text_in_reasons_is_escaped(tmp_path: Path) -> None:
    [error] = read_manifest(one_row(tmp_path, model="m\x1b[31m" + "z" * 1000)).errors
    assert "\x1b" not in str(error) and len(str(error)) < 800


def test_warnings_and_file_errors_are_escaped(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", 'id,mode,prompt,"col\n\x1b[2Jour"\na,t2v,x,red\n')
    with pytest.raises(ManifestFileError) as caught:
        read_manifest(path)
    assert "\x1b" not in str(caught.value) and "\\x1b[2J" in str(caught.value)
    [warning] = read_manifest(path, ignore_unknown=True).warnings
    assert "\x1b" not in warning and "\n" not in warning and "\\x1b[2J" in warning
    missing = write(tmp_path / "n.csv", 'id,prompt,"\x1b]0;title\x07"\na,x,y\n')
    with pytest.raises(ManifestFileError) as caught:
        read_manifest(missing)
    assert "\x1b" not in str(caught.value) and "\x07" not in str(caught.value)
    assert "\x1b" not in str(ManifestFileError("m\x1b.csv", "bad \x1b[31m"))
