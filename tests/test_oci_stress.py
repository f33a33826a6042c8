"""One RegistryClient shared by many threads against a real registry: pooled connections.

Regression for ``ResponseNotReady('Request-sent')`` / ``ValueError: I/O operation on closed
file`` under load: the client gave connections back to the pool with the previous response
unfinished (every HEAD, empty answers, truncated error bodies, a blob read stopped early).
http.client marks such a response finished only when it is read or closed, which urllib3
left to garbage collection of the response object, after the connection was back in the
pool. Single-threaded, the collection happened at once and hid it; with threads (or a
response kept alive by a traceback) another request took the connection and broke.

These tests keep every response object alive (as a busy thread or a reference cycle does)
and allow a single attempt per step, so a connection put back unfinished fails the next
request deterministically instead of once in a blue moon.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from barge.errors import RegistryError
from barge.oci import CredentialStore, RegistryClient, RegistryUnreachable
from barge.oci.transport import Transport
from clitest import at, opener, sha
from registries import RunningRegistry
from seed import push_image, put_blob

THREADS = 6
ROUNDS = 12
DEADLINE = 8.0  # seconds for later rounds of the threaded part, whatever the load


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every response the transport returns, kept alive until the test ends."""
    responses: list[Any] = []
    lock = threading.Lock()
    real = Transport.send

    def send(self: Transport, *a: Any, **kw: Any) -> Any:
        resp, url = real(self, *a, **kw)
        with lock:
            responses.append(resp)
        return resp, url

    monkeypatch.setattr(Transport, "send", send)
    return responses


@pytest.fixture
def client(registry: RunningRegistry, barge_home: Path) -> Iterator[RegistryClient]:
    c = RegistryClient(registry.host, home=barge_home, credentials=CredentialStore.anonymous())
    c.retry.attempts = 1  # a broken connection must not be papered over by the backoff loop
    c.retry.base = 0.01
    c.retry.cap = 0.05
    yield c
    c.close()


def unfinished_idle_connections(c: RegistryClient) -> int:
    """Idle pooled connections whose previous response http.client considers unfinished."""
    bad = 0
    pm = c._transport._verified
    for key in list(pm.pools.keys()):
        pool = pm.pools.get(key)
        q = getattr(pool, "pool", None)
        for conn in list(getattr(q, "queue", [])):
            prev = getattr(conn, "_HTTPConnection__response", None)
            if conn is not None and conn.sock is not None and prev is not None:
                bad += not prev.isclosed()
    return bad


def test_every_kind_of_answer_leaves_the_pool_clean(
    registry: RunningRegistry, client: RegistryClient, kept: list[Any]
) -> None:
    c = client
    big = os.urandom(300_000)
    d_big = put_blob(registry, "s/a", big)
    mdigest, mdata = push_image(registry, "s/a", "v1")
    missing = sha(b"not there")

    steps: list[tuple[str, Any]] = [
        ("HEAD blob present", lambda: c.blob_exists(at(c, "s/a"), d_big)),
        ("HEAD blob missing", lambda: c.blob_exists(at(c, "s/a"), missing)),
        ("HEAD manifest", lambda: c.head_manifest(at(c, "s/a", "v1"))),
        ("GET manifest", lambda: c.get_manifest(at(c, "s/a", "v1"))),
        ("GET tags", lambda: c.list_tags(at(c, "s/a"))),
        ("ranged read", lambda: c.open_blob(at(c, "s/a"), d_big, offset=1000, length=10).read()),
        ("whole read", lambda: c.read_blob(at(c, "s/a"), d_big, max_size=len(big))),
        ("mount 202 fallback", lambda: c.mount_blob(at(c, "s/b"), d_big, at(c, "nowhere/x"))),
        ("mount 201", lambda: c.mount_blob(at(c, "s/b"), d_big, at(c, "s/a"))),
        (
            "upload",
            lambda: c.upload_blob(at(c, "s/c"), sha(b"x" * 5000), 5000, opener(b"x" * 5000)),
        ),
        (
            "chunked upload",
            lambda: c.upload_blob(
                at(c, "s/c"), sha(b"y" * 5000), 5000, opener(b"y" * 5000), chunk_size=1024
            ),
        ),
        ("ping", c.ping),
    ]

    def early_close() -> None:
        r = c.open_blob(at(c, "s/a"), d_big)
        assert len(r.read(100)) == 100
        r.close()

    def failing_head() -> None:
        # an error answer to a HEAD: the exception's traceback keeps the response alive
        with pytest.raises(RegistryError) as ei:
            c.blob_exists(at(c, "s/a"), "sha256:" + "z" * 64)
        kept.append(ei.value)

    def failing_get() -> None:
        with pytest.raises(RegistryError) as ei:
            c.get_manifest(at(c, "s/a", "nope"))
        kept.append(ei.value)

    steps += [
        ("early-closed BlobReader", early_close),
        ("HEAD error", failing_head),
        ("GET error", failing_get),
    ]
    for _ in range(2):
        for name, step in steps:
            step()
            assert unfinished_idle_connections(c) == 0, f"after {name}"
            # the next request reuses the pooled connection: it must work at the first try
            assert c.blob_exists(at(c, "s/a"), d_big) == len(big), f"after {name}"
    assert c.get_manifest(at(c, "s/a", mdigest)).data == mdata


def test_one_client_many_threads(
    registry: RunningRegistry, client: RegistryClient, kept: list[Any]
) -> None:
    c = client
    blobs = [os.urandom(n) for n in (1, 700, 65_000, 200_000)]
    digests = [put_blob(registry, "t/src", b) for b in blobs]
    push_image(registry, "t/src", "v1")
    errors: list[BaseException] = []
    counts = [0] * THREADS
    deadline = time.monotonic() + DEADLINE

    def work(n: int) -> None:
        rnd = random.Random(n)
        try:
            for i in range(ROUNDS):
                if i and time.monotonic() > deadline:
                    return
                k = rnd.randrange(len(blobs))
                data, d = blobs[k], digests[k]
                assert c.blob_exists(at(c, "t/src"), d) == len(data)
                assert c.blob_exists(at(c, "t/src"), sha(b"%d-%d" % (n, i))) is None
                off = rnd.randrange(len(data))
                with c.open_blob(
                    at(c, "t/src"), d, offset=off, length=min(50, len(data) - off)
                ) as r:
                    assert r.read() == data[off : off + 50]
                with c.open_blob(at(c, "t/src"), d) as r:  # closed early, unless tiny
                    r.read(10)
                assert c.read_blob(at(c, "t/src"), d, max_size=len(data)) == data
                assert not c.mount_blob(at(c, f"t/dst{n}"), sha(b"absent %d" % i), at(c, "t/src"))
                assert c.mount_blob(at(c, f"t/dst{n}"), d, at(c, "t/src"))
                own = b"%d:%d:" % (n, i) + data[:3000]
                chunk = 1024 if i % 2 else None
                c.upload_blob(at(c, f"t/up{n}"), sha(own), len(own), opener(own), chunk_size=chunk)
                assert c.head_manifest(at(c, "t/src", "v1")) is not None
                with pytest.raises(RegistryError):
                    c.blob_exists(at(c, "t/src"), "sha256:" + "z" * 64)
                counts[n] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert sum(counts) >= THREADS  # each thread did at least one full round
    assert unfinished_idle_connections(c) == 0


def test_broken_pooled_connection_is_a_retried_connection_error(
    registry: RunningRegistry,
    client: RegistryClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = client
    data = os.urandom(1000)
    d = put_blob(registry, "b/r", data)
    c.ping()
    pm = c._transport._verified
    base = c._transport.base_url()

    # a connection put back with its previous response unfinished (as the old code did)
    leak = pm.request("HEAD", f"{base}/v2/b/r/blobs/{d}", preload_content=False, retries=False)
    leak.release_conn()
    assert unfinished_idle_connections(c) == 1
    assert c.blob_exists(at(c, "b/r"), d) == len(data)  # one immediate retry, new connection
    assert c.read_blob(at(c, "b/r"), d, max_size=len(data)) == data
    del leak

    # "I/O operation on closed file" from urllib3 tearing a connection down
    real = urllib3.PoolManager.request
    failures = {"left": 1}
    methods = {"HEAD", "GET", "POST", "PUT"}

    def flaky(self: urllib3.PoolManager, method: str, url: str, **kw: Any) -> Any:
        if failures["left"] > 0 and method in methods:
            failures["left"] -= 1
            raise ValueError("I/O operation on closed file.")
        return real(self, method, url, **kw)

    monkeypatch.setattr(urllib3.PoolManager, "request", flaky)
    assert c.blob_exists(at(c, "b/r"), d) == len(data)
    failures["left"] = 10**6
    with pytest.raises(RegistryUnreachable):  # never a raw ValueError
        c.blob_exists(at(c, "b/r"), d)
    with pytest.raises(RegistryUnreachable):
        c.open_blob(at(c, "b/r"), d)
    with pytest.raises(RegistryUnreachable):
        c.upload_blob(at(c, "b/r"), sha(b"q"), 1, opener(b"q"))
    # an upload step (the PUT of a monolithic upload) is not replayed blindly: the existing
    # restart rules apply (HEAD, then a fresh session), within the retry budget
    c.retry.attempts = 2
    methods, failures["left"] = {"PUT"}, 1
    c.upload_blob(at(c, "b/r"), sha(b"q"), 1, opener(b"q"))
    assert failures["left"] == 0
    assert c.blob_exists(at(c, "b/r"), sha(b"q")) == 1
