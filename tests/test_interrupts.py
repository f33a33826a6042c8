"""Ctrl-C and SIGTERM: push, pull and copy stop within 2 s, keep their verified work, say what
they kept (one line), exit 130 without a traceback; the next run resumes that work and ends
bit-identical.

Every test runs barge as a child process against a real registry behind the fault proxy,
which moves blob bodies at a few MiB/s so that the signal lands mid-transfer."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from clitest import barge, run_cli, sha256_file, spawn, wait_until
from faultproxy import FaultProxy
from registries import RunningRegistry
from seed import OCI_MANIFEST

MiB = 1 << 20
STOP_WITHIN = 2.0  # seconds from the signal to the process's exit
RATE = 4 * MiB  # bytes per second per slowed request


@pytest.fixture
def source(barge_home: Path, tmp_path: Path) -> Path:
    """Local VM ``src``: a 256 MiB sparse disk holding 40 MiB of random data (incompressible,
    so what crosses the proxy is what the disk holds)."""
    disk = tmp_path / "src.raw"
    rnd = random.Random(10)
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
        f.write(rnd.randbytes(40 * MiB))
    barge("create", "src", "--from-disk", str(disk))
    return barge_home / "vms" / "src" / "disk.img"


def layer_bytes(reg: RunningRegistry, repo: str, tag: str) -> int:
    """The total size of an image's layers, as the registry's manifest says."""
    req = urllib.request.Request(
        f"{reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = json.loads(r.read())
    return sum(int(d["size"]) for d in doc["layers"])


def interrupt(
    proc: subprocess.Popen[str], sig: int, ready: Callable[[], bool], what: str
) -> tuple[float, str]:
    """Send ``sig`` once ``ready()``; returns (seconds until the process exited, its stderr)."""

    def go() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"barge ended before {what}: {proc.communicate()}")
        return ready()

    wait_until(go, 120, what)
    start = time.monotonic()
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    return time.monotonic() - start, err


def check_interrupted(proc: subprocess.Popen[str], took: float, err: str, kept: str) -> None:
    print(f"exited {took:.3f} s after the signal: {proc.args[3:5]}")  # the figure, with -s
    assert proc.returncode == 130, err
    assert took < STOP_WITHIN, f"exited {took:.2f} s after the signal"
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("barge: interrupted")]
    assert len(lines) == 1 and kept in lines[0], err


def clone_sha(home: Path, ref: str, name: str) -> str:
    r = run_cli("clone", ref, name, home=home)
    assert r.returncode == 0, r.stderr
    return sha256_file(home / "vms" / name / "disk.img")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_pull_keeps_verified_frames_and_resumes(
    sig: int,
    source: Path,
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    tmp_path: Path,
) -> None:
    barge("push", "src", f"{registry.host}/intr/vm:v1", "--chunk-size", "32M")
    full = layer_bytes(registry, "intr/vm", "v1")
    proxy = make_proxy(registry)
    proxy.add(method="GET", path=r"/blobs/sha256:", action="slow", rate=RATE, times=None)
    ref = f"{proxy.host}/intr/vm:v1"
    home = tmp_path / "puller"
    proc = spawn("pull", ref, home=home)
    took, err = interrupt(
        proc,
        sig,
        lambda: proxy.response_bytes("GET", r"/blobs/sha256:") >= 16 * MiB,
        "16 MiB of layers downloaded",
    )
    check_interrupted(proc, took, err, "kept")
    assert "of verified frames in the staging area" in err
    assert "run the same command to resume" in err
    assert len(list((home / "tmp").glob("pull-*"))) == 1, "the staging directory stays"
    listed = run_cli("list", "--source", "oci", "--format", "json", home=home)
    assert json.loads(listed.stdout) == [], "nothing half-pulled is listed"

    proxy.clear()
    again = run_cli("pull", ref, home=home)
    assert again.returncode == 0, again.stderr
    refetched = proxy.response_bytes("GET", r"/blobs/sha256:")
    # what the interrupted run verified is not fetched again (at least one 4 MiB frame)
    assert refetched <= full - 4 * MiB, (refetched, full)
    assert clone_sha(home, ref, "copy") == sha256_file(source)


def _closed_uploads(proxy: FaultProxy, min_bytes: int) -> int:
    """Uploads of more than ``min_bytes`` the registry accepted (its 201 to the closing PUT),
    counted by the bytes the proxy saw for their session."""
    done = 0
    with proxy._lock:
        log = list(proxy.log)
    sent: dict[str, int] = {}
    for e in log:
        if "/blobs/uploads/" not in e.path:
            continue
        session = e.path.rstrip("/").rsplit("/", 1)[-1]
        sent[session] = sent.get(session, 0) + e.request_bytes
        if e.method == "PUT" and e.status == 201 and sent[session] > min_bytes:
            done += 1
    return done


def interrupt_upload_and_rerun(
    proxy: FaultProxy, args: tuple[str, ...], home: Path, first: int, kept: str, image: str
) -> None:
    """Run ``barge ARGS``, SIGINT it once one upload of over 1 MiB finished and ``first``
    bytes went up; check the interruption; run it again unslowed: it sends at least one
    16 MiB layer less than the layers of ``image`` (``repo:tag`` behind the proxy)."""
    proc = spawn(*args, home=home)
    took, err = interrupt(
        proc,
        signal.SIGINT,
        lambda: (
            _closed_uploads(proxy, MiB) >= 1
            and proxy.request_bytes("*", r"/blobs/uploads/") >= first
        ),
        "one layer uploaded and the next one under way",
    )
    check_interrupted(proc, took, err, kept)
    assert "run the same command to resume" in err
    proxy.clear()
    again = run_cli(*args, home=home)
    assert again.returncode == 0, again.stderr
    resent = proxy.request_bytes("*", r"/blobs/uploads/")
    full = layer_bytes(proxy.upstream, *image.split(":"))
    assert resent <= full - 16 * MiB, (resent, full)  # finished layers were not sent again


def test_interrupted_push_keeps_finished_chunks_and_resumes(
    source: Path,
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    barge_home: Path,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(registry)
    proxy.add(method="PATCH", path=r"/blobs/uploads/", action="slow", rate=RATE, times=None)
    args = ("push", "src", f"{proxy.host}/intr/vm:v1", "--chunk-size", "16M", "--concurrency", "1")
    kept = "are in the registry and in the chunk index"
    interrupt_upload_and_rerun(proxy, args, barge_home, 20 * MiB, kept, "intr/vm:v1")
    pulled = clone_sha(tmp_path / "fresh", f"{registry.host}/intr/vm:v1", "copy")
    assert pulled == sha256_file(source)


def test_interrupted_copy_keeps_finished_blobs_and_resumes(
    source: Path,
    registry: RunningRegistry,
    registry2: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    barge_home: Path,
    tmp_path: Path,
) -> None:
    src = f"{registry.host}/intr/vm:v1"
    barge("push", "src", src, "--chunk-size", "16M")
    proxy = make_proxy(registry2)
    proxy.add(method="PUT", path=r"/blobs/uploads/", action="slow", rate=RATE, times=None)
    args = ("copy", src, f"{proxy.host}/copied/vm:v1", "--concurrency", "2")
    kept = "are at the destination"
    interrupt_upload_and_rerun(proxy, args, barge_home, 36 * MiB, kept, "copied/vm:v1")
    # the clone pulls (and verifies) every layer of the copy
    pulled = clone_sha(tmp_path / "fresh", f"{registry2.host}/copied/vm:v1", "copy")
    assert pulled == sha256_file(source)
