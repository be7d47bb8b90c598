"""The inputs stage (tasks/fetch.py) against real parts: local files, the loopback S3 server
(ministack behind TLS) and a loopback https server with a throwaway CA; ffprobe and Pillow."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.errors import InputError, InputTransientError, is_transient, retry_transient
from tasks.fetch import FetchSettings, display_uri, fetch, run_fetch
from tasks.inputs import host_allowed, sniff_format
from tasks.manifest import ManifestRow
from tests.s3server import S3TestServer, _write_tls_material

TINY = 0.5     # seconds: timeouts in tests


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
TEXT = b"hello, I am a text file with a .png name\n"
BIG = PNG + b"\x00" * 200_000          # over the 10 000-byte test limit
SECRET_QUERY = "X-Amz-Signature=deadbeefsecret"


def _row(**refs: str) -> ManifestRow:
    mode = "dance" if "driving_video" in refs else ("i2v" if "image" in refs else "t2v")
    return ManifestRow(row=3, id="r3", mode=mode, prompt="x", **refs)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ── a loopback https server ──────────────────────────────────────────────────────────────────────

@dataclass
class HttpsServer:
    base: str                   # https://127.0.0.1:<port>
    ca_path: Path
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    def settings(self, **overrides: Any) -> FetchSettings:
        options: dict[str, Any] = {"allow_hosts": ("127.0.0.1",), "ca_bundle": str(self.ca_path),
                                   "timeout_s": TINY, "max_bytes": {"image": 10_000}}
        return FetchSettings(**{**options, **overrides})


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.state.requests.append(self.path)
        route = ROUTES.get(urllib.parse.urlsplit(self.path).path)
        if route is None:
            self._send(404, b"no route")
        else:
            route(self)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, headers={"Location": location})

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _chunked(handler: _Handler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for start in range(0, len(BIG), 8192):
        piece = BIG[start:start + 8192]
        handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    handler.wfile.write(b"0\r\n\r\n")


def _close_delimited(handler: _Handler) -> None:
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    handler.wfile.write(BIG)


def _truncated(handler: _Handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PNG) + 1000))
    handler.end_headers()
    handler.wfile.write(PNG)
    handler.close_connection = True


def _stall(handler: _Handler) -> None:
    handler.server.release.wait(10)
    handler._send(200, PNG)


def _to_http(handler: _Handler) -> None:
    handler._redirect(f"http://127.0.0.1:{handler.server.server_address[1]}/ok.png")


ROUTES: dict[str, Callable[[_Handler], None]] = {
    "/ok.png": lambda h: h._send(200, PNG, {"Content-Type": "image/png"}),
    "/text.png": lambda h: h._send(200, TEXT),
    "/empty.png": lambda h: h._send(200, b""),
    "/missing.png": lambda h: h._send(404, b"not here"),
    "/denied.png": lambda h: h._send(403, b"no"),
    "/busy.png": lambda h: h._send(503, b"try later"),
    "/throttled.png": lambda h: h._send(429, b"slow down", {"Retry-After": "1"}),
    "/big.png": lambda h: h._send(200, BIG),
    "/big-chunked.png": _chunked,
    "/big-close.png": _close_delimited,
    "/truncated.png": _truncated,
    "/stall.png": _stall,
    "/to-ok": lambda h: h._redirect(f"/ok.png?{SECRET_QUERY}"),
    "/to-missing": lambda h: h._redirect(f"/missing.png?{SECRET_QUERY}"),
    "/to-http": _to_http,
    "/to-other-host": lambda h: h._redirect("https://evil.example.com/ok.png"),
    "/loop": lambda h: h._redirect("/loop"),
}


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext, state: HttpsServer):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context, self.state, self.release = context, state, threading.Event()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the request's thread, never in the accept loop.
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass    # clients that stop reading (size limits, timeouts) break the pipe on purpose


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    ca_path, cert_path, key_path = _write_tls_material(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    state = HttpsServer(base="", ca_path=ca_path)
    server = _TLSServer(context, state)
    state.base = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def _fail(row: ManifestRow, work: Path, settings: FetchSettings, **kwargs: Any) -> InputError:
    with pytest.raises(InputError) as info:
        run_fetch(row, work, settings, **kwargs)
    return info.value


# ── no references ────────────────────────────────────────────────────────────────────────────────

def test_t2v_row_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_ENDPOINT_URL", "R2_ACCOUNT_ID"):
        monkeypatch.delenv(name, raising=False)   # a client could not even be built
    row = ManifestRow(row=1, id="t", mode="t2v", prompt="x", watermark="text, not a file")
    result = run_fetch(row, tmp_path / "work", FetchSettings())
    assert (result.files, result.digests, result.bytes) == ({}, {}, 0)
    assert not (tmp_path / "work").exists()


def test_task_retries_only_transient_errors() -> None:
    assert fetch.retries == 2 and fetch.retry_condition_fn is retry_transient
    assert is_transient(InputTransientError("x")) and not is_transient(InputError("x"))


# ── local files ──────────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    folder = tmp_path_factory.mktemp("media")
    video, audio = folder / "my clip %d.mp4", folder / "tone.wav"
    ffmpeg = ["ffmpeg", "-v", "error", "-y"]
    subprocess.run(ffmpeg + ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", "2",
                             "-pix_fmt", "yuv420p", str(video)], check=True)
    subprocess.run(ffmpeg + ["-f", "lavfi", "-i", "sine=frequency=440:duration=0.1", str(audio)],
                   check=True)
    return {"video": video, "audio": audio}


def test_local_files_are_placed_under_safe_names(tmp_path: Path, media: dict[str, Path]) -> None:
    image = tmp_path / "photo %d.png"
    image.write_bytes(PNG)
    watermark = tmp_path / "wm%d.png"
    watermark.write_bytes(_png((4, 4)))
    row = _row(image=str(image), driving_video=str(media["video"]), audio=str(media["audio"]),
               watermark=str(watermark))
    result = run_fetch(row, tmp_path / "work", FetchSettings())

    inputs = tmp_path / "work" / "inputs"
    assert result.files == {"image": inputs / "image.png", "driving_video": inputs / "driving_video.mp4",
                            "audio": inputs / "audio.wav", "watermark": inputs / "watermark.png"}
    sources = {"image": image, "driving_video": media["video"], "audio": media["audio"],
               "watermark": watermark}
    for column, path in result.files.items():
        assert not path.is_symlink() and path.read_bytes() == sources[column].read_bytes()
        assert result.digests[column] == _sha(sources[column].read_bytes())
    assert result.bytes == sum(p.stat().st_size for p in sources.values())
    assert sorted(p.name for p in inputs.iterdir()) == sorted(p.name for p in result.files.values())


@pytest.mark.parametrize("column, name, data, reason", [
    ("image", "notes.png", TEXT, "wrong file type: expected PNG, JPEG"),
    ("image", "empty.png", b"", "empty file (0 bytes)"),
    ("image", "big.png", BIG, "too large"),
    ("image", "cut.png", PNG[:40], "not a readable image"),          # right magic, broken body
    ("watermark", "logo.png", b"\xff\xd8\xff\xe0" + b"\x00" * 100, "expected PNG,"),
])
def test_bad_local_file(tmp_path: Path, column: str, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    err = _fail(_row(**{column: str(path)}), tmp_path / "work",
                FetchSettings(max_bytes={"image": 10_000}, decode_local=True))
    assert not isinstance(err, InputTransientError)
    assert str(err).startswith(f"row 3, column {column}, {path}: ") and reason in str(err)
    assert list((tmp_path / "work" / "inputs").iterdir()) == []     # nothing refused is left


def test_local_files_are_not_decoded_twice(tmp_path: Path) -> None:
    """Manifest validation decoded local inputs already; by default the fetch stage only checks
    their size and magic bytes (decoded once per batch)."""
    path = tmp_path / "cut.png"
    path.write_bytes(PNG[:40])
    result = run_fetch(_row(image=str(path)), tmp_path / "work", FetchSettings())
    assert result.files["image"].read_bytes() == PNG[:40]


def test_missing_local_file(tmp_path: Path) -> None:
    err = _fail(_row(image=str(tmp_path / "gone.png")), tmp_path / "work", FetchSettings())
    assert str(err) == f"row 3, column image, {tmp_path / 'gone.png'}: file not found"


def test_media_is_probed_before_generation(tmp_path: Path, media: dict[str, Path]) -> None:
    # An MP4 passes the audio magic check (ftyp) but holds no audio stream: ffprobe refuses it.
    err = _fail(_row(audio=str(media["video"])), tmp_path / "work", FetchSettings(decode_local=True))
    assert "column audio" in str(err) and "has no audio stream" in str(err)
    png_as_video = tmp_path / "clip.mp4"
    png_as_video.write_bytes(PNG)
    err = _fail(_row(image=str(png_as_video), driving_video=str(png_as_video)), tmp_path / "w2",
                FetchSettings())
    assert "column driving_video" in str(err) and "expected MP4, MOV" in str(err)


# ── s3:// ────────────────────────────────────────────────────────────────────────────────────────

def test_s3_image_is_fetched_and_decoded(tmp_path: Path, s3_server: S3TestServer,
                                         s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="in/cat %d.png", Body=PNG)
    result = run_fetch(_row(image=f"s3://{s3_bucket}/in/cat %d.png"), tmp_path, FetchSettings(),
                       s3_client=client)
    assert result.files["image"] == tmp_path / "inputs" / "image.png"
    assert result.files["image"].read_bytes() == PNG
    assert result.digests["image"] == _sha(PNG) and result.bytes == len(PNG)


def test_s3_client_is_built_from_r2_env(tmp_path: Path, s3_server: S3TestServer, s3_bucket: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.png", Body=PNG)
    monkeypatch.delenv("R2_SECRET_BLOCK", raising=False)
    monkeypatch.delenv("R2_ACCOUNT_ID", raising=False)
    for name, value in {"R2_ENDPOINT_URL": s3_server.endpoint_url, "R2_REGION": s3_server.region,
                        "R2_ACCESS_KEY_ID": s3_server.access_key_id,
                        "R2_SECRET_ACCESS_KEY": s3_server.secret_access_key,
                        "R2_CA_BUNDLE": str(s3_server.ca_path)}.items():
        monkeypatch.setenv(name, value)
    result = run_fetch(_row(image=f"s3://{s3_bucket}/a.png"), tmp_path, FetchSettings())
    assert result.digests["image"] == _sha(PNG)


def test_s3_client_from_input_profile(tmp_path: Path, s3_server: S3TestServer, s3_bucket: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.png", Body=PNG)
    config = tmp_path / "aws-config"
    config.write_text(f"[profile inputs]\nregion = {s3_server.region}\n"
                      f"endpoint_url = {s3_server.endpoint_url}\nca_bundle = {s3_server.ca_path}\n"
                      f"aws_access_key_id = {s3_server.access_key_id}\n"
                      f"aws_secret_access_key = {s3_server.secret_access_key}\n")
    for name in ("AWS_CA_BUNDLE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "R2_ENDPOINT_URL", "R2_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    settings = FetchSettings.from_env({"TURBO_INPUT_PROFILE": "inputs"})
    result = run_fetch(_row(image=f"s3://{s3_bucket}/a.png"), tmp_path / "work", settings)
    assert result.digests["image"] == _sha(PNG)
    err = _fail(_row(image=f"s3://{s3_bucket}/a.png"), tmp_path / "w2",
                FetchSettings(input_profile="no-such-profile"))
    assert "TURBO_INPUT_PROFILE" in str(err)


def test_s3_missing_key_is_permanent(tmp_path: Path, s3_server: S3TestServer, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/missing.png"
    err = _fail(_row(image=uri), tmp_path, FetchSettings(), s3_client=s3_server.client())
    assert str(err) == f"row 3, column image, {uri}: not found (404)"
    assert not isinstance(err, InputTransientError)
    assert (err.row, err.column, err.uri) == (3, "image", uri)


def test_s3_wrong_secret_is_denied_without_leaking_it(tmp_path: Path, s3_server: S3TestServer,
                                                      s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.png", Body=PNG)
    wrong = "wrongSecretDoNotPrint0123456789abcdefABCD"
    err = _fail(_row(image=f"s3://{s3_bucket}/a.png"), tmp_path, FetchSettings(),
                s3_client=s3_server.client(secret_access_key=wrong))
    assert "access denied (403" in str(err) and not isinstance(err, InputTransientError)
    for secret in (wrong, s3_server.secret_access_key):
        assert secret not in str(err) and secret not in repr(err)


def test_s3_size_limit_and_magic(tmp_path: Path, s3_server: S3TestServer, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="big.png", Body=BIG)
    client.put_object(Bucket=s3_bucket, Key="text.png", Body=TEXT)
    settings = FetchSettings(max_bytes={"image": 10_000})
    err = _fail(_row(image=f"s3://{s3_bucket}/big.png"), tmp_path, settings, s3_client=client)
    assert "too large" in str(err)
    err = _fail(_row(image=f"s3://{s3_bucket}/text.png"), tmp_path, settings, s3_client=client)
    assert "wrong file type" in str(err)


# ── https:// ─────────────────────────────────────────────────────────────────────────────────────

def test_https_image_is_fetched(tmp_path: Path, https_server: HttpsServer) -> None:
    result = run_fetch(_row(image=https_server.url("/ok.png")), tmp_path, https_server.settings())
    assert result.files["image"] == tmp_path / "inputs" / "image.png"
    assert result.digests["image"] == _sha(PNG)


def test_https_follows_allowed_redirects(tmp_path: Path, https_server: HttpsServer) -> None:
    result = run_fetch(_row(image=https_server.url("/to-ok")), tmp_path, https_server.settings())
    assert result.files["image"].read_bytes() == PNG


def test_https_host_not_allowed_sends_no_request(tmp_path: Path, https_server: HttpsServer) -> None:
    url = https_server.url("/never.png")
    for allow in ((), ("example.com", "*.127.0.0.1")):
        err = _fail(_row(image=url), tmp_path, https_server.settings(allow_hosts=allow))
        assert str(err).startswith(f"row 3, column image, {url}: host 127.0.0.1 is not on the fetch "
                                   f"allowlist (TURBO_FETCH_ALLOW")
    assert not any(r.startswith("/never.png") for r in https_server.requests)


@pytest.mark.parametrize("path, reason", [
    ("/big.png", "too large: 200"),                        # honest Content-Length: refused early
    ("/big-chunked.png", "too large: more than the 10000 bytes limit"),
    ("/big-close.png", "too large: more than the 10000 bytes limit"),
    ("/text.png", "wrong file type: expected PNG, JPEG"),
    ("/empty.png", "empty file (0 bytes)"),
    ("/missing.png", "not found (404)"),
    ("/denied.png", "access denied (403)"),
    ("/to-http", "/ok.png, which is not https"),
    ("/to-other-host", "redirected to host evil.example.com, which is not on the fetch allowlist"),
    ("/loop", "more than 5 redirects"),
])
def test_https_permanent_errors(tmp_path: Path, https_server: HttpsServer, path: str,
                                reason: str) -> None:
    url = https_server.url(path)
    err = _fail(_row(image=url), tmp_path, https_server.settings())
    assert not isinstance(err, InputTransientError), err
    assert str(err).startswith(f"row 3, column image, {url}: ") and reason in str(err), str(err)


def test_https_messages_drop_query_strings(tmp_path: Path, https_server: HttpsServer) -> None:
    url = https_server.url(f"/to-missing?token=abc&{SECRET_QUERY}")
    err = _fail(_row(image=url), tmp_path, https_server.settings())
    assert "not found (404) at https://127.0.0.1:" in str(err) and "after 1 redirect" in str(err)
    assert "deadbeefsecret" not in str(err) and "token" not in str(err)
    assert display_uri("https://user:pw@h.example.com:8443/a.png?sig=1#x") == \
        "https://h.example.com:8443/a.png"


@pytest.mark.parametrize("path, reason", [
    ("/busy.png", "server error (503)"),
    ("/throttled.png", "rate limited (429)"),
    ("/stall.png", "timed out"),
    ("/truncated.png", "RemoteProtocolError"),
])
def test_https_transient_errors(tmp_path: Path, https_server: HttpsServer, path: str,
                                reason: str) -> None:
    err = _fail(_row(image=https_server.url(path)), tmp_path, https_server.settings())
    assert isinstance(err, InputTransientError) and is_transient(err), err
    assert reason in str(err) and "column image" in str(err)


def test_https_deadline_and_refused_connection(tmp_path: Path, https_server: HttpsServer) -> None:
    err = _fail(_row(image=https_server.url("/stall.png")), tmp_path,
                https_server.settings(timeout_s=30.0, deadline_s=0.3))
    assert isinstance(err, InputTransientError) and "fetch deadline of 0.3 s passed" in str(err)
    with socket.socket() as unused:        # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    err = _fail(_row(image=f"https://127.0.0.1:{port}/a.png"), tmp_path, https_server.settings())
    assert isinstance(err, InputTransientError) and "connection failed" in str(err)


def test_https_needs_the_ca(tmp_path: Path, https_server: HttpsServer) -> None:
    err = _fail(_row(image=https_server.url("/ok.png")), tmp_path,
                https_server.settings(ca_bundle=None))
    assert "TLS certificate not trusted" in str(err) and not isinstance(err, InputTransientError)


# ── settings and rules ───────────────────────────────────────────────────────────────────────────

def test_settings_from_env() -> None:
    settings = FetchSettings.from_env({"TURBO_FETCH_ALLOW": " CDN.example.com, *.assets.example.com,",
                                       "TURBO_FETCH_TIMEOUT_S": "5", "TURBO_FETCH_CA_BUNDLE": "/ca.pem"})
    assert settings.allow_hosts == ("cdn.example.com", "*.assets.example.com")
    assert (settings.timeout_s, settings.ca_bundle, settings.input_profile) == (5.0, "/ca.pem", None)
    assert FetchSettings.from_env({}).allow_hosts == ()
    assert settings.limit_for("driving_video") == 2 * 1024**3
    with pytest.raises(ValueError, match="TURBO_FETCH_TIMEOUT_S"):
        FetchSettings.from_env({"TURBO_FETCH_TIMEOUT_S": "soon"})
    assert host_allowed("a.b.assets.example.com", settings.allow_hosts)
    assert not host_allowed("assets.example.com", settings.allow_hosts)
    assert not host_allowed("evilcdn.example.com", settings.allow_hosts)


@pytest.mark.parametrize("head, column, ext", [
    (b"\xff\xd8\xff\xe0", "image", "jpg"), (b"RIFF\0\0\0\0WEBPVP8 ", "image", "webp"),
    (b"GIF89a", "image", "gif"), (b"II*\x00", "image", "tiff"),
    (b"\0\0\0\x14ftypqt  ", "driving_video", "mov"),
    (b"\x1a\x45\xdf\xa3\x9fB\x82\x84webm", "driving_video", "webm"),
    (b"RIFF\0\0\0\0AVI LIST", "driving_video", "avi"),
    (b"ID3\x04", "audio", "mp3"), (b"\xff\xfb\x90\x00", "audio", "mp3"),
    (b"\xff\xf1\x50\x80", "audio", "aac"),
    (b"OggS\0", "audio", "ogg"), (b"fLaC\0", "audio", "flac"), (b"\0\0\0\x20ftypM4A ", "audio", "m4a"),
    (b"GIF89a", "watermark", None), (b"RIFF\0\0\0\0WAVEfmt ", "image", None),
])
def test_magic_bytes(head: bytes, column: str, ext: str | None) -> None:
    assert sniff_format(head, column) == ext
