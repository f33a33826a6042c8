"""The fault-injecting proxy: :class:`FaultProxy` in front of a real registry.

Rules (:class:`FaultRule`) match requests by method and path and reset, stall, go silent,
answer an error, redirect, or forward only part of a body; :attr:`FaultProxy.exchanges`
records what passed. Fixtures:

* ``make_proxy``      factory: ``make_proxy(reg) -> FaultProxy`` in front of a registry
* ``redirect_setup``  a basic-auth registry behind a proxy that 307-redirects blob GETs to
                      an "object store" on another host (127.0.0.2 or localhost), which
                      records the headers it receives

The proxy is one class (a request handler and its rule engine) and longer than most modules:
its parts share the handler's state, and splitting them would only spread one concept over
files.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from registries import (
    STOP_TIMEOUT,
    ObjectStore,
    RunningRegistry,
    Server,
    Server6,
    other_loopback,
)

__all__ = ["Exchange", "FaultProxy", "FaultRule", "RedirectSetup"]


# -- fault-injecting proxy ----------------------------------------------------------------------


@dataclass
class FaultRule:
    """Misbehave for matching requests.

    ``action``: ``"reset"`` (RST; with ``forward=True`` after the upstream answered, else
    before forwarding; with ``after_request_bytes`` after reading that much of the request
    body, forwarding the part read), ``"truncate"`` (forward, send only ``keep`` bytes of
    the body, close), ``"status"`` (answer ``status`` with ``headers`` without forwarding),
    ``"redirect"`` (answer 307 to ``location.format(path=..., digest=...)``), ``"slow"``
    (forward, but move the request and response bodies at ``rate`` bytes per second),
    ``"stall"`` (forward, send the answer's head and ``keep`` bytes of its body, then send
    nothing more for ``hold`` seconds, or until the client hangs up, without closing),
    ``"silent"`` (read the request, never answer; held like ``"stall"``), ``"deaf"`` (read
    the request's head only: its body is never read, so the client's sends block; no answer
    for ``hold`` seconds), ``"chaos"`` (with
    probability ``chance``, one transient fault picked by the proxy's seeded generator:
    reset before or after forwarding, 503, 429 with ``Retry-After: 0``, a request body cut
    part-way, an answer body cut part-way; :attr:`FaultProxy.faults` counts them).
    The rule fires for matching requests number ``skip+1 .. skip+times`` (``times=None``:
    forever).
    """

    method: str = "*"
    path: str = ".*"  # regex searched in the path (query excluded)
    action: str = "status"
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = 1
    skip: int = 0
    keep: int = 0
    forward: bool = False
    after_request_bytes: int | None = None
    location: str = ""
    require_header: str | None = None  # only requests carrying this header match
    body: bytes = b""  # the answer's body for "status" (default: an OCI error naming it)
    rate: int = 1 << 20  # bytes per second for "slow"
    hold: float = 3600.0  # "stall"/"silent": seconds to keep quiet (ends early on hang-up)
    chance: float = 1.0  # "chaos": the probability that a matching request meets a fault
    kinds: tuple[str, ...] = ()  # "chaos": the faults to pick from (default: all that apply)
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.require_header and not any(
            k.lower() == self.require_header.lower() for k in headers
        ):
            return False
        return (self.method in ("*", method)) and re.search(self.path, path) is not None


@dataclass
class Exchange:
    method: str
    path: str
    request_bytes: int  # request body bytes forwarded to the registry
    response_bytes: int
    status: int | None
    fault: str | None
    headers: dict[str, str]
    dropped_bytes: int = 0  # request body bytes read but not forwarded (injected answers)


class _Pace:
    """Sleeps so that the bytes passed through ``step`` move at ``rate`` per second (``rate``
    None: no pacing). Pieces are at most ``piece`` bytes so a slowed body trickles."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.piece = 1 << 20 if rate is None else max(1024, min(64 << 10, rate // 20))
        self.start = time.monotonic()
        self.moved = 0

    def step(self, n: int) -> None:
        if self.rate is None:
            return
        self.moved += n
        ahead = self.moved / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """A loopback HTTP proxy in front of one registry that can misbehave on purpose.

    ``ignore_tls``: a connection that opens with a TLS ClientHello gets no answer at all (the
    proxy holds it until the client hangs up), like a plain-HTTP server waiting for a request
    line that never comes. ``atomic_patches``: a ``PATCH`` body is forwarded only once it has
    arrived whole, so a client killed mid-``PATCH`` leaves the registry's upload session at
    the end of its last complete ``PATCH`` (a registry whose ``PATCH`` requests are atomic
    parts, as ECR's are). ``seed`` drives the ``"chaos"`` rules.
    """

    def __init__(
        self,
        upstream: RunningRegistry,
        bind: str = "127.0.0.1",
        *,
        ignore_tls: bool = False,
        atomic_patches: bool = False,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        parsed = urllib.parse.urlsplit(upstream.url)
        self._up_host = parsed.hostname or "127.0.0.1"
        self._up_port = parsed.port or 80
        self._up_tls = parsed.scheme == "https"
        self.rules: list[FaultRule] = []
        self.log: list[Exchange] = []
        self.ignore_tls = ignore_tls
        self.atomic_patches = atomic_patches
        self.tls_hellos = 0  # connections that opened with a TLS ClientHello
        self.faults: dict[str, int] = {}  # "chaos" faults injected, by kind
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *a: Any) -> None:
                pass

            def handle(self) -> None:
                if outer.ignore_tls:
                    with contextlib.suppress(OSError):
                        if self.connection.recv(1, socket.MSG_PEEK) == b"\x16":
                            with outer._lock:
                                outer.tls_hellos += 1
                            outer._hold(self.connection, 3600.0)
                            return
                super().handle()

            def do_GET(self) -> None:
                outer._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        server = (Server6 if ":" in bind else Server)((bind, 0), Handler)
        self._server = server
        port = server.server_address[1]
        self.host = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    # -- configuration / assertions --
    def add(self, **kw: Any) -> FaultRule:
        rule = FaultRule(**kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def _matching(self, method: str, path: str) -> list[Exchange]:
        with self._lock:
            return [
                e
                for e in self.log
                if method in ("*", e.method) and re.search(path, e.path) is not None
            ]

    def count(self, method: str = "*", path: str = ".*") -> int:
        return len(self._matching(method, path))

    def request_bytes(self, method: str = "*", path: str = ".*") -> int:
        return sum(e.request_bytes for e in self._matching(method, path))

    def response_bytes(self, method: str = "*", path: str = ".*") -> int:
        return sum(e.response_bytes for e in self._matching(method, path))

    def stop(self) -> None:
        self._stopping.set()  # held connections let go
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)

    # -- the proxying --
    def _pick(self, method: str, path: str, headers: dict[str, str]) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path, headers):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                if rule.action == "chaos":
                    if self._rng.random() >= rule.chance:
                        continue
                    rule.fired += 1
                    return self._chaos(method, path, headers, rule.kinds)
                rule.fired += 1
                return rule
        return None

    def _chaos(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        only: tuple[str, ...] = (),
    ) -> FaultRule:
        """One transient fault for this request (called under the lock)."""
        cl = next((v for k, v in headers.items() if k.lower() == "content-length"), "0")
        length = int(cl) if cl.isdigit() else 0
        body = length > 0 or _is_chunked_headers(headers)
        kinds = ["reset", "lost-answer", "503", "429"]
        if body:
            kinds.append("cut-request")
        if method == "GET" and "/blobs/" in path and "/uploads/" not in path:
            kinds.append("cut-answer")
        kinds = [k for k in kinds if not only or k in only] or list(only)
        kind = self._rng.choice(kinds)
        self.faults[kind] = self.faults.get(kind, 0) + 1
        if kind == "reset":
            return FaultRule(action="reset")
        if kind == "lost-answer":
            return FaultRule(action="reset", forward=True)
        if kind == "503":
            return FaultRule(action="status", status=503)
        if kind == "429":
            return FaultRule(action="status", status=429, headers={"Retry-After": "0"})
        if kind == "cut-request":
            cut = self._rng.randrange(max(1, length)) if length else self._rng.randrange(1 << 20)
            return FaultRule(action="reset", after_request_bytes=cut)
        return FaultRule(action="truncate", keep=self._rng.randrange(1 << 20))

    def _hold(self, sock: socket.socket, seconds: float) -> None:
        """Send nothing on ``sock`` for ``seconds``, reading (and discarding) whatever the
        client sends; return early when the client hangs up or the proxy stops."""
        end = time.monotonic() + seconds
        while not self._stopping.is_set() and time.monotonic() < end:
            try:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready and not sock.recv(1 << 16):
                    return
            except (OSError, ValueError):
                return

    def _record(self, e: Exchange) -> None:
        with self._lock:
            self.log.append(e)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            h.rfile.close()
        with contextlib.suppress(OSError):
            h.connection.close()

    def _upstream(self, h: Any) -> http.client.HTTPConnection:
        conn = getattr(h, "_barge_upstream", None)
        if conn is None:
            if self._up_tls:
                ctx = self.upstream.ssl_context()
                conn = http.client.HTTPSConnection(
                    self._up_host, self._up_port, timeout=60, context=ctx
                )
            else:
                conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=60)
            h._barge_upstream = conn
        return conn

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command
        path = urllib.parse.urlsplit(h.path).path
        headers = {k: v for k, v in h.headers.items()}
        length = int(h.headers.get("Content-Length") or 0)
        rule = self._pick(method, path, headers)
        ex = Exchange(method, path, 0, 0, None, rule.action if rule else None, headers)
        self._record(ex)

        if rule and rule.action == "silent":
            self._hold(h.connection, rule.hold)
            h.close_connection = True
            return
        if rule and rule.action == "deaf":
            self._stopping.wait(rule.hold)
            self._reset(h)
            return

        if (
            rule
            and rule.action == "reset"
            and not rule.forward
            and rule.after_request_bytes is None
        ):
            self._reset(h)
            return
        if rule and rule.action == "paginate":
            self._drain(h, length, ex)
            self._paginate(h, ex)
            return
        if rule and rule.action in ("status", "redirect"):
            self._drain(h, length, ex)
            hdrs = dict(rule.headers)
            if rule.action == "redirect":
                status = 307
                digest = path.rsplit("/", 1)[-1]
                hdrs["Location"] = rule.location.format(path=path, digest=digest)
            else:
                status = rule.status
            body = (
                rule.body
                if rule.body
                else b""
                if status < 400
                else json.dumps(
                    {"errors": [{"code": "UNKNOWN", "message": f"injected {status}"}]}
                ).encode()
            )
            ex.status = status
            h.send_response(status)
            for k, v in hdrs.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            if body:
                h.send_header("Content-Type", "application/json")
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(body)
            return

        whole: bytes | None = None  # atomic_patches: the PATCH body, read before forwarding
        if self.atomic_patches and method == "PATCH":
            got = bytearray()
            try:
                if _is_chunked(h):
                    for piece in _read_chunked(h):
                        got += piece
                else:
                    while len(got) < length:
                        data = h.rfile.read(min(length - len(got), 1 << 20))
                        if not data:
                            raise ConnectionError("client went away mid-body")
                        got += data
            except (OSError, ValueError):
                ex.dropped_bytes += len(got)  # the client went away: forward nothing
                self._reset(h)
                return
            whole = bytes(got)
        conn = self._upstream(h)
        try:
            conn.putrequest(method, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in _HOP and not (
                    whole is not None and k.lower() == "content-length"
                ):
                    conn.putheader(k, v)
            limit = rule.after_request_bytes if rule and rule.action == "reset" else None
            pace = _Pace(rule.rate if rule and rule.action == "slow" else None)
            if whole is not None:
                conn.putheader("Content-Length", str(len(whole)))
                conn.endheaders()
                conn.send(whole)
                ex.request_bytes += len(whole)
            elif _is_chunked(h):  # a streamed upload: forward it chunk by chunk
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                # a client that goes away mid-body makes _read_chunked raise: the upstream
                # request is then broken off too, never completed with what arrived
                for piece in _read_chunked(h):
                    if limit is not None and ex.request_bytes + len(piece) > limit:
                        conn.close()
                        h._barge_upstream = None  # type: ignore[attr-defined]
                        self._reset(h)
                        return
                    for k in range(0, len(piece), pace.piece):
                        part = piece[k : k + pace.piece]
                        conn.send(b"%x\r\n" % len(part) + part + b"\r\n")
                        pace.step(len(part))
                    ex.request_bytes += len(piece)
                conn.send(b"0\r\n\r\n")
            else:
                conn.endheaders()
            left = 0 if whole is not None or _is_chunked(h) else length
            while left > 0:
                want = min(left, pace.piece)
                if limit is not None:
                    want = min(want, limit - ex.request_bytes)
                    if want <= 0:
                        conn.close()
                        h._barge_upstream = None  # type: ignore[attr-defined]
                        self._reset(h)
                        return
                data = h.rfile.read(want)
                if not data:  # the client went away mid-body: break the upstream request off
                    raise ConnectionError("client went away mid-body")
                conn.send(data)
                pace.step(len(data))
                ex.request_bytes += len(data)
                left -= len(data)
            resp = conn.getresponse()
        except (OSError, ValueError, http.client.HTTPException):
            conn.close()
            h._barge_upstream = None  # type: ignore[attr-defined]
            self._reset(h)
            return
        ex.status = resp.status
        if rule and rule.action == "reset":  # forward=True: upstream acted, client never hears
            resp.read()
            self._reset(h)
            return
        h.send_response_only(resp.status, resp.reason)
        body_len = resp.getheader("Content-Length")
        chunked = body_len is None and method != "HEAD" and resp.status not in (204, 304)
        pre: bytes | None = None
        if chunked:
            pre = resp.read()
        for k, v in resp.getheaders():
            if k.lower() in _HOP or (chunked and k.lower() == "content-length"):
                continue
            h.send_header(k, v)
        if pre is not None:
            h.send_header("Content-Length", str(len(pre)))
        h.end_headers()
        if method == "HEAD":
            resp.read()
            return
        budget = rule.keep if rule and rule.action in ("truncate", "stall") else None
        pace = _Pace(rule.rate if rule and rule.action == "slow" else None)
        try:
            if pre is not None:
                out = pre if budget is None else pre[:budget]
                h.wfile.write(out)
                ex.response_bytes += len(out)
            else:
                while True:
                    data = resp.read(pace.piece)
                    if not data:
                        break
                    pace.step(len(data))
                    if budget is not None:
                        data = data[: max(0, budget - ex.response_bytes)]
                    if data:
                        h.wfile.write(data)
                        ex.response_bytes += len(data)
                    if budget is not None and ex.response_bytes >= budget:
                        break
        except OSError:
            budget = 0
        if budget is not None and rule is not None and rule.action == "stall":
            with contextlib.suppress(OSError):
                h.wfile.flush()
            self._hold(h.connection, rule.hold)
        if budget is not None:
            conn.close()
            h._barge_upstream = None  # type: ignore[attr-defined]
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)

    def _paginate(self, h: BaseHTTPRequestHandler, ex: Exchange) -> None:
        """Emulate tags/list pagination (distribution 2.8 ignores ``n``; 3.x, Docker Hub,
        GHCR... honour it): sorted tags after ``last``, at most ``n``, relative Link."""
        u = urllib.parse.urlsplit(h.path)
        q = urllib.parse.parse_qs(u.query)
        req = urllib.request.Request(self.upstream.url + u.path, headers=dict(h.headers.items()))
        try:
            with urllib.request.urlopen(req, timeout=60, context=self.upstream.ssl_context()) as r:
                status, doc = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, doc = e.code, json.loads(e.read() or b"{}")
        headers = {"Content-Type": "application/json"}
        if status == 200:
            tags = sorted(doc.get("tags") or [])
            last = q.get("last", [""])[0]
            n = int(q.get("n", ["0"])[0] or 0) or len(tags) or 1
            rest = [t for t in tags if t > last]
            doc["tags"] = rest[:n]
            if len(rest) > n:
                nxt = urllib.parse.urlencode({"n": n, "last": rest[n - 1]})
                headers["Link"] = f'<{u.path}?{nxt}>; rel="next"'
        body = json.dumps(doc).encode()
        ex.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        ex.response_bytes += len(body)

    @staticmethod
    def _drain(h: BaseHTTPRequestHandler, length: int, ex: Exchange) -> None:
        if _is_chunked(h):
            with contextlib.suppress(OSError, ValueError):
                for piece in _read_chunked(h):
                    ex.dropped_bytes += len(piece)
            return
        left = length
        while left > 0:
            data = h.rfile.read(min(left, 1 << 20))
            if not data:
                break
            ex.dropped_bytes += len(data)
            left -= len(data)


def _is_chunked(h: BaseHTTPRequestHandler) -> bool:
    return "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()


def _is_chunked_headers(headers: dict[str, str]) -> bool:
    return any(
        k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers.items()
    )


def _read_chunked(h: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """The pieces of a chunked request body (bounded: at most 1 GiB per piece). A body that
    ends before its last (zero-length) chunk raises ConnectionError: the client went away."""
    for _ in range(1 << 20):
        line = h.rfile.readline(1024)
        if not line:
            raise ConnectionError("client went away mid-body")
        n = int(line.split(b";")[0].strip() or b"0", 16)
        if n == 0:
            while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return
        if n > 1 << 30:
            raise ValueError("chunk too large")
        data = h.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("client went away mid-body")
        yield data
        h.rfile.readline(8)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(reg: RunningRegistry, bind: str = "127.0.0.1", **kw: Any) -> FaultProxy:
        p = FaultProxy(reg, bind, **kw)
        proxies.append(p)
        return p

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()


@dataclass
class RedirectSetup:
    registry: RunningRegistry  # the real (basic-auth) registry
    proxy: FaultProxy  # what clients talk to; redirects blob GETs
    store: ObjectStore  # the redirect target, on another host


@pytest.fixture
def redirect_setup(
    registry_basic: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> Iterator[RedirectSetup]:
    store = ObjectStore(registry_basic, other_loopback())
    proxy = make_proxy(registry_basic)
    proxy.add(
        method="GET",
        path=r"/blobs/sha256:",
        action="redirect",
        times=None,
        require_header="Authorization",  # unauthenticated requests get the registry's 401
        location=store.url + "/blobs/{digest}?X-Amz-Signature=secret-signature",
    )
    try:
        yield RedirectSetup(registry_basic, proxy, store)
    finally:
        store.stop()
