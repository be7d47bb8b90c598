"""Manifest v1: read a CSV or Parquet batch file and validate it into `ManifestRow`s.

    read_manifest(source) ─┬─ file-level problem (unreadable, empty, no `id`, unknown column …) → ManifestFileError
                           └─ Manifest(rows=[good rows], errors=[RowError per bad cell], warnings=[…])

Every bad cell is reported with its 1-based data row number, id, column, value and reason (shown
escaped and capped: `tasks.text.shown`); good rows are still returned (pass `strict=True` to
refuse the whole batch instead). A value comes from the row if its cell is not empty, else from
`run_params` (CLI options, deployment parameters), else from the environment (`TURBO_STEPS`,
`ATTENTION_TYPE`, `SLA_TOPK`, `TURBO_MODEL`), else the default.
Column reference: docs/MANIFEST.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import polars as pl

from engine.config import WanConfig
from engine.errors import RequestError
from engine.registry import MODELS, model_names
from engine.requests import REQUEST_TYPES, GenerationRequest, I2VRequest
from tasks.errors import InputError, TurboBatchError
from tasks.inputs import check_audio, check_image, check_video, host_allowed, parse_host_list
from tasks.manifest_errors import ManifestFileError, ManifestRowsError, count_rows
from tasks.text import shown

MODES = ("t2v", "i2v", "dance")
DEFAULT_MODELS = {"t2v": "wan2.1-t2v-1.3b", "i2v": "wan2.2-i2v-a14b", "dance": "steadydancer-14b"}
# What each known model generates (the registry's, plus the presets still to come); a row whose
# mode differs is refused.
MODEL_MODES = {"steadydancer-14b": "dance",
               **{name: spec.mode for name, spec in MODELS.items()}}

IDENTITY_COLUMNS = ("id", "mode", "prompt", "model")
INPUT_COLUMNS = ("image", "driving_video")
GENERATION_COLUMNS = ("resolution", "aspect_ratio", "num_frames", "num_steps", "seed", "sigma_max",
                      "attention_type", "sla_topk", "quant_linear")
# Request fields of i2v rows only (I2VRequest): a t2v or dance row that sets one is refused.
I2V_COLUMNS = ("adaptive_resolution", "boundary")
# Dance rows: the sampler's guidance (a request field), the pose stage's settings and the LoRA
# merged at load (a file in the checkpoints folder: part of the loaded weights, not the request).
DANCE_REQUEST_COLUMNS = ("guidance",)
DANCE_COLUMNS = ("guidance", "fill", "align_frame", "lora")
FILLS = ("error", "loop", "pad")
POSTPROCESS_COLUMNS = ("fps", "interpolate_fps", "upscale", "watermark", "preview", "audio")
OUTPUT_COLUMNS = ("output_name", "num_samples")
COLUMNS = (IDENTITY_COLUMNS + INPUT_COLUMNS + GENERATION_COLUMNS + I2V_COLUMNS + DANCE_COLUMNS + POSTPROCESS_COLUMNS
           + OUTPUT_COLUMNS)
REQUIRED_COLUMNS = ("id", "mode", "prompt")
# Per-row by nature: a run-wide value would make every row the same item.
ROW_ONLY_COLUMNS = ("id", "mode", "prompt", "output_name", "image", "driving_video")
ENV_COLUMNS = {"TURBO_STEPS": "num_steps", "ATTENTION_TYPE": "attention_type",
               "SLA_TOPK": "sla_topk", "TURBO_MODEL": "model"}

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAFE_NAME_RULE = ("letters, digits, '.', '_' and '-' only, starting with a letter or digit, "
                  "at most 128 characters, no '..'")
DEFAULT_FPS = 16
_REQUEST_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
_I2V_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(I2VRequest)}
# Request fields that name files: checked as their own columns, so validating the other fields of
# a row passes a placeholder (`validated()` refuses them empty).
_FILE_FIELDS = ("image", "poses")
MAX_FPS, MAX_INTERPOLATE_FPS, MAX_UPSCALE = 60, 120, 4.0
MAX_SAMPLES = 1000
MAX_WATERMARK_TEXT = 200
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")
# Any cell over this many UTF-8 bytes fails its row (a prompt over the text encoder's limit but
# under this one is accepted: the engine truncates it with a warning).
MAX_CELL_BYTES = 64 * 1024
MAX_REASON = 1000         # an error reason is escaped and capped at this many characters
# Integer columns: a cell such as "17.0" (what pandas writes for an int column with nulls) is
# accepted when it is integral.
INTEGER_COLUMNS = ("num_frames", "num_steps", "seed", "fps", "interpolate_fps", "num_samples")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


# ── errors ───────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class RowError:
    row: int                # 1-based data row number (the header is not counted)
    id: str | None
    column: str
    value: str | None
    reason: str

    def __str__(self) -> str:
        """One line: every user value escaped and capped (`tasks.text.shown`); an error on the id
        column does not repeat the id before its value."""
        value = "(empty)" if self.value is None else f'"{shown(self.value)}"'
        reason = shown(self.reason, limit=MAX_REASON)
        if self.column == "id" and self.id is not None and self.id == self.value:
            return f"row {self.row}, column id = {value}: {reason}"
        who = f'id "{shown(self.id)}"' if self.id else "no id"
        return f"row {self.row} ({who}), column {shown(self.column)} = {value}: {reason}"


# ── rows ─────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class ManifestRow:
    """One validated item. Paths are absolute (resolved) local paths or s3:// / https:// URIs.

    Build rows with `read_manifest`, which validates; the defaults here match the t2v defaults.
    """
    row: int
    id: str
    mode: str
    prompt: str
    model: str = DEFAULT_MODELS["t2v"]
    image: str | None = None
    driving_video: str | None = None
    # Generation defaults are the engine's own (GenerationRequest), not a second copy.
    resolution: str = _REQUEST_DEFAULTS["resolution"]
    aspect_ratio: str = _REQUEST_DEFAULTS["aspect_ratio"]
    num_frames: int = _REQUEST_DEFAULTS["num_frames"]
    num_steps: int = _REQUEST_DEFAULTS["num_steps"]
    seed: int = _REQUEST_DEFAULTS["seed"]
    sigma_max: float = _REQUEST_DEFAULTS["sigma_max"]
    attention_type: str = _REQUEST_DEFAULTS["attention_type"]
    sla_topk: float = _REQUEST_DEFAULTS["sla_topk"]
    quant_linear: str = _REQUEST_DEFAULTS["quant_linear"]
    # i2v only (unused by other modes); an i2v row's sigma_max default is I2VRequest's, set by read_manifest
    adaptive_resolution: bool = _I2V_DEFAULTS["adaptive_resolution"]
    boundary: float = _I2V_DEFAULTS["boundary"]
    # dance only
    guidance: str = "auto"         # auto (fast with a LoRA, else official) | official | fast
    fill: str = "error"            # a driving video shorter than num_frames: error | loop | pad
    align_frame: int = 0           # the driving frame whose limb lengths are matched to the reference
    lora: str | None = None        # a step-distill LoRA file in the checkpoints folder
    fps: int = DEFAULT_FPS
    interpolate_fps: int | None = None
    upscale: float | None = None
    watermark: str | None = None   # text, or a .png path
    preview: bool = False
    audio: str | None = None
    output_name: str = ""          # "" → the id
    num_samples: int = 1           # as written in the source row
    sample: int | None = None      # index within a num_samples expansion

    def __post_init__(self) -> None:
        if not self.output_name:
            object.__setattr__(self, "output_name", self.id)

    def request(self, inputs: Mapping[str, Path] | None = None) -> GenerationRequest:
        """The engine request of this row's mode; `inputs` are the fetched local files by column."""
        fields: dict[str, Any] = {c: getattr(self, c) for c in request_columns(self.mode)}
        files = inputs or {}
        if self.mode in ("i2v", "dance") and "image" in files:
            fields["image"] = str(files["image"])
        if self.mode == "dance":     # the pose stage's outputs
            fields.update({c: str(files[c]) for c in ("poses", "negative_poses") if c in files})
        return REQUEST_TYPES[self.mode](prompt=self.prompt, **fields)

    def postprocess_fields(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in POSTPROCESS_COLUMNS}

    @property
    def watermark_is_image(self) -> bool:
        return self.watermark is not None and self.watermark.lower().endswith(".png")


@dataclass(frozen=True)
class Manifest:
    rows: list[ManifestRow]
    errors: list[RowError]
    warnings: list[str]
    source: str

    def counts(self) -> str:
        """"4 valid rows, 29 invalid rows (33 errors)": invalid rows are distinct row numbers."""
        valid = len(self.rows)
        return f"{valid} valid row{'' if valid == 1 else 's'}, {count_rows(self.errors)}"

    def to_bytes(self) -> bytes:
        """The validated manifest as JSON, so a later stage takes it by reference, unread."""
        return json.dumps({"source": self.source, "warnings": self.warnings,
                           "rows": [dataclasses.asdict(r) for r in self.rows],
                           "errors": [dataclasses.asdict(e) for e in self.errors]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        return cls(rows=[ManifestRow(**r) for r in raw["rows"]],
                   errors=[RowError(**e) for e in raw["errors"]],
                   warnings=list(raw["warnings"]), source=raw["source"])

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        return cls.from_bytes(Path(path).read_bytes())


def request_columns(mode: str | None) -> tuple[str, ...]:
    """The generation columns a row of `mode` passes to its request: GENERATION_COLUMNS, plus
    I2V_COLUMNS for i2v, the guidance for dance."""
    return GENERATION_COLUMNS + {"i2v": I2V_COLUMNS, "dance": DANCE_REQUEST_COLUMNS}.get(mode or "", ())


# ── entry point ──────────────────────────────────────────────────────────────────────────────────

def read_manifest(
    source: str | Path,
    *,
    run_params: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    allow_https: bool = False,
    fetch_allow: Sequence[str] | None = None,
    allowed_roots: Sequence[Path] | None = None,
    check_inputs: bool = True,
    strict: bool = False,
    ignore_unknown: bool = False,
) -> Manifest:
    """Read and validate a manifest; see the module docstring.

    A column that is not in `COLUMNS` is a ManifestFileError naming it (with a "did you mean"),
    unless `ignore_unknown=True`: then it is left out with a warning.

    An https:// reference is accepted when its host is on `fetch_allow` (host names, exact or
    `*.example.com`; None: the `TURBO_FETCH_ALLOW` variable of `env`). `allow_https=True` accepts
    any host (kept for older callers; the fetch stage still applies its own allowlist)."""
    env = os.environ if env is None else env
    allow_hosts = (parse_host_list(env.get("TURBO_FETCH_ALLOW")) if fetch_allow is None
                   else tuple(h.strip().lower() for h in fetch_allow if h.strip()))
    source_text = str(source)
    remote = source_text.startswith("s3://")
    base_dir = Path.cwd() if remote else Path(source_text).resolve().parent
    roots = [Path(r).resolve() for r in (allowed_roots or [base_dir])]

    table = _read_table(source_text, env)
    unknown = [c for c in table.columns if c not in COLUMNS]
    warnings: list[str] = []
    if unknown and not ignore_unknown:
        raise ManifestFileError(source_text, f"unknown column(s): {_describe_unknown(unknown)}; "
                                             "rename them (docs/MANIFEST.md lists the columns), or "
                                             "ignore them with --ignore-unknown (ignore_unknown=True)")
    if unknown:
        warnings.append(f"unknown column(s) ignored: {_describe_unknown(unknown)}")
        table = table.drop(unknown)

    context = _RowContext(run_params=_clean_run_params(run_params), env=env, base_dir=base_dir,
                          roots=roots, allow_https=allow_https, fetch_allow=allow_hosts,
                          check_inputs=check_inputs)
    rows: list[ManifestRow] = []
    errors: list[RowError] = []
    first_row_of_id: dict[str, int] = {}
    for number, raw in enumerate(table.iter_rows(named=True), start=1):
        row, row_errors = _validate_row(number, raw, context)
        errors.extend(row_errors)
        if row is None:
            continue
        for item in _expand_samples(row):
            if item.id in first_row_of_id:
                errors.append(RowError(number, item.id, "id", item.id,
                                       f"duplicate id: rows {first_row_of_id[item.id]} and "
                                       f"{number} both use it"))
                continue
            first_row_of_id[item.id] = number
            rows.append(item)
    if strict and errors:
        raise ManifestRowsError(errors)
    return Manifest(rows=rows, errors=errors, warnings=warnings, source=source_text)


def r2_storage_options(env: Mapping[str, str]) -> dict[str, str] | None:
    """polars/object_store options for s3:// reads from the R2_* variables (None: use defaults)."""
    endpoint = env.get("R2_ENDPOINT_URL") or (
        f"https://{env['R2_ACCOUNT_ID']}.r2.cloudflarestorage.com" if env.get("R2_ACCOUNT_ID") else "")
    options = {"aws_endpoint_url": endpoint,
               "aws_access_key_id": env.get("R2_ACCESS_KEY_ID", ""),
               "aws_secret_access_key": env.get("R2_SECRET_ACCESS_KEY", "")}
    options = {k: v for k, v in options.items() if v}
    if not options:
        return None
    # R2 treats us-east-1 as its "auto" region; local S3 test servers redirect on "auto".
    options["aws_region"] = "us-east-1"
    if endpoint.startswith("http://"):
        options["aws_allow_http"] = "true"  # local test servers only
    return options


# ── reading the file ─────────────────────────────────────────────────────────────────────────────

def _s3_bytes(uri: str, env: Mapping[str, str]) -> io.BytesIO:
    from botocore.exceptions import BotoCoreError, ClientError

    from tasks.upload import make_s3_client_from_env
    bucket, _, key = uri[5:].partition("/")
    try:
        body = make_s3_client_from_env(dict(env)).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        reason = "not found" if code in ("NoSuchKey", "404", "NoSuchBucket") else f"cannot be read ({code or e})"
        raise ManifestFileError(uri, reason) from None
    except (BotoCoreError, TurboBatchError) as e:
        raise ManifestFileError(uri, f"cannot be read ({_first_line(e)})") from None
    return io.BytesIO(body)


def _read_table(source: str, env: Mapping[str, str]) -> pl.DataFrame:
    """The manifest as a table of strings (None = empty cell), header names stripped."""
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(1).lower() != "s3":
        raise ManifestFileError(source, f"{scheme.group(1)}:// is not supported; use a local path or s3://")
    try:
        if source.startswith("s3://"):
            # polars' object_store takes no CA file: a private endpoint with its own CA
            # (R2_CA_BUNDLE) is read with the sink's boto3 client, then parsed from memory.
            data: Any = _s3_bytes(source, env) if env.get("R2_CA_BUNDLE") else source
            options = None if env.get("R2_CA_BUNDLE") else r2_storage_options(env)
            if source.lower().endswith((".parquet", ".pq")):
                table = pl.read_parquet(data, storage_options=options)
            else:
                table = pl.read_csv(data, infer_schema=False, storage_options=options)
        else:
            table = _read_local(Path(source))
    except ManifestFileError:
        raise
    except pl.exceptions.NoDataError:
        raise ManifestFileError(source, "file is empty") from None
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise ManifestFileError(source, f"cannot read it as CSV or Parquet ({_first_line(exc)})") from None

    try:
        table = table.select(pl.all().cast(pl.String))
    except pl.exceptions.PolarsError as exc:
        raise ManifestFileError(source, f"a column cannot be read as text ({_first_line(exc)})") from None
    table = table.rename({c: c.strip() for c in table.columns})
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        found = ", ".join(shown(c, limit=60) for c in table.columns[:30]) or "none"
        if len(table.columns) > 30:
            found += f", … {len(table.columns) - 30} more"
        unknown = [c for c in table.columns if c not in COLUMNS]
        also = f"; unknown column(s): {_describe_unknown(unknown)}" if unknown else ""
        raise ManifestFileError(source, f"required column(s) missing: {', '.join(missing)} "
                                        f"(found: {found}){also}")
    if table.height == 0:
        raise ManifestFileError(source, "has a header but no data rows")
    return table


def _read_local(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise ManifestFileError(path, "file not found")
    if not path.is_file():
        raise ManifestFileError(path, "not a file")
    data = path.read_bytes()
    if data.startswith(b"PAR1"):
        return pl.read_parquet(io.BytesIO(data))
    if not data.strip():
        raise ManifestFileError(path, "file is empty")
    # A NUL in the header, or in a file that is not UTF-8 or does not parse, means binary content;
    # a NUL inside one cell of a CSV that parses fails that row only (see _cell_problem).
    binary = ManifestFileError(path, "not a CSV or Parquet file (binary content)")
    has_nul = b"\x00" in data
    if b"\x00" in data.split(b"\n", 1)[0]:
        raise binary
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if has_nul:
            raise binary from None
        raise ManifestFileError(path, f"not UTF-8 text, so not a CSV file (byte {exc.start})") from None
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema=False)
    except pl.exceptions.PolarsError:
        if has_nul:
            raise binary from None
        raise


# ── validating one row ───────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class _RowContext:
    run_params: dict[str, str]
    env: Mapping[str, str]
    base_dir: Path
    roots: list[Path]
    allow_https: bool
    fetch_allow: tuple[str, ...]
    check_inputs: bool


class _CellError(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _validate_row(number: int, raw: Mapping[str, str | None],
                  ctx: _RowContext) -> tuple[ManifestRow | None, list[RowError]]:
    errors: list[RowError] = []
    # 0. A cell nothing else may read (a NUL byte, over MAX_CELL_BYTES) fails its row once; the
    #    rest of the row is checked as if it were empty, with no second error on that column.
    refused = {c: problem for c, v in raw.items() if (problem := _cell_problem(v)) is not None}
    cells = {c: (None if c in refused else v) for c, v in raw.items()}
    row_id = _clean(cells.get("id"))
    for column, problem in refused.items():
        errors.append(RowError(number, row_id, column, raw[column], problem))
    raw = cells
    origins: dict[str, str] = {}

    def value_of(column: str) -> str | None:
        """Row cell > run parameter > environment > None (= use the default)."""
        cell = _clean(raw.get(column))
        if cell is not None:
            return cell
        if column in ctx.run_params:
            origins[column] = "run parameter"
            return ctx.run_params[column]
        for env_name, env_column in ENV_COLUMNS.items():
            if env_column == column and _clean(ctx.env.get(env_name)) is not None:
                origins[column] = f"environment {env_name}"
                return _clean(ctx.env.get(env_name))
        return None

    def fail(column: str, value: object, reason: str) -> None:
        if column in refused:
            return
        if column in origins:
            reason += f" (value from {origins[column]})"
        errors.append(RowError(number, row_id, column, None if value is None else str(value), reason))

    # 1. Identity
    if row_id is None:
        fail("id", None, "required")
    elif not _is_safe_name(row_id):
        fail("id", row_id, f"not a safe id: {SAFE_NAME_RULE}")
    mode = _clean(raw.get("mode"))
    if mode is None:
        fail("mode", None, "required: " + " | ".join(MODES))
    elif mode.lower() not in MODES:
        fail("mode", mode, "must be " + " | ".join(MODES))
        mode = None
    else:
        mode = mode.lower()
    prompt = _clean(raw.get("prompt"))
    if prompt is None:
        fail("prompt", None, "required (empty prompt)")
    else:
        prompt = prompt.replace("\r\n", "\n")

    model = value_of("model") or (DEFAULT_MODELS[mode] if mode else None)
    config: WanConfig | None = None
    if model is not None:
        if model not in MODELS:
            fail("model", model, f"model {shown(model)} is not available in this version; "
                                 f"available: {', '.join(model_names())}")
        elif mode and MODEL_MODES.get(model, mode) != mode:
            fail("model", model, f"{model} is a {MODEL_MODES[model]} model, not {mode}")
        else:
            config = WanConfig.from_name(model)

    # 2. Generation: the engine's own validation names the field and its allowed values
    generation: dict[str, Any] = {}
    if mode is not None and mode != "i2v":
        # Only the row's own cell: a run-wide value (run parameter, environment) is meant for the
        # batch's i2v rows, and a mixed batch's other rows leave it alone.
        for column in I2V_COLUMNS:
            if (cell := _clean(raw.get(column))) is not None:
                fail(column, cell, f"{column} is for mode i2v only (this row is {mode})")
    dance: dict[str, Any] = {}
    if mode is not None and mode != "dance":
        for column in DANCE_COLUMNS:
            if (cell := _clean(raw.get(column))) is not None:
                fail(column, cell, f"{column} is for mode dance only (this row is {mode})")
    elif mode == "dance":
        dance = _dance_settings(value_of, fail)
    if config is not None:
        columns = request_columns(mode)
        given: dict[str, Any] = {c: v for c in columns if (v := value_of(c)) is not None}
        if "adaptive_resolution" in given:   # a boolean cell, read as `preview` is
            text = given.pop("adaptive_resolution")
            try:
                given["adaptive_resolution"] = _parse_bool(text)
            except _CellError as bad:
                fail("adaptive_resolution", text, bad.reason)
        request, problems = _validate_generation(given, config, prompt or "-", mode)
        for exc in problems:      # every bad field, each echoed as the row wrote it
            fail(exc.field, given.get(exc.field, exc.value), f"must be {exc.allowed}")
        if request is not None:
            generation = {c: getattr(request, c) for c in columns}

    if dance.get("align_frame", 0) >= generation.get("num_frames", 1 << 30):
        fail("align_frame", str(dance["align_frame"]), f"must be below num_frames ({generation['num_frames']})")

    # 3. Inputs and mode rules
    def reference(column: str, check: Callable[[str], object]) -> str | None:
        value = value_of(column)
        if value is None:
            return None
        try:
            resolved = _resolve_reference(value, ctx)
            if not _is_uri(resolved):
                if ctx.check_inputs:
                    check(resolved)
                elif not Path(resolved).is_file():   # decoded later, once, by the fetch stage
                    raise InputError(f"file not found: {resolved}")
        except (_CellError, InputError) as exc:
            fail(column, value, exc.reason)
            return None
        return resolved

    takes = {"t2v": (), "i2v": ("image",), "dance": ("image", "driving_video")}.get(mode or "")
    inputs: dict[str, str | None] = {"image": None, "driving_video": None}
    for column, check in (("image", check_image), ("driving_video", check_video)):
        given_value = value_of(column)
        if takes is None:          # bad mode: nothing to compare against
            continue
        if column in takes and given_value is None:
            fail(column, None, f"{mode} needs {'an image' if column == 'image' else 'a driving_video'}")
        elif column not in takes and given_value is not None:
            fail(column, given_value, f"{mode} takes no {column}")
        else:
            inputs[column] = reference(column, check)

    # 4. Post-processing
    post: dict[str, Any] = {}
    default_fps = config.fps if config else DEFAULT_FPS
    for column, parse in (("fps", _parse_fps), ("upscale", _parse_upscale),
                          ("preview", _parse_bool), ("num_samples", _parse_num_samples)):
        value = value_of(column)
        try:
            post[column] = parse(value) if value is not None else None
        except _CellError as exc:
            fail(column, value, exc.reason)
    fps = post.get("fps") or default_fps
    interpolate = value_of("interpolate_fps")
    if interpolate is not None:
        try:
            post["interpolate_fps"] = _parse_interpolate_fps(interpolate, fps)
        except _CellError as exc:
            fail("interpolate_fps", interpolate, exc.reason)
    watermark = value_of("watermark")
    if watermark is not None and watermark.lower().endswith(".png"):
        post["watermark"] = reference("watermark", check_image)
    elif watermark is not None:
        if len(watermark) > MAX_WATERMARK_TEXT or "\n" in watermark:
            fail("watermark", watermark,
                 f"watermark text must be one line of at most {MAX_WATERMARK_TEXT} characters")
        post["watermark"] = watermark
    post["audio"] = reference("audio", check_audio)

    # 5. Output name
    output_name = _clean(raw.get("output_name"))
    if output_name is not None and not _is_safe_name(output_name):
        fail("output_name", output_name, f"not a safe name: {SAFE_NAME_RULE}")

    # 6. Sample expansion must keep ids safe and seeds in range
    samples = post.get("num_samples") or 1
    last = f"-s{samples - 1}"
    if samples > 1 and row_id and not (_is_safe_name(row_id + last)
                                       and _is_safe_name((output_name or row_id) + last)):
        fail("num_samples", samples, f"the id or output_name with its {last} suffix would not "
                                     f"be safe: {SAFE_NAME_RULE}")
    if samples > 1 and generation and generation["seed"] + samples > 2**63:
        fail("num_samples", samples, "seed + num_samples - 1 must stay below 2^63")

    if errors or row_id is None or mode is None or prompt is None or model is None:
        return None, errors
    return ManifestRow(
        row=number, id=row_id, mode=mode, prompt=prompt, model=model,
        image=inputs["image"], driving_video=inputs["driving_video"], **generation,
        **dance,
        fps=fps, interpolate_fps=post.get("interpolate_fps"), upscale=post.get("upscale"),
        watermark=post.get("watermark"), preview=bool(post.get("preview")), audio=post.get("audio"),
        output_name=output_name or row_id, num_samples=samples,
    ), []


def _dance_settings(value_of: Callable[[str], str | None], fail: Callable[..., None]) -> dict[str, Any]:
    """fill, align_frame and lora of a dance row (guidance is checked with the request)."""
    out: dict[str, Any] = {}
    fill = value_of("fill")
    if fill is not None:
        if fill.lower() in FILLS:
            out["fill"] = fill.lower()
        else:
            fail("fill", fill, "must be " + " | ".join(FILLS) + " (what to do when the driving video is short)")
    align = value_of("align_frame")
    if align is not None:
        number = _integral(align)
        if number is None or number < 0:
            fail("align_frame", align, "must be a frame number ≥ 0 (default 0)")
        else:
            out["align_frame"] = number
    lora = value_of("lora")
    if lora is not None:
        if _is_safe_name(lora):
            out["lora"] = lora
        else:
            fail("lora", lora, f"must be a file name in the checkpoints folder: {SAFE_NAME_RULE}")
    return out


def _validate_generation(given: Mapping[str, Any], config: WanConfig, prompt: str,
                         mode: str | None = None) -> tuple[GenerationRequest | None, list[RequestError]]:
    """The engine's validation of a row's generation fields, reporting every bad one.

    The request type is the mode's (`REQUEST_TYPES`), so its defaults are too (i2v: sigma_max 200).
    `validated()` stops at the first bad field; that field is then set back to its default and the
    request validated again, so each other field is still judged by the engine's own rules (beside
    the row's other values: the aspect ratio against the row's resolution). The request is None
    when any field is bad."""
    request_type = REQUEST_TYPES.get(mode or "", GenerationRequest)
    columns = request_columns(mode)
    defaults = {**{f.name: f.default for f in dataclasses.fields(request_type)},
                "resolution": config.default_resolution}
    fields: dict[str, Any] = {"resolution": config.default_resolution,
                              **{f: "(checked as a column)" for f in _FILE_FIELDS if f in defaults}}
    for column, text in given.items():
        number = _integral(text) if column in INTEGER_COLUMNS and isinstance(text, str) else None
        fields[column] = text if number is None else number    # "17.0" → 17
    problems: list[RequestError] = []
    while True:   # at most once per field: a field set back to its default that fails again ends it
        try:
            request = request_type(prompt=prompt, **fields).validated(config)
        except RequestError as exc:
            if not any(p.field == exc.field for p in problems):
                problems.append(exc)
            if exc.field not in columns or fields.get(exc.field) == defaults[exc.field]:
                return None, problems
            fields[exc.field] = defaults[exc.field]
        else:
            return (None if problems else request), problems


def _expand_samples(row: ManifestRow) -> list[ManifestRow]:
    """num_samples=N → N rows with seeds seed…seed+N−1 and ids/output names suffixed -s0…-s{N-1}."""
    if row.num_samples == 1:
        return [row]
    return [dataclasses.replace(row, id=f"{row.id}-s{i}", output_name=f"{row.output_name}-s{i}",
                                seed=row.seed + i, sample=i)
            for i in range(row.num_samples)]


# ── cell parsers (raise _CellError with the reason) ──────────────────────────────────────────────

def _integral(text: str) -> int | None:
    """The integer a cell such as "17", "17.0" or "1e+16" writes (pandas writes an int column with
    nulls as floats), exactly; None when it is not a finite integral number."""
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        return None
    if not number.is_finite() or number.adjusted() > 100 or number != number.to_integral_value():
        return None
    return int(number)


def _parse_int(text: str, what: str) -> int:
    number = _integral(text)
    if number is None:
        raise _CellError(f"must be {what}")
    return number


def _parse_fps(text: str) -> int:
    fps = _parse_int(text, f"an integer between 1 and {MAX_FPS}")
    if not 1 <= fps <= MAX_FPS:
        raise _CellError(f"must be an integer between 1 and {MAX_FPS}")
    return fps


def _parse_interpolate_fps(text: str, fps: int) -> int:
    rule = f"an integer above fps ({fps}) and at most {MAX_INTERPOLATE_FPS}"
    target = _parse_int(text, rule)
    if not fps < target <= MAX_INTERPOLATE_FPS:
        raise _CellError(f"must be {rule}")
    return target


def _parse_upscale(text: str) -> float:
    rule = f"a number in (1, {MAX_UPSCALE:g}] (e.g. 2)"
    try:
        factor = float(text)
    except ValueError:
        raise _CellError(f"must be {rule}") from None
    if not (math.isfinite(factor) and 1 < factor <= MAX_UPSCALE):
        raise _CellError(f"must be {rule}")
    return factor


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _CellError("must be true/false, 1/0 or yes/no")


def _parse_num_samples(text: str) -> int:
    count = _parse_int(text, f"an integer between 1 and {MAX_SAMPLES}")
    if not 1 <= count <= MAX_SAMPLES:
        raise _CellError(f"must be an integer between 1 and {MAX_SAMPLES}")
    return count


# ── file references ──────────────────────────────────────────────────────────────────────────────

def _resolve_reference(value: str, ctx: _RowContext) -> str:
    """A local path (made absolute, symlinks resolved, inside the allowed roots) or an allowed URI."""
    scheme = _SCHEME.match(value)
    if scheme:
        name = scheme.group(1).lower()
        if name == "https" and not ctx.allow_https:
            try:
                host = urllib.parse.urlsplit(value).hostname
            except ValueError:   # e.g. an unclosed [ in the host
                host = None
            if not host_allowed(host, ctx.fetch_allow):
                raise _CellError(f"https host {shown(host or '(none)')} is not on the fetch allowlist "
                                 f"(TURBO_FETCH_ALLOW: {', '.join(ctx.fetch_allow) or 'empty'}); "
                                 f"add it there, or use a local path or s3://")
        if name not in ("s3", "https"):
            raise _CellError(f"{shown(name, limit=40)}:// is not allowed; use a local path or s3://")
        rest = value[len(name) + 3:] if value[len(name) + 1:].startswith("//") else ""
        host, _, key = rest.partition("/")
        if not host or not key or key.endswith("/"):
            raise _CellError(f"not a valid {name}:// URI (expected {name}://<host or bucket>/<key>)")
        return value
    path = Path(value)
    resolved = (path if path.is_absolute() else ctx.base_dir / path).resolve()
    if not any(resolved.is_relative_to(root) for root in ctx.roots):
        raise _CellError("path escapes the allowed folders ("
                         + ", ".join(str(r) for r in ctx.roots) + ")")
    return str(resolved)


def _is_uri(reference: str) -> bool:
    return reference.startswith(("s3://", "https://"))


# ── small helpers ────────────────────────────────────────────────────────────────────────────────

def _cell_problem(value: str | None) -> str | None:
    """Why a raw cell cannot be read at all (a NUL byte, over MAX_CELL_BYTES), or None."""
    if value is None:
        return None
    if "\x00" in value:
        return "contains a NUL byte"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_CELL_BYTES:
        return f"cell of {size} bytes, over the {MAX_CELL_BYTES // 1024} KiB limit"
    return None


def _describe_unknown(columns: Sequence[str]) -> str:
    """`num_frame (did you mean num_frames?), colour`: each name escaped, with the closest column."""
    parts = []
    for name in columns[:30]:
        close = difflib.get_close_matches(name.lower(), COLUMNS, n=1)
        parts.append(shown(name, limit=60) + (f" (did you mean {close[0]}?)" if close else ""))
    if len(columns) > 30:
        parts.append(f"… {len(columns) - 30} more")
    return ", ".join(parts)


def _clean(value: object) -> str | None:
    """A cell as text; empty or whitespace-only means "not given"."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _clean_run_params(run_params: Mapping[str, Any] | None) -> dict[str, str]:
    params = {k: _clean(v) for k, v in (run_params or {}).items()}
    unknown = sorted(k for k in params if k not in COLUMNS)
    if unknown:
        raise ValueError(f"run_params has unknown column(s): {', '.join(unknown)}")
    per_row = sorted(k for k in params if k in ROW_ONLY_COLUMNS)
    if per_row:
        raise ValueError(f"run_params cannot set per-row column(s): {', '.join(per_row)}")
    return {k: v for k, v in params.items() if v is not None}


def _is_safe_name(name: str) -> bool:
    return bool(SAFE_NAME.match(name)) and ".." not in name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
