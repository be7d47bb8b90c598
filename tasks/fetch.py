"""Inputs stage: bring every file a manifest row points at into the row's work folder, checked.

    run_fetch(row, work_dir, settings) → FetchedInputs(files, digests, t_fetch_s, bytes)

    reference ─┬─ /local/path   hard link (or copy) into the work folder
               ├─ s3://b/key    GetObject with the sink's R2_* credentials, or TURBO_INPUT_PROFILE
               └─ https://h/p   hosts on TURBO_FETCH_ALLOW only; ≤ 5 redirects, each https + allowed
    → <work>/inputs/<column>.<ext>   a fixed name (never the user's: no `%d` for ffmpeg to expand)
    → size limit while streaming → magic bytes → Pillow decode / ffprobe, before any GPU time

Every failure is an `InputError` naming row, column and URI (`row 3, column image, s3://b/a.png:
not found (404)`); server errors, throttling, timeouts, resets and truncated bodies are
`InputTransientError` and retried by the task. Messages never hold credentials, signatures or
query strings. A row without references (t2v) does no I/O at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import stat
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import botocore.exceptions
import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import InputError, InputTransientError, UploadError, retry_transient
from tasks.inputs import (
    KIND_FORMATS,
    SNIFF_BYTES,
    check_audio,
    check_image,
    check_video,
    host_allowed,
    parse_host_list,
    sniff_format,
)
from tasks.manifest import ManifestRow
from tasks.upload import make_s3_client_from_env, r2_client_config

__all__ = ["DEFAULT_MAX_BYTES", "FetchSettings", "FetchedInputs", "display_uri", "fetch",
           "make_input_s3_client", "references", "run_fetch"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
REFERENCE_COLUMNS = ("image", "driving_video", "audio", "watermark")
DEFAULT_MAX_BYTES: Mapping[str, int] = {"image": 50 * MiB, "watermark": 10 * MiB,
                                        "audio": 200 * MiB, "driving_video": 2048 * MiB}
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_DEADLINE_S = 1800.0     # one row's whole fetch; 2 GiB at ~1.2 MB/s
MAX_REDIRECTS = 5
INPUTS_FOLDER = "inputs"
_CHUNK = 1 * MiB
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_S3_AUTH_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "Forbidden",
                  "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_S3_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound"}
_S3_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                       "TooManyRequests", "Throttling", "ThrottlingException"}
_CHECKS = {"image": check_image, "watermark": check_image, "driving_video": check_video,
           "audio": check_audio}


# ── settings and result ──────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class FetchSettings:
    """How inputs are fetched. Read the environment once, at the edge, with `from_env`.

    max_bytes: per-column limits; a column missing from it keeps its DEFAULT_MAX_BYTES value.
    Remote files are decoded (Pillow) or probed (ffprobe) here; local ones were at validation,
    so they get the size and magic-byte checks only, unless decode_local is set.
    timeout_s: connect and read timeout of one request. deadline_s: the whole row's fetch.
    """
    allow_hosts: tuple[str, ...] = ()
    ca_bundle: str | None = None
    input_profile: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_BYTES))
    deadline_s: float = DEFAULT_DEADLINE_S
    decode_local: bool = False    # local files are decoded by manifest validation already

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FetchSettings:
        """TURBO_FETCH_ALLOW (comma-separated hosts, `*.example.com` allowed; empty: no https),
        TURBO_FETCH_CA_BUNDLE (PEM file), TURBO_INPUT_PROFILE (AWS shared-config profile for
        s3:// inputs), TURBO_FETCH_TIMEOUT_S, TURBO_FETCH_DEADLINE_S, and a size limit per
        column, TURBO_FETCH_MAX_<COLUMN>_BYTES (e.g. TURBO_FETCH_MAX_IMAGE_BYTES)."""
        env = os.environ if env is None else env
        limits = dict(DEFAULT_MAX_BYTES)
        for column in DEFAULT_MAX_BYTES:
            name = f"TURBO_FETCH_MAX_{column.upper()}_BYTES"
            if env.get(name):
                limits[column] = int(_seconds_from_env(env, name, 1.0))   # a positive number
        return cls(allow_hosts=parse_host_list(env.get("TURBO_FETCH_ALLOW")), max_bytes=limits,
                   ca_bundle=env.get("TURBO_FETCH_CA_BUNDLE") or None,
                   input_profile=env.get("TURBO_INPUT_PROFILE") or None,
                   timeout_s=_seconds_from_env(env, "TURBO_FETCH_TIMEOUT_S", DEFAULT_TIMEOUT_S),
                   deadline_s=_seconds_from_env(env, "TURBO_FETCH_DEADLINE_S", DEFAULT_DEADLINE_S))

    def limit_for(self, column: str) -> int:
        return int(self.max_bytes.get(column, DEFAULT_MAX_BYTES[column]))


@dataclass(frozen=True)
class FetchedInputs:
    files: dict[str, Path]      # column -> local file in the work folder
    digests: dict[str, str]     # column -> "sha256:<hex>" of the fetched content
    t_fetch_s: float
    bytes: int


def references(row: ManifestRow) -> dict[str, str]:
    """column -> reference for every file the row points at (a text watermark is not a file)."""
    found = {c: getattr(row, c) for c in ("image", "driving_video", "audio") if getattr(row, c)}
    if row.watermark_is_image and row.watermark:
        found["watermark"] = row.watermark
    return found


# ── the stage ────────────────────────────────────────────────────────────────────────────────────

def run_fetch(row: ManifestRow, work_dir: Path, settings: FetchSettings, *,
              s3_client: Any = None) -> FetchedInputs:
    """Fetch, size-check, sniff and decode/probe every reference of `row` into work_dir/inputs."""
    refs = references(row)
    if not refs:
        return FetchedInputs(files={}, digests={}, t_fetch_s=0.0, bytes=0)
    start = time.monotonic()
    deadline = start + settings.deadline_s
    inputs_dir = Path(work_dir) / INPUTS_FOLDER
    inputs_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    digests: dict[str, str] = {}
    total = 0
    with _Sources(settings, s3_client) as sources:
        for column, reference in refs.items():
            try:
                path, digest, size = _fetch_one(column, reference, inputs_dir, settings, deadline,
                                                sources)
            except InputError as exc:
                raise exc.located(row=row.row, column=column,
                                  uri=display_uri(reference)) from exc.__cause__
            files[column], digests[column] = path, digest
            total += size
            logger.info("fetch row %d %s %s -> %s (%d bytes, %s)", row.row, column,
                        display_uri(reference), path.name, size, digest[:19])
    return FetchedInputs(files=files, digests=digests, t_fetch_s=time.monotonic() - start,
                         bytes=total)


# Transient failures (5xx, 429, timeouts, resets) get two more tries; refused or bad inputs none.
fetch = task(name="fetch", task_run_name="fetch-{row.id}", cache_policy=NO_CACHE,
             retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_transient)(run_fetch)


def display_uri(reference: str) -> str:
    """A reference as it may appear in messages and logs: https without userinfo, query or fragment."""
    if not reference.startswith("https://"):
        return reference
    try:
        parts = urllib.parse.urlsplit(reference)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "https://(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}{f':{port}' if port else ''}{parts.path}"


# ── one file ─────────────────────────────────────────────────────────────────────────────────────

def _fetch_one(column: str, reference: str, inputs_dir: Path, settings: FetchSettings,
               deadline: float, sources: _Sources) -> tuple[Path, str, int]:
    limit = settings.limit_for(column)
    partial = inputs_dir / f".{column}.partial"
    for stale in [partial, *inputs_dir.glob(f"{column}.*")]:   # an earlier attempt's file
        stale.unlink(missing_ok=True)
    try:
        if reference.startswith("s3://"):
            with _Download(partial, limit) as out:
                _get_s3(sources.s3(), reference, out, deadline)
            size, digest, head = out.size, out.digest, out.head
        elif reference.startswith("https://"):
            with _Download(partial, limit) as out:
                _get_https(sources, reference, out, deadline)
            size, digest, head = out.size, out.digest, out.head
        else:
            size, digest, head = _place_local(Path(reference), partial, limit)
        if size == 0:
            raise InputError("empty file (0 bytes)")
        ext = sniff_format(head, column)
        if ext is None:
            raise InputError(f"wrong file type: expected {KIND_FORMATS[column]}, "
                             f"but the file starts with {_hex(head)}")
        final = inputs_dir / f"{column}.{ext}"
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    remote = reference.startswith(("s3://", "https://"))
    try:
        # Local files were decoded when the manifest was validated: decoded once per batch.
        if remote or settings.decode_local:
            _CHECKS[column](final)
    except InputError:
        final.unlink(missing_ok=True)   # never leave a refused file where a stage could read it
        raise
    return final, f"sha256:{digest}", size


class _Download:
    """The partial file being written: counts, hashes and keeps the first bytes; refuses a byte
    past the limit, whatever Content-Length said."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.size = 0
        self.head = b""
        self._sha = hashlib.sha256()
        self._file = path.open("wb")

    def refuse_declared(self, length: object) -> None:
        """Refuse early when the server already declares more than the limit."""
        try:
            declared = int(str(length)) if length is not None else None
        except ValueError:
            return
        if declared is not None and declared > self.limit:
            raise InputError(f"too large: {_size(declared)} declared, the limit is {_size(self.limit)}")

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.limit:
            raise InputError(f"too large: more than the {_size(self.limit)} limit")
        self._file.write(chunk)
        self._sha.update(chunk)
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[:SNIFF_BYTES - len(self.head)]
        self.size += len(chunk)

    @property
    def digest(self) -> str:
        return self._sha.hexdigest()

    def __enter__(self) -> _Download:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._file.close()


def _check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise InputTransientError("timed out: the row's fetch deadline passed "
                                  "(TURBO_FETCH_DEADLINE_S)")


# ── local files ──────────────────────────────────────────────────────────────────────────────────

def _place_local(source: Path, partial: Path, limit: int) -> tuple[int, str, bytes]:
    """Hard-link (or copy, across file systems) a regular file to `partial`; (size, sha256, head)."""
    try:
        info = source.stat()
    except FileNotFoundError:
        raise InputError("file not found") from None
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file")
    if info.st_size > limit:
        raise InputError(f"too large: {_size(info.st_size)}, the limit is {_size(limit)}")
    try:
        os.link(source, partial)
    except OSError:          # another file system, or links not permitted: copy instead
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except OSError as exc:
            raise InputError(f"cannot copy it ({exc.strerror or type(exc).__name__})") from None
    # Hash what was placed (the same inode when linked), so the digest is what later stages read.
    sha, size, head = hashlib.sha256(), 0, b""
    with partial.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise InputError(f"too large: more than the {_size(limit)} limit")
            sha.update(chunk)
            head = head or chunk[:SNIFF_BYTES]
    return size, sha.hexdigest(), head


# ── s3:// ────────────────────────────────────────────────────────────────────────────────────────

def make_input_s3_client(settings: FetchSettings) -> Any:
    """The client for s3:// inputs: the TURBO_INPUT_PROFILE profile (credentials, region,
    endpoint_url and ca_bundle from the AWS shared config) if set, else the sink's R2_* client."""
    if not settings.input_profile:
        try:
            return make_s3_client_from_env(connect_timeout=settings.timeout_s,
                                           read_timeout=settings.timeout_s)
        except UploadError as exc:
            raise InputError(f"no credentials for s3:// inputs: {exc}") from None
    try:
        session = boto3.session.Session(profile_name=settings.input_profile)
    except botocore.exceptions.ProfileNotFound:
        raise InputError(f"input profile {settings.input_profile!r} (TURBO_INPUT_PROFILE) is not "
                         f"in the AWS config files") from None
    config = r2_client_config(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s)
    return session.client("s3", config=config)


def _get_s3(client: Any, uri: str, out: _Download, deadline: float) -> None:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise InputError("not a valid s3:// URI (expected s3://<bucket>/<key>)")
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            out.refuse_declared(response.get("ContentLength"))
            for chunk in body.iter_chunks(_CHUNK):
                out.write(chunk)
                _check_deadline(deadline)
        finally:
            body.close()
    except botocore.exceptions.ClientError as exc:
        raise _s3_client_error(exc) from exc
    except botocore.exceptions.NoCredentialsError:
        raise InputError("no credentials for s3:// inputs (R2_* variables or "
                         "TURBO_INPUT_PROFILE)") from None
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
            botocore.exceptions.IncompleteReadError) as exc:
        # Only the class name: botocore's texts can hold endpoint URLs.
        raise InputTransientError(f"transfer failed ({type(exc).__name__})") from exc


def _s3_client_error(exc: botocore.exceptions.ClientError) -> InputError:
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    code = str(exc.response.get("Error", {}).get("Code", ""))
    label = " ".join(x for x in (str(status) if status else "", code if code != str(status) else "") if x)
    if status == 404 or code in _S3_MISSING_CODES:
        return InputError("bucket not found (404 NoSuchBucket)" if code == "NoSuchBucket"
                          else "not found (404)")
    if status in (401, 403) or code in _S3_AUTH_CODES:
        return InputError(f"access denied ({label}): check the credentials for s3:// inputs "
                          f"(R2_* variables or TURBO_INPUT_PROFILE)")
    if status >= 500 or status == 429 or code in _S3_TRANSIENT_CODES:
        return InputTransientError(f"server error ({label})")
    return InputError(f"S3 error ({label})")


# ── https:// ─────────────────────────────────────────────────────────────────────────────────────

def _get_https(sources: _Sources, url: str, out: _Download, deadline: float) -> None:
    """GET with redirects followed by hand: each hop must be https to an allowed host."""
    settings = sources.settings
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise InputError("not a valid https:// URL") from None
    if not host_allowed(target.host, settings.allow_hosts):
        raise InputError(f"host {target.host or '(none)'} is not on the fetch allowlist "
                         f"(TURBO_FETCH_ALLOW: {', '.join(settings.allow_hosts) or 'empty'})")
    for hop in range(MAX_REDIRECTS + 1):
        where = "" if hop == 0 else f" at {display_uri(str(target))} (after {hop} redirect(s))"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _check_deadline(deadline)
        timeout = min(settings.timeout_s, remaining)
        try:
            with sources.http().stream("GET", target, timeout=timeout) as response:
                status = response.status_code
                if status in _REDIRECT_CODES:
                    target = _redirect_target(target, response.headers.get("location"),
                                              settings.allow_hosts)
                    continue
                _check_http_status(status, where)
                out.refuse_declared(response.headers.get("content-length"))
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise InputError(f"the server compressed the body (Content-Encoding: "
                                     f"{encoding}) although identity was asked for{where}")
                for chunk in response.iter_raw(_CHUNK):
                    out.write(chunk)
                    _check_deadline(deadline)
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) != out.size:
                    raise InputTransientError(f"truncated body: {out.size} of {declared} bytes{where}")
                return
        except httpx.TimeoutException:
            if timeout < settings.timeout_s:
                raise InputTransientError(f"timed out: the row's fetch deadline of "
                                          f"{settings.deadline_s:g} s passed (TURBO_FETCH_DEADLINE_S)"
                                          f"{where}") from None
            raise InputTransientError(f"timed out (no answer within {timeout:g} s){where}") from None
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            raise InputError(f"cannot request it ({type(exc).__name__}){where}") from None
        except httpx.ConnectError as exc:
            if _is_certificate_error(exc):
                raise InputError(f"TLS certificate not trusted{where} (for a private CA set "
                                 f"TURBO_FETCH_CA_BUNDLE)") from None
            raise InputTransientError(f"connection failed ({_one_line(exc)}){where}") from None
        except httpx.TransportError as exc:   # reset, peer closed early (truncated), proxy …
            raise InputTransientError(f"transfer failed ({type(exc).__name__}: "
                                      f"{_one_line(exc)}){where}") from None
    raise InputError(f"more than {MAX_REDIRECTS} redirects")


def _redirect_target(current: httpx.URL, location: str | None,
                     allow: tuple[str, ...]) -> httpx.URL:
    if not location:
        raise InputError("redirect without a Location header")
    try:
        target = current.join(location)
    except httpx.InvalidURL:
        raise InputError("redirected to an invalid URL") from None
    shown = _display_any(target)
    if target.scheme != "https":
        raise InputError(f"redirected to {shown}, which is not https")
    if not host_allowed(target.host, allow):
        raise InputError(f"redirected to host {target.host}, which is not on the fetch "
                         f"allowlist (TURBO_FETCH_ALLOW)")
    return target


def _check_http_status(status: int, where: str) -> None:
    if status == 200:
        return
    if status in (401, 403):
        raise InputError(f"access denied ({status}){where}")
    if status in (404, 410):
        raise InputError(f"not found ({status}){where}")
    if status == 429:
        raise InputTransientError(f"rate limited (429){where}")
    if status >= 500 or status == 408:
        raise InputTransientError(f"server error ({status}){where}")
    raise InputError(f"unexpected HTTP status {status}{where}")


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# ── clients, built on first use ──────────────────────────────────────────────────────────────────

class _Sources:
    """The s3 and https clients of one run_fetch call, built only when a reference needs them."""

    def __init__(self, settings: FetchSettings, s3_client: Any = None):
        self.settings = settings
        self._s3 = s3_client
        self._http: httpx.Client | None = None

    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = make_input_s3_client(self.settings)
        return self._s3

    def http(self) -> httpx.Client:
        if self._http is None:
            verify: ssl.SSLContext | bool = True
            if self.settings.ca_bundle:
                try:
                    verify = ssl.create_default_context(cafile=self.settings.ca_bundle)
                except (OSError, ssl.SSLError) as exc:
                    raise InputError(f"TURBO_FETCH_CA_BUNDLE {self.settings.ca_bundle} cannot be "
                                     f"read as PEM certificates ({type(exc).__name__})") from None
            # trust_env=False: no proxy variables, no .netrc credentials sent to input hosts.
            self._http = httpx.Client(verify=verify, follow_redirects=False, trust_env=False,
                                      timeout=self.settings.timeout_s,
                                      headers={"Accept-Encoding": "identity"})
        return self._http

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._http is not None:
            self._http.close()


# ── small helpers ────────────────────────────────────────────────────────────────────────────────

def _seconds_from_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number above 0") from None
    if not seconds > 0:
        raise ValueError(f"{name}={raw!r}: expected a number above 0")
    return seconds


def _display_any(url: httpx.URL) -> str:
    """Any URL (a redirect may point at http://) without userinfo, query or fragment."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n} bytes"


def _hex(head: bytes) -> str:
    return head[:8].hex(" ") or "(nothing)"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    line = " ".join(str(exc).split()) or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
