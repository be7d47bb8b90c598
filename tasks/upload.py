"""Upload sinks: a local directory (default) or an S3-compatible bucket (Cloudflare R2).

    UploadError (tasks/errors.py)  base of every upload failure
    ├── UploadAuthError         403 / SignatureDoesNotMatch / InvalidAccessKeyId: not retried
    ├── UploadTransientError    5xx, 429, timeouts, connection errors: retryable
    ├── UploadIntegrityError    the server computed another checksum than we sent (BadDigest): retryable
    └── UploadConflictError     the key already holds different bytes (another sha256)

Writes are idempotent: an object whose size and metadata sha256 already match is skipped, and a
new object is written with If-None-Match: * so a concurrent writer can never be overwritten; a
412 is resolved by comparing sha256. Credentials are wrapped in `Secret`, whose repr hides them.

The local sink does the same on a file system: each file is copied to a temp file beside its
target, `.<name>.<pid>@<host>.<random>.partial` (mode 0o666 & ~umask, like any new file), then
hard-linked to the target name, which fails when the name exists, so two writers of one key
cannot both win; the loser compares sha256 (same bytes: skipped, else UploadConflictError).
`overwrite=True` renames over the target instead. A LocalSink, when created, removes the temp
files a killed run left anywhere under its root: at once when the writer's pid is from this host
and no longer runs, otherwise (another host's, or an older name without pid) after
PARTIAL_GRACE_SECONDS without a write.

Reads (`read_bytes`, `verify`, `list`) raise the same tree: a 5xx, a timeout, a dropped
connection or a body shorter than its Content-Length is an UploadTransientError.
"""

from __future__ import annotations

import base64
import builtins
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from tasks.errors import (
    UploadAuthError,
    UploadConflictError,
    UploadError,
    UploadIntegrityError,
    UploadTransientError,
    is_transient,
)

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB          # R2/S3 minimum for every part except the last
MAX_PRESIGN_SECONDS = 604_800    # 7 days: the R2 and SigV4 limit
IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
_HASH_CHUNK = 1 * MiB
PARTIAL_GRACE_SECONDS = 3600     # a temp file nobody wrote to for this long is stale, whoever wrote it

_AUTH_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "Forbidden", "403",
               "InvalidToken", "ExpiredToken", "UnrecognizedClientException"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "TooManyRequests",
                    "RequestTimeTooSkewed"}


def is_retryable(exc: BaseException) -> bool:
    """For a Prefect `retry_condition_fn`: only transient failures are worth another attempt."""
    return is_transient(exc)


class Secret:
    """A string that never shows up in repr(), str(), logs or tracebacks. Read it with `.get()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickle the value into result storage
        raise TypeError("Secret cannot be pickled")


@dataclass(frozen=True)
class UploadResult:
    uri: str
    key: str
    sha256: str
    bytes: int
    skipped: bool
    presigned_url: str | None = None


class Sink(Protocol):
    def put(self, local_path: Path, key: str, content_type: str = "application/octet-stream",
            cache_control: str = IMMUTABLE_CACHE_CONTROL, *, overwrite: bool = False) -> UploadResult: ...

    def read_bytes(self, key: str, missing_ok: bool = False) -> bytes | None: ...

    def verify(self, key: str, size: int, sha256: str) -> bool: ...

    def list(self, prefix: str = "") -> builtins.list[str]: ...


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Local directory
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalSink:
    root: Path

    def __post_init__(self) -> None:
        self.remove_stale_partials()

    def put(self, local_path: Path, key: str, content_type: str = "application/octet-stream",
            cache_control: str = IMMUTABLE_CACHE_CONTROL, *, overwrite: bool = False) -> UploadResult:
        """Copy into root/key. Identical content is skipped; different content is a conflict unless overwrite.

        Safe against a concurrent writer of the same key (another process, another host on a shared
        file system): without `overwrite` exactly one of them creates the file and the others skip
        (same bytes) or raise UploadConflictError (different bytes); with it the file is replaced
        atomically. Readers never see a partial file."""
        local_path = Path(local_path)
        target = self.root / _clean_key(key)
        size, sha256 = local_path.stat().st_size, file_sha256(local_path)

        def done(skipped: bool) -> UploadResult:
            return UploadResult(uri=target.as_uri(), key=key, sha256=sha256, bytes=size, skipped=skipped)

        def skip_if_same() -> UploadResult:
            # The target exists; without overwrite nobody replaces it, so this answer is final.
            if not self.verify(key, size, sha256):
                raise UploadConflictError(f"{target} already exists with different content "
                                          f"(local sha256 {sha256}); pass overwrite=True to replace it")
            return done(skipped=True)

        if self.verify(key, size, sha256):
            return done(skipped=True)
        if not overwrite and target.exists():   # it may have appeared since verify: check again
            return skip_if_same()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_partial(local_path, target)
        try:
            if overwrite:
                os.replace(tmp, target)
            elif not _link_new(tmp, target):   # another writer created the target first
                return skip_if_same()
        finally:
            tmp.unlink(missing_ok=True)        # after a link the temp name is a second name of the target
        return done(skipped=False)

    def read_bytes(self, key: str, missing_ok: bool = False) -> bytes | None:
        target = self.root / _clean_key(key)
        if missing_ok and not target.is_file():
            return None
        return target.read_bytes()

    def verify(self, key: str, size: int, sha256: str) -> bool:
        """True when root/key exists with exactly this size and sha256."""
        target = self.root / _clean_key(key)
        return target.is_file() and target.stat().st_size == size and file_sha256(target) == sha256

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sink-relative keys that start with `prefix` (a string prefix, as in S3: "runs/" is the
        folder, "runs" also matches "runs-old/..."), sorted; temp files are left out."""
        prefix = _clean_prefix(prefix)
        folder = prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root / folder):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else f"{rel}/"
            dirnames[:] = [d for d in dirnames if f"{base}{d}/".startswith(prefix) or prefix.startswith(f"{base}{d}/")]
            keys += [f"{base}{name}" for name in filenames
                     if f"{base}{name}".startswith(prefix) and not _is_partial_name(name)]
        return sorted(keys)

    def remove_stale_partials(self, grace_seconds: float = PARTIAL_GRACE_SECONDS) -> builtins.list[Path]:
        """Delete temp files left under root by writers that died; the paths removed.

        A temp file is stale when its writer's pid was on this host and no longer exists, or, for
        another host's file or one without a pid, when nothing wrote to it for `grace_seconds`
        (also the fallback when a live process reuses the pid). Never raises: a file that cannot be
        removed is logged and left."""
        removed: builtins.list[Path] = []
        if not self.root.is_dir():
            return removed
        host, now = _host_tag(), time.time()
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    if _is_partial_name(name) and _is_stale_partial(path, host, now, grace_seconds):
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass                     # its writer finished, or another sweep was first
                except OSError as exc:
                    logger.warning("could not remove stale temp file %s: %s", path, exc)
        if removed:
            logger.info("removed %d stale temp file(s) left under %s by killed runs", len(removed), self.root)
        return removed


# `.<name>.<pid>@<host>.<8 hex>.partial` (this module), and `.<name>.<8 chars>.partial` (tempfile.mkstemp,
# before the pid was in the name). The host tag keeps only [A-Za-z0-9-], so the name parses from the right.
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}\.partial")
_MKSTEMP_PARTIAL = re.compile(r"\..+\.[a-z0-9_]{8}\.partial")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "localhost"


def _partial_name(target_name: str, pid: int | None = None, host: str | None = None) -> str:
    # The target name is cut to 100 bytes to keep the temp name within NAME_MAX (255 bytes).
    short = target_name.encode()[:100].decode(errors="ignore")
    return (f".{short}.{os.getpid() if pid is None else pid}@{host or _host_tag()}"
            f".{secrets.token_hex(4)}.partial")


def _is_partial_name(name: str) -> bool:
    return bool(_PARTIAL.fullmatch(name) or _MKSTEMP_PARTIAL.fullmatch(name))


def _is_stale_partial(path: Path, host: str, now: float, grace_seconds: float) -> bool:
    match = _PARTIAL.fullmatch(path.name)
    if match and match["host"] == host and not _pid_running(int(match["pid"])):
        return True
    return now - path.stat().st_mtime > grace_seconds


def _pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this host (in doubt: yes)."""
    if os.name != "posix" or pid <= 0:   # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                      # EPERM: it exists, owned by someone else
        return True
    return True


def _write_partial(source: Path, target: Path) -> Path:
    """Copy `source` to a new temp file beside `target`, fsynced. Created with mode 0o666, so the
    umask (and a default ACL) applies as to any new file; mkstemp's 0o600 would stay on the target."""
    while True:
        tmp = target.with_name(_partial_name(target.name))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:          # 32 random bits taken: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(_HASH_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


# link(2) answers these where the file system has no hard links (vfat, some FUSE and SMB mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _link_new(tmp: Path, target: Path) -> bool:
    """Give tmp's complete file the name `target` unless that name exists (then False). link(2) fails
    with EEXIST instead of replacing, so of several writers exactly one creates the target."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    logger.warning("%s: no hard links on this file system; a concurrent writer of the same key may "
                   "replace this file unnoticed", target.parent)
    if target.exists():
        return False
    os.replace(tmp, target)
    return True


def _clean_key(key: str) -> str:
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid object key {key!r}: must be a relative path without '..'")
    return "/".join(parts)


def _clean_prefix(prefix: str) -> str:
    """'' (everything) or a key prefix without '..'; a trailing '/' is kept (it ends at a folder)."""
    if not prefix.strip("/"):
        return ""
    cleaned = _clean_key(prefix)
    return f"{cleaned}/" if prefix.endswith("/") else cleaned


# ---------------------------------------------------------------------------------------------
# R2 / S3 client
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class R2Credentials:
    access_key_id: str
    secret_access_key: Secret = field(repr=True)  # Secret's own repr hides the value
    account_id: str | None = None
    endpoint_url: str | None = None


def r2_credentials(environ: dict[str, str] | None = None) -> R2Credentials:
    """Read R2 credentials from env (`R2_*`) or, if `R2_SECRET_BLOCK` is set, from that Prefect Secret block."""
    env = dict(os.environ if environ is None else environ)
    block_name = env.get("R2_SECRET_BLOCK")
    if block_name:
        from prefect.blocks.system import Secret as SecretBlock

        value: Any = SecretBlock.load(block_name).get()  # type: ignore[union-attr]
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise UploadError(f"Prefect Secret block {block_name!r} must hold a JSON object with R2_* keys")
        env = {**env, **{k: str(v) for k, v in value.items()}}
    missing = [name for name in ("R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY") if not env.get(name)]
    if not env.get("R2_ACCOUNT_ID") and not env.get("R2_ENDPOINT_URL"):
        missing.append("R2_ACCOUNT_ID (or R2_ENDPOINT_URL)")
    if missing:
        raise UploadError(f"R2 credentials missing: set {', '.join(missing)} in the environment "
                          f"or in the Prefect Secret block named by R2_SECRET_BLOCK")
    return R2Credentials(access_key_id=env["R2_ACCESS_KEY_ID"], secret_access_key=Secret(env["R2_SECRET_ACCESS_KEY"]),
                         account_id=env.get("R2_ACCOUNT_ID") or None, endpoint_url=env.get("R2_ENDPOINT_URL") or None)


def r2_client_config(*, max_attempts: int = 5, connect_timeout: float = 10, read_timeout: float = 60) -> Config:
    """The botocore configuration every S3/R2 client here uses (sink, manifests, inputs)."""
    return Config(
        signature_version="s3v4",  # also for presigned URLs (botocore would otherwise presign SigV2 in us-east-1)
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
        # total_max_attempts counts the first try; botocore's "max_attempts" key would count retries only
        # (max_attempts=5 sends up to 6 requests).
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


def make_s3_client(endpoint_url: str | None = None, account_id: str | None = None, *, access_key_id: str,
                   secret_access_key: str | Secret, region: str = "auto", verify: str | bool | None = None,
                   max_attempts: int = 5, connect_timeout: float = 10, read_timeout: float = 60) -> Any:
    """A boto3 S3 client configured for R2.

    `when_required` checksums keep PutObject/UploadPart off the aws-chunked trailer format that R2
    rejects; path-style addressing works on every endpoint. `region="auto"` is R2's region; local
    test servers that check the signing region (ministack) need "us-east-1", which R2 also accepts.
    """
    if endpoint_url is None:
        if not account_id:
            raise UploadError("make_s3_client needs endpoint_url or account_id")
        endpoint_url = f"https://{account_id}.r2.cloudflarestorage.com"
    secret = secret_access_key if isinstance(secret_access_key, Secret) else Secret(secret_access_key)
    config = r2_client_config(max_attempts=max_attempts, connect_timeout=connect_timeout,
                              read_timeout=read_timeout)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
        aws_secret_access_key=secret.get(), verify=verify, config=config)


def make_s3_client_from_env(environ: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """A client from the R2_* variables. R2_CA_BUNDLE (a PEM file) is the CA to trust for a private
    or test endpoint; without it boto3's default applies (AWS_CA_BUNDLE, then certifi)."""
    creds = r2_credentials(environ)
    env = os.environ if environ is None else environ
    if env.get("R2_CA_BUNDLE"):
        kwargs.setdefault("verify", env["R2_CA_BUNDLE"])
    if env.get("R2_REGION"):   # R2 itself wants "auto"; S3-protocol test servers want us-east-1
        kwargs.setdefault("region", env["R2_REGION"])
    return make_s3_client(creds.endpoint_url, creds.account_id, access_key_id=creds.access_key_id,
                          secret_access_key=creds.secret_access_key, **kwargs)


DEFAULT_PRESIGN_EXPIRES = 24 * 3600


def presign_expiry_from_env() -> int | None:
    """R2_PRESIGN_EXPIRES seconds (default one day, at most 7 days; 0 records no presigned URL)."""
    raw = os.environ.get("R2_PRESIGN_EXPIRES", str(DEFAULT_PRESIGN_EXPIRES))
    try:
        seconds = int(raw)
    except ValueError:
        raise ValueError(f"R2_PRESIGN_EXPIRES={raw!r}: expected whole seconds, at most 604800") from None
    if seconds == 0:
        return None
    _check_presign_expiry(seconds)
    return seconds


def sink_from_uri(uri: str, client: Any = None, **s3_options: Any) -> LocalSink | S3Sink:
    """`s3://bucket/prefix` -> S3Sink (client from R2_* env unless given); anything else -> LocalSink."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"sink URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        s3_options.setdefault("presign_expires", presign_expiry_from_env())
        return S3Sink(bucket, prefix, client if client is not None else make_s3_client_from_env(), **s3_options)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return LocalSink(Path(uri))


# ---------------------------------------------------------------------------------------------
# S3 sink
# ---------------------------------------------------------------------------------------------

class S3Sink:
    def __init__(self, bucket: str, prefix: str, client: Any, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 part_size: int = DEFAULT_PART_SIZE, presign_expires: int | None = None):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= 5 MiB ({MIN_PART_SIZE}), got {part_size}")
        if presign_expires is not None:
            _check_presign_expiry(presign_expires)
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.multipart_threshold, self.part_size, self.presign_expires = multipart_threshold, part_size, presign_expires

    def __repr__(self) -> str:
        return f"S3Sink(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def full_key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local_path: Path, key: str, content_type: str = "application/octet-stream",
            cache_control: str = IMMUTABLE_CACHE_CONTROL, *, overwrite: bool = False,
            skip_if_present: bool = True) -> UploadResult:
        """Upload unless an identical object exists. Without `overwrite` the write is conditional
        (If-None-Match: *) and different existing content raises UploadConflictError; with it, the
        object is replaced (for mutable files such as records and metrics)."""
        local_path = Path(local_path)
        full_key = self.full_key(key)
        size, sha256 = local_path.stat().st_size, file_sha256(local_path)
        with _translate_errors(self.bucket, full_key):
            skipped = skip_if_present and self._matches_existing(full_key, size, sha256, missing_ok=True)
            if not skipped:
                write = self._put_single if size < self.multipart_threshold else self._put_multipart
                written = write(local_path, full_key, sha256, content_type, cache_control, overwrite)
                if not written:  # 412: someone else wrote the key first
                    if not self._matches_existing(full_key, size, sha256, missing_ok=False):
                        raise UploadConflictError(
                            f"s3://{self.bucket}/{full_key} already exists with different content "
                            f"(local sha256 {sha256}); the existing object was kept")
                    skipped = True
        presigned = self.presign(full_key, self.presign_expires) if self.presign_expires else None
        logger.info("upload %s -> s3://%s/%s (%d bytes, skipped=%s)", local_path.name, self.bucket, full_key,
                    size, skipped)
        return UploadResult(uri=f"s3://{self.bucket}/{full_key}", key=full_key, sha256=sha256, bytes=size,
                            skipped=skipped, presigned_url=presigned)

    def presign(self, full_key: str, expires_seconds: int) -> str:
        _check_presign_expiry(expires_seconds)
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": full_key}, ExpiresIn=expires_seconds))

    def read_bytes(self, key: str, missing_ok: bool = False) -> bytes | None:
        """The object's bytes; None for a missing key when `missing_ok` (a missing bucket still raises).
        A body shorter than its Content-Length is an UploadTransientError, never a short result."""
        full_key = self.full_key(key)
        with _translate_errors(self.bucket, full_key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            except botocore.exceptions.ClientError as exc:
                if missing_ok and _is_missing_key(exc):
                    return None
                raise
            data = bytes(response["Body"].read())
        expected = response.get("ContentLength")
        if expected is not None and len(data) != expected:
            raise UploadTransientError(f"s3://{self.bucket}/{full_key}: download cut short, "
                                       f"{len(data)} of {expected} bytes")
        return data

    def verify(self, key: str, size: int, sha256: str) -> bool:
        """True when the object exists with this size and metadata sha256 (one HEAD)."""
        full_key = self.full_key(key)
        with _translate_errors(self.bucket, full_key):
            return self._matches_existing(full_key, size, sha256, missing_ok=True)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sink-relative keys that start with `prefix` (S3 semantics: "runs/" is the folder, "runs"
        also matches "runs-old/..."), sorted. Pages through ListObjectsV2."""
        base = f"{self.prefix}/" if self.prefix else ""
        full_prefix = base + _clean_prefix(prefix)
        keys: builtins.list[str] = []
        with _translate_errors(self.bucket, full_prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=full_prefix):
                keys += [obj["Key"][len(base):] for obj in page.get("Contents", [])]
        return sorted(key for key in keys if key)   # "" would be a folder marker named like the prefix

    # -- internals ------------------------------------------------------------------------------

    def _matches_existing(self, full_key: str, size: int, sha256: str, *, missing_ok: bool) -> bool:
        """True when the object exists with our size and sha256. Only a 404 means absent."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full_key)
        except botocore.exceptions.ClientError as exc:
            if missing_ok and _status(exc) == 404:
                return False
            raise
        return bool(head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256)

    def _put_single(self, local_path: Path, full_key: str, sha256: str, content_type: str,
                    cache_control: str, overwrite: bool) -> bool:
        # ChecksumSHA256 goes out as a plain x-amz-checksum-sha256 header under when_required;
        # ChecksumAlgorithm="SHA256" would switch back to the aws-chunked trailer R2 rejects.
        with local_path.open("rb") as body:
            return _if_none_match(lambda: self.client.put_object(
                Bucket=self.bucket, Key=full_key, Body=body, **_condition(overwrite),
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(), Metadata={"sha256": sha256},
                ContentType=content_type, CacheControl=cache_control))

    def _put_multipart(self, local_path: Path, full_key: str, sha256: str, content_type: str,
                       cache_control: str, overwrite: bool) -> bool:
        # Low-level calls: upload_file cannot send IfNoneMatch. Equal part sizes (last one smaller) as R2 requires.
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, Metadata={"sha256": sha256}, ContentType=content_type,
            CacheControl=cache_control)["UploadId"]
        try:
            parts = []
            with local_path.open("rb") as f:
                for number, chunk in enumerate(_read_parts(f, self.part_size), start=1):
                    md5 = base64.b64encode(hashlib.md5(chunk).digest()).decode()
                    response = self.client.upload_part(Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                                                       PartNumber=number, Body=chunk, ContentMD5=md5)
                    parts.append({"PartNumber": number, "ETag": response["ETag"]})
            written = _if_none_match(lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, **_condition(overwrite),
                MultipartUpload={"Parts": parts}))
        except BaseException:
            self._abort(full_key, upload_id)
            raise
        if not written:
            self._abort(full_key, upload_id)
        return written

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            logger.warning("could not abort multipart upload of s3://%s/%s: %s (R2 expires it after 7 days)",
                           self.bucket, full_key, type(exc).__name__)


def _read_parts(f: BinaryIO, part_size: int) -> Any:
    while chunk := f.read(part_size):
        yield chunk


def _condition(overwrite: bool) -> dict[str, str]:
    return {} if overwrite else {"IfNoneMatch": "*"}


def _if_none_match(write: Any) -> bool:
    """Run a conditional write; False when the key already existed (412 PreconditionFailed)."""
    try:
        write()
    except botocore.exceptions.ClientError as exc:
        if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
            return False
        raise
    return True


def _check_presign_expiry(seconds: int) -> None:
    if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
        raise ValueError(f"presigned URL expiry must be 1..{MAX_PRESIGN_SECONDS} s (7 days, the R2 limit), "
                         f"got {seconds}")


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing_key(exc: botocore.exceptions.ClientError) -> bool:
    """A 404 for the key itself; NoSuchBucket (also a 404) is a configuration error, not "absent"."""
    return _code(exc) == "NoSuchKey" or (_status(exc) == 404 and _code(exc) in ("", "404", "NotFound"))


class _translate_errors:
    """Turn botocore exceptions into the UploadError tree (messages name bucket and key, never secrets)."""

    # A refused or dropped connection, a read timeout, a response cut short. botocore wraps most of
    # them (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError are HTTPClientErrors), but
    # a body read outside its wrapper surfaces as urllib3's or http.client's own exception.
    _NETWORK_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                       botocore.exceptions.IncompleteReadError, urllib3.exceptions.ProtocolError,
                       urllib3.exceptions.TimeoutError, http.client.IncompleteRead, TimeoutError)

    def __init__(self, bucket: str, key: str):
        self.where = f"s3://{bucket}/{key}"
        self.bucket = bucket

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or isinstance(exc, UploadError):
            return False
        if isinstance(exc, botocore.exceptions.ClientError):
            status, code = _status(exc), _code(exc)
            if status == 403 or code in _AUTH_CODES:
                raise UploadAuthError(
                    f"R2/S3 refused the credentials for bucket {self.bucket!r} ({code or status}) while accessing "
                    f"{self.where}: check R2_ACCESS_KEY_ID/R2_SECRET_ACCESS_KEY (and that the key may write "
                    f"this bucket)") from exc
            if code == "BadDigest" or code == "InvalidDigest":
                raise UploadIntegrityError(
                    f"{self.where}: the server's checksum of the uploaded bytes does not match ours ({code}); "
                    f"the file changed during upload or was corrupted in transit") from exc
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                raise UploadTransientError(f"{self.where}: server error {status} {code} after retries") from exc
            raise UploadError(f"{self.where}: {code or status}: {exc.response.get('Error', {}).get('Message', '')}") \
                from exc
        if isinstance(exc, self._NETWORK_ERRORS):
            raise UploadTransientError(f"{self.where}: network error after retries: {type(exc).__name__}") from exc
        return False
