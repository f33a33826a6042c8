"""Retries, resumes and redirects through a fault-injecting proxy in front of a real registry."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from barge.oci import (
    CredentialStore,
    LayerLimitExceeded,
    RegistryClient,
    RegistryResponseError,
    RegistryUnreachable,
    TooManyRequests,
)
from barge.oci.errors import error_from_response
from barge.oci.uploads import Upload
from clitest import at, opener, sha
from faultproxy import FaultProxy, RedirectSetup
from registries import RunningRegistry
from seed import push_image, put_blob


@pytest.fixture
def proxied(
    registry: RunningRegistry, make_proxy: Callable[..., FaultProxy], barge_home: Path
) -> tuple[FaultProxy, RegistryClient]:
    proxy = make_proxy(registry)
    c = RegistryClient(proxy.host, home=barge_home, credentials=CredentialStore.anonymous())
    c.retry.base = 0.01
    c.retry.cap = 0.05
    return proxy, c


BLOB_GET = r"/blobs/sha256:"
UPLOADS = r"/blobs/uploads/"


def test_download_survives_resets_truncation_and_5xx(
    proxied: tuple[FaultProxy, RegistryClient], registry: RunningRegistry
) -> None:
    proxy, c = proxied
    data = os.urandom(2_500_000)
    d = put_blob(registry, "f/a", data)
    proxy.add(method="GET", path=BLOB_GET, action="reset", times=1)
    proxy.add(method="GET", path=BLOB_GET, action="status", status=503, times=1)
    proxy.add(method="GET", path=BLOB_GET, action="truncate", keep=1_000_000, times=2)
    proxy.add(
        method="GET",
        path=BLOB_GET,
        action="status",
        status=429,
        headers={"Retry-After": "0"},
        times=1,
    )
    assert c.read_blob(at(c, "f/a"), d, max_size=len(data)) == data
    gets = proxy.count("GET", BLOB_GET)
    assert gets == 6
    # resumed with Range: far fewer bytes than refetching whole each time
    assert proxy.response_bytes("GET", BLOB_GET) < len(data) + 2_100_000


def test_retry_after_honoured(
    proxied: tuple[FaultProxy, RegistryClient], registry: RunningRegistry
) -> None:
    proxy, c = proxied
    digest, _ = push_image(registry, "f/img", "v1")
    proxy.add(
        method="GET",
        path="/manifests/",
        action="status",
        status=429,
        headers={"Retry-After": "1"},
        times=1,
    )
    t = time.monotonic()
    assert c.get_manifest(at(c, "f/img", "v1")).digest == digest
    assert time.monotonic() - t >= 0.9


def test_persistent_5xx_gives_up_bounded(proxied: tuple[FaultProxy, RegistryClient]) -> None:
    proxy, c = proxied
    proxy.add(method="GET", path="/manifests/", action="status", status=500, times=None)
    c.retry.attempts = 4
    t = time.monotonic()
    with pytest.raises(RegistryResponseError) as ei:
        c.get_manifest(at(c, "f/img", "v1"))
    assert ei.value.status == 500
    assert proxy.count("GET", "/manifests/") == 4
    assert time.monotonic() - t < 5
    proxy.clear()
    proxy.add(method="GET", path="/manifests/", action="status", status=429, times=None)
    with pytest.raises(TooManyRequests):
        c.get_manifest(at(c, "f/img", "v1"))


def test_monolithic_upload_survives_faults(
    proxied: tuple[FaultProxy, RegistryClient],
) -> None:
    proxy, c = proxied
    data = os.urandom(1_500_000)
    d = sha(data)
    proxy.add(method="POST", path=UPLOADS, action="status", status=503, times=1)
    proxy.add(method="PUT", path=UPLOADS, action="reset", after_request_bytes=600_000, times=1)
    proxy.add(method="PUT", path=UPLOADS, action="status", status=500, times=1)
    seen: list[int] = []
    c.upload_blob(at(c, "f/up"), d, len(data), opener(data), progress=seen.append)
    assert sum(seen) == len(data)
    assert c.read_blob(at(c, "f/up"), d, max_size=len(data)) == data


def test_chunked_upload_resumes_from_server_offset(
    proxied: tuple[FaultProxy, RegistryClient],
) -> None:
    proxy, c = proxied
    data = os.urandom(1_000_000)
    d = sha(data)
    # the 3rd PATCH is dropped before reaching the registry, the 5th answers 503
    proxy.add(method="PATCH", path=UPLOADS, action="reset", skip=2, times=1)
    proxy.add(method="PATCH", path=UPLOADS, action="status", status=503, skip=4, times=1)
    calls: list[int] = []
    seen: list[int] = []
    c.upload_blob(
        at(c, "f/ch"), d, len(data), opener(data, calls), chunk_size=200_000, progress=seen.append
    )
    assert sum(seen) == len(data)
    # resumed in the same session (one POST), asked the server where it was (GET)
    assert proxy.count("POST", UPLOADS) == 1
    assert proxy.count("GET", UPLOADS) == 2
    assert proxy.request_bytes("PATCH", UPLOADS) == len(data)  # nothing sent twice
    assert calls == [0, 200_000, 400_000, 400_000, 600_000, 800_000, 800_000]
    assert c.read_blob(at(c, "f/ch"), d, max_size=len(data)) == data


def test_chunked_upload_mid_body_reset(proxied: tuple[FaultProxy, RegistryClient]) -> None:
    proxy, c = proxied
    data = os.urandom(900_000)
    d = sha(data)
    # half a chunk reaches the registry, then the connection dies
    proxy.add(
        method="PATCH", path=UPLOADS, action="reset", after_request_bytes=100_000, skip=1, times=1
    )
    seen: list[int] = []
    c.upload_blob(
        at(c, "f/mid"), d, len(data), opener(data), chunk_size=300_000, progress=seen.append
    )
    assert sum(seen) == len(data)
    assert c.read_blob(at(c, "f/mid"), d, max_size=len(data)) == data


def test_chunk_min_length_honoured(
    registry: RunningRegistry, make_proxy, barge_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = make_proxy(registry)
    c = RegistryClient(proxy.host, home=barge_home)
    data = os.urandom(100_000)

    # the proxy cannot add headers to forwarded answers, so check the arithmetic directly
    orig = Upload._open_session

    def start(self: Upload) -> tuple[str, int]:
        loc, _ = orig(self)
        return loc, 40_000

    monkeypatch.setattr(Upload, "_open_session", start)
    c.upload_blob(at(c, "f/min"), sha(data), len(data), opener(data), chunk_size=1000)
    assert proxy.count("PATCH", UPLOADS) == 3


def test_existing_blob_skips_upload_after_ambiguous_put(
    proxied: tuple[FaultProxy, RegistryClient],
) -> None:
    proxy, c = proxied
    data = os.urandom(300_000)
    d = sha(data)
    # the registry stores the blob, but the answer is lost: must not upload again
    proxy.add(method="PUT", path=UPLOADS, action="reset", forward=True, times=1)
    c.upload_blob(at(c, "f/amb"), d, len(data), opener(data))
    assert proxy.count("PUT", UPLOADS) == 1
    assert proxy.count("POST", UPLOADS) == 1
    assert proxy.request_bytes("*", UPLOADS) == len(data)


def test_unreachable_after_bounded_retries(proxied: tuple[FaultProxy, RegistryClient]) -> None:
    proxy, c = proxied
    proxy.add(method="GET", path="/v2/", action="reset", times=None)
    c.retry.attempts = 3
    with pytest.raises(RegistryUnreachable) as ei:
        c.ping()
    assert str(ei.value).startswith(f"cannot reach registry {proxy.host}")
    assert proxy.count("GET", "/v2/") == 3


def test_redirect_strips_authorization(redirect_setup: RedirectSetup, barge_home: Path) -> None:
    reg = redirect_setup.registry
    data = os.urandom(400_000)
    d = put_blob(reg, "priv/r", data)
    c = RegistryClient(
        redirect_setup.proxy.host,
        home=barge_home,
        credentials=CredentialStore.fixed(reg.username or "", reg.password or ""),
    )
    c.retry.base = 0.01
    assert c.read_blob(at(c, "priv/r"), d, max_size=len(data)) == data
    with c.open_blob(at(c, "priv/r"), d, offset=1000, length=10) as r:
        assert r.read() == data[1000:1010]
    redirected = [e for e in redirect_setup.proxy.log if e.status == 307]
    assert len(redirected) == 2 and all("Authorization" in e.headers for e in redirected)
    assert len(redirect_setup.store.requests) == 2
    for h in redirect_setup.store.requests:
        assert not any(k.lower() == "authorization" for k in h)
    assert redirect_setup.store.requests[1].get("Range") == "bytes=1000-1009"


def test_layer_limit_error_parsed() -> None:
    body = b'{"errors":[{"code":"UNSUPPORTED","message":"Limit on number of layers per image exceeded: 4000"}]}'
    e = error_from_response(405, body, {}, registry="r", what="push manifest")
    assert isinstance(e, LayerLimitExceeded) and e.limit == 4000
    e2 = error_from_response(
        405,
        b'{"message":"Limit on number of layers per image exceeded"}',
        {},
        registry="r",
        what="x",
    )
    assert isinstance(e2, LayerLimitExceeded) and e2.limit is None
