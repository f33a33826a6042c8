"""A killed push continues a partly uploaded blob from the registry's upload ``Range`` in the
next run, instead of sending the whole chunk again; a session the registry no longer holds is
dropped cleanly. Counted from the registry's side: the fault proxy's bytes received."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from barge.cli import main
from barge.local import create_vm
from barge.oci import CredentialStore, RegistryClient
from barge.oci.sessions import UploadSessions
from barge.store import Store
from clitest import at, barge, opener, sha, sha256_file
from faultproxy import FaultProxy
from registries import RunningRegistry

MiB = 1 << 20
UPLOADS = r"/blobs/uploads/"
CHUNK = 32 * MiB


def make_vm(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.write(os.urandom(CHUNK))  # one chunk that does not compress
    create_vm(Store(), "vm", from_disk=disk)
    return disk


def push_args(ref: str) -> list[str]:
    # PATCH bodies of 1 MiB (as for registries that cap them): each answer is a point the
    # session can be continued from
    return ["push", "vm", ref, "--chunk-size", "32M", "--upload-chunk-size", "1M"]


def push_killed(ref: str, home: Path, killed_when: Callable[[], bool]) -> None:
    env = {**os.environ, "BARGE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "barge", *push_args(ref), "--concurrency", "1", "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not killed_when():
            assert proc.poll() is None, "the push ended before it could be killed"
            assert time.monotonic() < deadline, "the push never got far enough"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def chunk_layer(registry: RunningRegistry, repo: str, tag: str, home: Path) -> tuple[str, int]:
    c = RegistryClient(registry.host, home=home, credentials=CredentialStore.anonymous())
    layers = json.loads(c.get_manifest(at(c, repo, tag)).data)["layers"]
    big = max(layers, key=lambda d: d["size"])
    return str(big["digest"]), int(big["size"])


def pulled_disk(registry: RunningRegistry, ref: str, home: Path) -> str:
    """Pull ``ref`` straight from the registry into a fresh store; the disk's sha256."""
    res = CliRunner(env={"BARGE_HOME": str(home)}).invoke(
        main, ["pull", f"{registry.host}/{ref}", "-q"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    store = Store(home)
    (img,) = store.cached_images()
    return sha256_file(store.cache_dir / img.dirname / "disk.img")


def test_killed_push_continues_the_blob_from_the_registry_range(
    barge_home: Path,
    tmp_path: Path,
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
) -> None:
    disk = make_vm(tmp_path)
    # PATCHes reach the registry only whole (as ECR's upload parts do); the 13th is held
    # unanswered: the push is killed while it is in flight, 12 MiB into the chunk
    proxy = make_proxy(registry, atomic_patches=True)
    held = proxy.add(method="PATCH", path=UPLOADS, action="silent", skip=12, times=1)
    ref = f"{proxy.host}/resume/vm:v1"
    push_killed(ref, barge_home, lambda: held.fired == 1)
    first_run = proxy.request_bytes("PATCH", UPLOADS)
    assert first_run == 12 * MiB
    records = list((barge_home / "uploads").glob("*.json"))
    assert len(records) == 1  # the session, kept for the next run
    assert stat.S_IMODE(records[0].stat().st_mode) == 0o600

    proxy.clear()
    barge(*push_args(ref), "-q")
    digest, size = chunk_layer(registry, "resume/vm", "v1", barge_home)
    assert size > CHUNK  # incompressible: the whole chunk is one blob of ~32 MiB
    second_run = proxy.request_bytes("PATCH", UPLOADS)
    # the second run asked the session where it stood and sent only the rest of the chunk
    # (plus the small blobs: VM config, frame index, OCI config)
    assert proxy.count("GET", UPLOADS) >= 1
    assert size - first_run <= second_run < size - first_run + 64 * 1024, (second_run, size)
    assert list((barge_home / "uploads").glob("*.json")) == []  # done: forgotten
    assert pulled_disk(registry, "resume/vm:v1", tmp_path / "puller") == sha256_file(disk)
    assert digest  # the blob the registry verified against the full digest


def test_killed_push_against_a_registry_that_voids_the_session_starts_clean(
    barge_home: Path,
    tmp_path: Path,
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
) -> None:
    """Docker's distribution invalidates a session whose PATCH broke off mid-body (its
    state token no longer matches what it stored): the next run finds the session gone,
    drops it and uploads the chunk in a fresh one."""
    disk = make_vm(tmp_path)
    proxy = make_proxy(registry)
    ref = f"{proxy.host}/void/vm:v1"
    push_killed(ref, barge_home, lambda: proxy.request_bytes("PATCH", UPLOADS) >= 12 * MiB + 1)
    proxy.clear()
    barge(*push_args(ref), "-q")
    assert proxy.count("GET", UPLOADS) >= 1  # it asked
    assert list((barge_home / "uploads").glob("*.json")) == []
    assert pulled_disk(registry, "void/vm:v1", tmp_path / "puller") == sha256_file(disk)


def test_a_saved_session_the_registry_forgot_is_dropped(
    barge_home: Path, registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(registry)
    data = os.urandom(300_000)
    d = sha(data)
    # a session that existed once (then expired: here, cancelled) saved for this blob
    req = urllib.request.Request(f"{registry.url}/v2/gone/r/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        location = r.headers["Location"]
    with urllib.request.urlopen(urllib.request.Request(location, method="DELETE"), timeout=30):
        pass
    stale = location.replace(registry.host, proxy.host)
    claim = UploadSessions(barge_home / "uploads").claim(
        at(proxy.host, "gone/r"), f"blob:{d}:300000"
    )
    assert claim is not None
    claim.save(stale, 100_000)
    claim.release()

    c = RegistryClient(proxy.host, home=barge_home, credentials=CredentialStore.anonymous())
    c.upload_blob(at(c, "gone/r"), d, len(data), opener(data), chunk_size=100_000)
    assert proxy.count("GET", UPLOADS) == 1  # asked about the saved session: unknown
    assert proxy.count("POST", UPLOADS) == 1  # a fresh one
    assert proxy.request_bytes("PATCH", UPLOADS) == len(data)
    assert list((barge_home / "uploads").glob("*.json")) == []
    assert c.read_blob(at(c, "gone/r"), d, max_size=len(data)) == data
