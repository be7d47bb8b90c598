"""A fault-injecting HTTP/1.1 forwarding proxy for the test S3 server.

    boto3 --https--> socat (TLS) --> FaultProxy (http) --> ministack (http)

Each request is read whole (request line, headers, body by Content-Length; aws-chunked bodies
are just bytes here) and forwarded on a kept-alive upstream connection; the response goes back
with the same status line, headers and body bytes. A chunked response is re-framed as one chunk
(same headers, same body bytes). Rules decide per request what goes wrong instead:

    proxy.add_rule(match=lambda req: req.method == "PUT" and req.path.endswith(".mp4"),
                   action=Status(503), times=1)      # times=None: every matching request
    proxy.fault_random(fraction=0.3, actions=[Drop(), Status(500)], seed=7)
    proxy.requests   # [LoggedRequest(method, path, action name or None, status returned), ...]
    proxy.connections  # client connections accepted so far
    proxy.clear()    # forget rules, random faults and the log

The first rule that matches (and has times left) wins; requests no rule matches are faulted at
random when `fault_random` is set. Matching sees a `ProxyRequest` (method, path with the query,
case-insensitive headers, body).
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

# Never forwarded: they describe one hop. Expect is answered by the proxy itself (100 Continue).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}
_S3_ERROR_CODES = {400: "InvalidRequest", 403: "AccessDenied", 404: "NoSuchKey", 408: "RequestTimeout",
                   409: "OperationAborted", 412: "PreconditionFailed", 429: "SlowDown", 500: "InternalError",
                   501: "NotImplemented", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclass(frozen=True)
class ProxyRequest:
    method: str
    path: str           # as sent, with the query string
    headers: Message    # case-insensitive: req.headers["content-length"]
    body: bytes


# ── actions ──────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Status:
    """Answer `code` with an S3 XML error instead of forwarding (`body` replaces the XML)."""
    code: int
    body: bytes | None = None
    error_code: str | None = None   # the XML <Code>; default from the status: 503 -> ServiceUnavailable

    @property
    def name(self) -> str:
        return f"Status({self.code})"

    def xml(self) -> bytes:
        if self.body is not None:
            return self.body
        code = self.error_code or _S3_ERROR_CODES.get(self.code, "InternalError")
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by FaultProxy</Message></Error>").encode()


@dataclass(frozen=True)
class Drop:
    """Read the request, then close the connection without answering (nothing is forwarded)."""
    name = "Drop()"


@dataclass(frozen=True)
class Truncate:
    """Forward, then send the response head and only the first `n` body bytes, then close.

    A response with no more than `n` body bytes (a PUT's empty 200) has nothing to cut, so it is
    cut inside its status line instead: the server did the work, the client always sees a broken
    response."""
    n: int = 0

    @property
    def name(self) -> str:
        return f"Truncate({self.n})"


@dataclass(frozen=True)
class CorruptBody:
    """Flip one bit of the middle byte of the request body, then forward (an empty body is sent as is)."""
    name = "CorruptBody()"


@dataclass(frozen=True)
class Stall:
    """Wait `seconds` before forwarding (a client read timeout below that gives up first)."""
    seconds: float

    @property
    def name(self) -> str:
        return f"Stall({self.seconds:g})"


Action = Status | Drop | Truncate | CorruptBody | Stall


class LoggedRequest(NamedTuple):
    method: str
    path: str
    action: str | None   # the action's name, None when forwarded untouched
    status: int | None   # the status returned (possibly cut short); None when dropped or failed


@dataclass
class _Rule:
    match: Callable[[ProxyRequest], bool]
    action: Action
    times: int | None


# ── the proxy ────────────────────────────────────────────────────────────────────────────────

class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._rules: list[_Rule] = []
        self._random: tuple[float, list[Action], random.Random] | None = None
        self._log: list[LoggedRequest] = []
        self.connections = 0   # client connections accepted (several requests each with keep-alive)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()   # wakes stalled requests
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_rule(self, match: Callable[[ProxyRequest], bool], action: Action, times: int | None = 1) -> None:
        """Apply `action` to the next `times` requests `match` accepts (None: to all of them)."""
        with self._lock:
            self._rules.append(_Rule(match, action, times))

    def fault_random(self, fraction: float, actions: Sequence[Action], seed: int = 0) -> None:
        """Fault `fraction` of the requests no rule matches with an action drawn from `actions`;
        the same seed and the same request order give the same faults."""
        if not 0 <= fraction <= 1 or not actions:
            raise ValueError(f"fault_random needs 0 <= fraction <= 1 and some actions, got {fraction}, {actions}")
        with self._lock:
            self._random = (fraction, list(actions), random.Random(seed))

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._random = None
            self._log.clear()

    def _choose(self, request: ProxyRequest) -> Action | None:
        with self._lock:
            for rule in self._rules:
                if (rule.times is None or rule.times > 0) and rule.match(request):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.action
            if self._random is not None:
                fraction, actions, rng = self._random
                if rng.random() < fraction:
                    return rng.choice(actions)
        return None

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)


@dataclass
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    has_body: bool
    will_close: bool

    def head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def framed_body(self, limit: int | None = None) -> bytes:
        if not self.has_body:
            return b""
        if not self.chunked:
            return self.body[:limit]
        if limit is not None:   # the chunk header promises the whole body, only `limit` bytes follow
            return b"%x\r\n" % len(self.body) + self.body[:limit]
        return (b"%x\r\n%s\r\n" % (len(self.body), self.body) if self.body else b"") + b"0\r\n\r\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, and 100 Continue for Expect
    timeout = 120                   # an idle client connection is closed after this
    server: Any

    def setup(self) -> None:
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy.connections += 1
        self.upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=120)

    def finish(self) -> None:
        self.upstream.close()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fault proxy: " + format, *args)

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.send_error(501, "FaultProxy needs a Content-Length request body")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = proxy._choose(ProxyRequest(self.command, self.path, self.headers, body))
        logged = False

        def log(status: int | None) -> None:   # before answering: a client that got its answer sees it
            nonlocal logged
            logged = True
            proxy._record(LoggedRequest(self.command, self.path, action.name if action else None, status))

        try:
            if isinstance(action, Status):
                log(action.code)
                self._send_status(action)
            elif isinstance(action, Drop):
                log(None)
                self.close_connection = True
            else:
                if isinstance(action, Stall):
                    proxy._stopping.wait(action.seconds)
                if isinstance(action, CorruptBody) and body:
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1:]
                response = self._forward(body)
                log(response.status)
                if isinstance(action, Truncate):
                    self._send_truncated(response, action.n)
                else:
                    self.wfile.write(response.head() + response.framed_body())
                    self.close_connection = self.close_connection or response.will_close
        except (OSError, http.client.HTTPException) as exc:   # the client gave up, or ministack went away
            logger.debug("fault proxy: %s %s: %r", self.command, self.path, exc)
            self.close_connection = True
            if not logged:
                log(None)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _proxy

    def _forward(self, body: bytes) -> _Response:
        reused = self.upstream.sock is not None
        try:
            return self._exchange(body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            self.upstream.close()   # ministack closed the idle kept-alive connection: once more
            return self._exchange(body)

    def _exchange(self, body: bytes) -> _Response:
        self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                self.upstream.putheader(name, value)
        self.upstream.endheaders(body or None)
        resp = self.upstream.getresponse()
        data = resp.read()
        has_body = self.command != "HEAD" and resp.status >= 200 and resp.status not in (204, 304)
        # will_close: "Connection: close", or a body that ends when the connection does
        return _Response(resp.status, resp.reason, list(resp.msg.items()), data, chunked=bool(resp.chunked),
                         has_body=has_body, will_close=bool(resp.will_close))

    def _send_status(self, action: Status) -> None:
        xml = action.xml()
        self.send_response_only(action.code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.send_header("x-amz-request-id", "FAULTPROXY")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _send_truncated(self, response: _Response, n: int) -> None:
        self.close_connection = True
        if response.has_body and len(response.body) > n:
            self.wfile.write(response.head() + response.framed_body(limit=n))
        else:
            self.wfile.write(response.head()[:len("HTTP/1.1 2")])   # a status line cut short
