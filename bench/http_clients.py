"""Large-body HTTP throughput on loopback against a real registry: urllib3 2.x vs httpx.

Usage: .venv/bin/python bench/http_clients.py [SIZE_MIB]   (default 1024 = 1 GiB)

Starts Debian's docker-registry (tests/registries.start_registry) in a temp dir,
uploads the same blob with each client (monolithic POST + PUT, streamed from a file) and
downloads it again (streamed into a reused 1 MiB buffer), and prints MB/s. Also measures
barge's own RegistryClient, which is built on urllib3 (upload_blob / BlobReader.readinto).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import urllib3  # noqa: E402

from registries import start_registry  # noqa: E402

BUF = 1 << 20


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(BUF)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            chunk = block[: min(BUF, left)]
            chunk = i.to_bytes(8, "little") + chunk[8:] if len(chunk) >= 8 else chunk
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return "sha256:" + h.hexdigest()


def timed(label: str, size: int, fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    mbs = size / dt / 1e6
    print(f"{label:<44} {mbs:9.1f} MB/s  ({dt:.2f} s)", flush=True)
    return mbs


def main() -> None:
    size = int(sys.argv[1]) * (1 << 20) if len(sys.argv) > 1 else 1 << 30
    with tempfile.TemporaryDirectory(prefix="barge-bench-") as tmp:
        tmpd = Path(tmp)
        src = tmpd / "blob"
        digest = make_file(src, size)
        reg = start_registry(tmpd / "registry")
        base = reg.url
        try:
            print(f"blob {size / (1 << 20):.0f} MiB, registry {reg.host}")
            pool = urllib3.PoolManager(retries=False, blocksize=BUF)

            def u3_upload(repo: str) -> None:
                r = pool.request("POST", f"{base}/v2/{repo}/blobs/uploads/", preload_content=True)
                loc = urljoin(base + "/", r.headers["Location"])
                with open(src, "rb") as f:
                    r = pool.request(
                        "PUT",
                        f"{loc}&digest={digest}",
                        body=f,
                        headers={
                            "Content-Length": str(size),
                            "Content-Type": "application/octet-stream",
                        },
                    )
                assert r.status == 201, r.status

            def u3_download_read(repo: str) -> None:
                r = pool.request("GET", f"{base}/v2/{repo}/blobs/{digest}", preload_content=False)
                n = 0
                while data := r.read(BUF):
                    n += len(data)
                r.release_conn()
                assert n == size

            def u3_download_readinto(repo: str) -> None:
                r = pool.request(
                    "GET",
                    f"{base}/v2/{repo}/blobs/{digest}",
                    preload_content=False,
                    decode_content=False,
                )
                fp = r._fp  # type: ignore[attr-defined]  # http.client.HTTPResponse: socket -> buffer
                buf = bytearray(BUF)
                mv = memoryview(buf)
                n = 0
                while k := fp.readinto(mv):
                    n += k
                r.release_conn()
                assert n == size

            hx = httpx.Client(timeout=600)

            def hx_upload(repo: str) -> None:
                r = hx.post(f"{base}/v2/{repo}/blobs/uploads/")
                loc = urljoin(base + "/", r.headers["Location"])

                def body():  # type: ignore[no-untyped-def]
                    with open(src, "rb") as f:
                        while chunk := f.read(BUF):
                            yield chunk

                r = hx.put(
                    f"{loc}&digest={digest}",
                    content=body(),
                    headers={
                        "Content-Length": str(size),
                        "Content-Type": "application/octet-stream",
                    },
                )
                assert r.status_code == 201, r.status_code

            def hx_download(repo: str) -> None:
                n = 0
                with hx.stream("GET", f"{base}/v2/{repo}/blobs/{digest}") as r:
                    for chunk in r.iter_raw(BUF):
                        n += len(chunk)
                assert n == size

            from barge.oci import CredentialStore, RegistryClient
            from barge.reference import Reference

            client = RegistryClient(
                reg.host, home=tmpd / "home", credentials=CredentialStore.anonymous()
            )

            def barge_upload(repo: str) -> None:
                def open_at(off: int):  # type: ignore[no-untyped-def]
                    f = open(src, "rb")  # noqa: SIM115
                    f.seek(off)
                    return f

                client.upload_blob(Reference(reg.host, repo), digest, size, open_at)

            def barge_download(repo: str) -> None:
                buf = bytearray(BUF)
                n = 0
                with client.open_blob(
                    Reference(reg.host, repo), digest
                ) as r:  # verifies sha256 at EOF
                    while k := r.readinto(buf):
                        n += k
                assert n == size

            timed("urllib3 upload (PUT, file body)", size, lambda: u3_upload("bench/u3"))
            timed("httpx   upload (PUT, generator body)", size, lambda: hx_upload("bench/hx"))
            timed("urllib3 download (read(1 MiB))", size, lambda: u3_download_read("bench/u3"))
            timed(
                "urllib3 download (readinto from socket)",
                size,
                lambda: u3_download_readinto("bench/u3"),
            )
            timed("httpx   download (iter_raw(1 MiB))", size, lambda: hx_download("bench/hx"))
            timed("barge RegistryClient upload_blob", size, lambda: barge_upload("bench/barge"))
            timed(
                "barge BlobReader.readinto (+sha256)", size, lambda: barge_download("bench/barge")
            )
            hx.close()
            client.close()
        finally:
            reg.stop()


if __name__ == "__main__":
    main()
