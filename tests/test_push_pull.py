"""Push and pull through real registries: round trips, reuse, layer caps, faults, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from barge.cli import main
from barge.errors import ExitCode, IntegrityError, LimitError
from barge.local import create_vm
from barge.progress import NullReporter
from barge.store import Store
from barge.transfer.pull import PullOptions, pull
from barge.transfer.push import PushOptions, push
from clitest import barge, sha256_file
from faultproxy import FaultProxy
from registries import RunningRegistry
from seed import put_manifest

MiB = 1 << 20


def make_disk(path: Path, size: int, seed: int = 1) -> None:
    """A sparse disk: compressible text, random data, zeros and holes at odd places."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 * MiB + 123)
        f.write((b"barge sparse test data %d\n" % seed) * 40000)
        f.seek(9 * MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(17 * MiB)
        f.write(bytes(2 * MiB))  # explicit zeros: become holes on pull
        f.seek(size - 5000)
        f.write(rnd * 100)


@pytest.fixture
def vm(barge_home: Path, tmp_path: Path) -> tuple[Store, Path]:
    disk = tmp_path / "src.raw"
    make_disk(disk, 40 * MiB + 4096)
    store = Store()
    create_vm(store, "vm", from_disk=disk)
    return store, store.vm_path("vm") / "disk.img"


SMALL = PushOptions(chunk_size=8 * MiB, frame_size=1 * MiB)


def raw_manifest(ref: str) -> dict[str, Any]:
    """The manifest as the real peer (skopeo) reads it from the registry."""
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        check=True,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_round_trip_bit_identical_and_sparse(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, disk = vm
    ref = f"{registry.host}/team/vm:v1"
    res = push(store, "vm", [ref], SMALL)
    assert res.stats.uploaded_blobs > 0
    pulled = pull(store, ref)
    out = pulled.path / "disk.img"
    assert sha256_file(out) == sha256_file(disk)
    assert out.stat().st_size == disk.stat().st_size
    # holes preserved: only about the data is allocated (the 2 MiB of zeros are not)
    assert out.stat().st_blocks * 512 <= 6 * MiB
    rows = json.loads(barge("list", "--format", "json", "--source", "oci"))
    assert [r["reference"] for r in rows] == [ref]
    info = json.loads(barge("get", ref, "--format", "json"))
    assert info["digest"] == pulled.digest and info["reference"] == ref
    assert info["disks"][0]["allocated"] <= 6 * MiB
    assert "no cached image" in barge("get", ref + "x", code=ExitCode.NOT_FOUND)
    # the same tag again is a no-op
    again = pull(store, ref)
    assert again.up_to_date and again.digest == pulled.digest


def test_layer_order_does_not_matter(vm: tuple[Store, Path], registry: RunningRegistry) -> None:
    store, disk = vm
    ref = f"{registry.host}/team/vm:v1"
    res = push(store, "vm", [ref], SMALL)
    doc = raw_manifest(ref)
    assert res.digest
    doc["layers"].reverse()
    put_manifest(registry, "team/vm", "reordered", json.dumps(doc).encode())
    home2 = Store(store.home.parent / "other-home")
    pulled = pull(home2, f"{registry.host}/team/vm:reordered")
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_multi_tag_and_repush_send_no_disk_blob(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, _disk = vm
    proxy = make_proxy(registry)
    refs = [f"{proxy.host}/a/vm:v1", f"{proxy.host}/a/vm:latest", f"{proxy.host}/b/vm:v1"]
    res = push(store, "vm", refs, SMALL)
    assert len(res.references) == 3
    uploads = proxy.count("PUT", r"/blobs/uploads/")
    assert uploads == res.stats.uploaded_blobs
    # repository b got its blobs by mounting, not by upload
    assert res.stats.mounted_blobs >= res.stats.uploaded_blobs
    proxy.clear()
    again = push(store, "vm", [f"{proxy.host}/a/vm:v2", f"{proxy.host}/c/vm:v1"], SMALL)
    assert again.digest == res.digest
    assert again.stats.uploaded_bytes == 0 and again.stats.compressed_chunks == 0
    assert proxy.count("PATCH") == 0 and proxy.count("PUT", r"/blobs/") == 0
    assert proxy.request_bytes("PUT", "/blobs/") == 0


def test_forced_layer_cap_raises_chunk_size(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, disk = vm
    reporter = NullReporter()
    opts = PushOptions(chunk_size=4 * MiB, frame_size=1 * MiB, max_layers=6)
    res = push(store, "vm", [f"{registry.host}/cap/vm:v1"], opts, reporter)
    assert res.chunk_size > 4 * MiB and res.layers <= 6
    assert any("chunk size raised" in n for n in reporter.notes)
    pulled = pull(store, f"{registry.host}/cap/vm:v1")
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_impossible_cap_refused_before_upload(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, _ = vm
    proxy = make_proxy(registry)
    err = barge("push", "vm", f"{proxy.host}/cap/vm:v1", "--max-layers", "2", code=ExitCode.LIMIT)
    assert "layers" in err and "allows 2" in err
    assert proxy.count("POST") == 0 and proxy.count("PUT") == 0


def test_corrupt_blob_fails_pull_and_leaves_nothing(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, _ = vm
    ref = f"{registry.host}/bad/vm:v1"
    push(store, "vm", [ref], SMALL)
    # pick the largest chunk layer and flip a byte in the registry's storage
    doc = raw_manifest(ref)
    layer = max(
        (d for d in doc["layers"] if "disk.chunk" in d["mediaType"]), key=lambda d: d["size"]
    )
    blob = registry.blob_path(layer["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    other = Store(store.home.parent / "pull-home")
    with pytest.raises(IntegrityError) as e:
        pull(other, ref)
    assert layer["digest"] in str(e.value) or "frame" in str(e.value)
    assert other.cached_images() == []
    assert list(other.cache_dir.iterdir()) == []


def test_ipv6_and_port_references_listed_exactly(
    vm: tuple[Store, Path], registry_ipv6: RunningRegistry, registry: RunningRegistry
) -> None:
    store, _ = vm
    r6 = f"{registry_ipv6.host}/x/y:z"
    r4 = f"{registry.host}/team/macos:sonoma"
    push(store, "vm", [r6], SMALL)
    push(store, "vm", [r4], SMALL)
    other = Store(store.home)
    pull(other, r6)
    pull(other, r4)
    listed = barge("list", "-q", "--source", "oci").split()
    assert sorted(listed) == sorted([r6, r4])
    assert r6.startswith("[::1]:")


def test_incremental_pull_fetches_only_changed_frames(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, disk = vm
    push(store, "vm", [f"{registry.host}/inc/vm:v1"], SMALL)
    puller_home = Store(store.home.parent / "inc-home")
    pull(puller_home, f"{registry.host}/inc/vm:v1")
    with open(disk, "r+b") as f:  # change one 4 KiB block inside the random region
        f.seek(10 * MiB + 4096)
        f.write(os.urandom(4096))
    push(store, "vm", [f"{registry.host}/inc/vm:v2"], SMALL)
    res = pull(puller_home, f"{registry.host}/inc/vm:v2")
    assert sha256_file(res.path / "disk.img") == sha256_file(disk)
    assert res.base is not None
    # one 1 MiB frame of random data changed: about 1 MiB fetched, the rest reused
    assert res.stats.fetched_bytes <= 1.1 * MiB
    assert res.stats.reused_bytes >= 4 * MiB
    assert res.stats.range_requests == 1


def slow_down(proxy: FaultProxy, method: str, path_re: str, seconds: float) -> None:
    """Make the proxy wait before forwarding matching requests (so a kill lands mid-way)."""
    import re

    orig = proxy._pick

    def pick(m: str, path: str, headers: dict[str, str]) -> object:
        if m == method and re.search(path_re, path):
            time.sleep(seconds)
        return orig(m, path, headers)

    proxy._pick = pick  # type: ignore[method-assign,assignment]


KILL_SCRIPT = """
import sys, time
from barge.store import Store
from barge.transfer.push import push, PushOptions
from barge.transfer.pull import pull
store = Store()
if sys.argv[1] == "push":
    push(store, "vm", [sys.argv[2]], PushOptions(chunk_size=8 << 20, frame_size=1 << 20,
         concurrency=1))
else:
    pull(store, sys.argv[2])
"""


def _run_until_killed(args: list[str], ready: Callable[[], bool]) -> None:
    """Start a push or pull in a child process and SIGKILL it as soon as ``ready()``."""
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], env=env)
    deadline = time.monotonic() + 60
    try:
        while not ready() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("the operation never got going")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def registry_blobs(reg: RunningRegistry) -> set[str]:
    root = reg.storage_dir / "docker/registry/v2/blobs/sha256"
    return {"sha256:" + p.parent.name for p in root.glob("*/*/data")}


def test_killed_push_resumes(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, disk = vm
    proxy = make_proxy(registry)
    # slow every chunk upload down a little so the kill lands mid-push
    slow_down(proxy, "PUT", r"/blobs/uploads/", 0.3)
    ref = f"{proxy.host}/kill/vm:v1"
    _run_until_killed(["push", ref], lambda: len(registry_blobs(registry)) >= 2)
    reached = registry_blobs(registry)
    assert reached, "the kill should land after some blobs reached the registry"
    proxy.clear()
    res = push(store, "vm", [ref], SMALL)
    # what reached the registry is not sent again: only the rest is uploaded
    uploaded_now = registry_blobs(registry) - reached - {res.digest}  # manifests are blobs too
    assert res.stats.existing_blobs >= len(reached)
    assert res.stats.uploaded_blobs == len(uploaded_now)
    pulled = pull(Store(store.home.parent / "kill-home"), f"{registry.host}/kill/vm:v1")
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_killed_pull_resumes(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, disk = vm
    push(store, "vm", [f"{registry.host}/kill/vm:v1"], SMALL)
    proxy = make_proxy(registry)
    slow_down(proxy, "GET", r"/blobs/sha256", 0.3)
    ref = f"{proxy.host}/kill/vm:v1"
    puller = Store(store.home.parent / "resume-home")
    env_home = str(puller.home)
    old = os.environ.get("BARGE_HOME")
    os.environ["BARGE_HOME"] = env_home
    try:
        _run_until_killed(["pull", ref], lambda: proxy.count("GET", r"/blobs/sha256") >= 4)
    finally:
        if old is not None:
            os.environ["BARGE_HOME"] = old
    assert puller.cached_images() == []  # nothing half-written is visible
    assert (
        json.loads(
            CliRunner(env={"BARGE_HOME": env_home})
            .invoke(main, ["list", "--format", "json"])
            .stdout
        )
        == []
    )
    res = pull(puller, f"{registry.host}/kill/vm:v1")
    assert sha256_file(res.path / "disk.img") == sha256_file(disk)


def test_gc_under_concurrent_operations_loses_nothing(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, disk = vm
    want = sha256_file(disk)
    push(store, "vm", [f"{registry.host}/gc/vm:v0"], SMALL)
    errors: list[BaseException] = []
    stop = threading.Event()

    def gc_loop() -> None:
        s = Store(store.home)
        for _ in range(400):
            if stop.is_set():
                return
            try:
                s.gc(older_than=0, space_budget=0)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        for i in range(4):
            s = Store(store.home)
            push(s, "vm", [f"{registry.host}/gc/vm:v{i + 1}"], SMALL)
            res = pull(s, f"{registry.host}/gc/vm:v{i + 1}")
            # the pulled image may be collected right after the pull, but never during it
            from barge.transfer.clone import clone_image

            _, cloned = clone_image(s, f"{registry.host}/gc/vm:v{i + 1}", f"c{i}")
            assert sha256_file(cloned.vm.path / "disk.img") == want
            assert res.digest
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize("variant", ["tls", "token", "basic"])
def test_push_pull_with_auth_and_tls(
    vm: tuple[Store, Path],
    variant: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, disk = vm
    reg: RunningRegistry = request.getfixturevalue(f"registry_{variant}")
    if reg.ca_cert is not None:
        certs = store.home / "certs.d" / reg.host
        certs.mkdir(parents=True)
        (certs / "ca.crt").write_bytes(reg.ca_cert.read_bytes())
    if reg.username:
        assert reg.password
        monkeypatch.setenv("BARGE_REGISTRY_USERNAME", reg.username)
        monkeypatch.setenv("BARGE_REGISTRY_PASSWORD", reg.password)
    ref = f"{reg.host}/sec/vm:v1"
    push(store, "vm", [ref], SMALL)
    pulled = pull(Store(store.home), ref, PullOptions())
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_push_cli_reports_and_refuses_locked_vm(
    vm: tuple[Store, Path], registry: RunningRegistry
) -> None:
    store, _ = vm
    out = barge("push", "vm", f"{registry.host}/cli/vm", "--format", "json", "--chunk-size", "8M")
    doc = json.loads(out)
    assert doc["references"] == [f"{registry.host}/cli/vm:latest"]
    assert doc["digest"].startswith("sha256:")
    with store.lock_vm("vm"):
        err = barge("push", "vm", f"{registry.host}/cli/vm:v2", code=ExitCode.BUSY)
        assert "in use" in err
    err = barge("push", "vm", "Bad/Ref", code=ExitCode.USAGE)
    assert "lowercase" in err


def test_limit_error_type() -> None:
    assert issubclass(LimitError, Exception)


def test_concurrent_pulls_download_once(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, disk = vm
    push(store, "vm", [f"{registry.host}/conc/vm:v1"], SMALL)
    proxy = make_proxy(registry)
    slow_down(proxy, "GET", r"/blobs/sha256", 0.05)
    ref = f"{proxy.host}/conc/vm:v1"
    home = store.home.parent / "conc-home"
    env = dict(os.environ, BARGE_HOME=str(home))
    procs = [
        subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, "pull", ref], env=env)
        for _ in range(3)
    ]
    for p in procs:
        assert p.wait(120) == 0
    layers = [d for d in raw_manifest(ref)["layers"] if "disk.chunk" in d["mediaType"]]
    for d in layers:  # every disk layer was downloaded by exactly one of the three
        assert proxy.count("GET", "/blobs/" + d["digest"]) == 1
    images = Store(home).cached_images()
    assert len(images) == 1
    assert sha256_file(home / "cache" / images[0].dirname / "disk.img") == sha256_file(disk)


def test_all_zero_disk_round_trip(barge_home: Path, registry: RunningRegistry) -> None:
    """An empty disk has no chunk layer at all; it is still a barge image."""
    store = Store()
    create_vm(store, "empty", disk_size=64 * MiB)
    ref = f"{registry.host}/empty/vm:v1"
    res = push(store, "empty", [ref], SMALL)
    assert res.layers == 2  # VM config and frame index only
    pulled = pull(Store(store.home.parent / "empty-home"), ref)
    disk = pulled.path / "disk.img"
    assert disk.stat().st_size == 64 * MiB and disk.stat().st_blocks == 0


def test_push_without_credentials_says_how_to_log_in(
    vm: tuple[Store, Path], registry_basic: RunningRegistry
) -> None:
    err = barge("push", "vm", f"{registry_basic.host}/sec/vm:v1", code=ExitCode.AUTH)
    assert f"barge login {registry_basic.host}" in err
    assert len(err.strip().splitlines()) <= 2  # the error and its hint


def test_token_expiring_mid_push_is_refreshed(
    vm: tuple[Store, Path], registry_token: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens that expire after a second: a push slowed down past that keeps going, asking
    the token server again when the registry answers 401."""
    store, disk = vm
    ts = registry_token.token_server
    assert ts is not None and registry_token.username and registry_token.password
    ts.expires_in = 1
    monkeypatch.setenv("BARGE_REGISTRY_USERNAME", registry_token.username)
    monkeypatch.setenv("BARGE_REGISTRY_PASSWORD", registry_token.password)
    from barge.disk import chunker

    real = chunker.hash_chunk

    def slow_hash(*a: object, **kw: object) -> object:
        time.sleep(0.6)
        return real(*a, **kw)  # type: ignore[arg-type]

    import barge.transfer.write_barge as writer

    monkeypatch.setattr(writer, "hash_chunk", slow_hash)
    ref = f"{registry_token.host}/tok/vm:v1"
    push(store, "vm", [ref], SMALL)  # first push: chunk index filled
    # a new mtime: the file-state cache cannot vouch for the disk, so the next push hashes
    # (on a loaded machine the first push can outlast the 2 s racy-clean window)
    os.utime(disk)
    before = len(ts.requests)
    started = time.monotonic()
    push(store, "vm", [f"{registry_token.host}/tok/vm:v2"], SMALL)  # hashes first, slowly
    assert time.monotonic() - started > 1.5  # the push outlived its first token
    assert len(ts.requests) - before >= 2  # and asked for a new one
    pulled = pull(Store(store.home.parent / "tok-home"), f"{registry_token.host}/tok/vm:v2")
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_import_refused_up_front_when_the_disk_is_full(
    barge_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "big.raw"
    make_disk(disk, 40 * MiB)
    import barge.local as local_mod

    class Full:
        f_bavail = 1
        f_frsize = 4096

    monkeypatch.setattr(local_mod.os, "statvfs", lambda p: Full())
    err = barge("create", "big", "--from-disk", str(disk), code=ExitCode.NO_SPACE)
    assert "not enough space" in err
    assert json.loads(barge("list", "--format", "json")) == []


@pytest.mark.parametrize("two_registries", [False, True])
def test_push_in_small_patch_chunks(
    vm: tuple[Store, Path],
    registry: RunningRegistry,
    registry2: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    two_registries: bool,
) -> None:
    """Registries that cap PATCH bodies (GHCR: 4 MiB) get uploads in PATCHes of at most
    --upload-chunk-size bytes: streamed straight from the encoder to one registry, or spooled
    once and sent to each of two registries."""
    store, disk = vm
    proxy = make_proxy(registry)
    refs = [f"{proxy.host}/small/vm:v1"]
    if two_registries:
        refs.append(f"{registry2.host}/small/vm:v1")
    out = barge(
        "push",
        "vm",
        *refs,
        "--chunk-size",
        "8M",
        "--upload-chunk-size",
        "256K",
        "--format",
        "json",
    )
    assert sorted(json.loads(out)["references"]) == sorted(refs)
    patches = [e.request_bytes for e in proxy.log if e.method == "PATCH"]
    assert len(patches) > 4 and 0 < max(patches) <= 256 * 1024
    for host in [registry.host] + ([registry2.host] if two_registries else []):
        pulled = pull(Store(store.home.parent / f"small-{host}"), f"{host}/small/vm:v1")
        assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)


def test_registry_refusals_of_the_manifest_are_explained(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(registry)
    # ECR's answer when an image has too many layers
    proxy.add(
        method="PUT",
        path="/manifests/",
        status=405,
        body=json.dumps(
            {
                "errors": [
                    {"code": "DENIED", "message": "Limit on number of layers per image exceeded"}
                ]
            }
        ).encode(),
    )
    err = barge("push", "vm", f"{proxy.host}/cap/vm:v1", "--chunk-size", "8M", code=ExitCode.LIMIT)
    assert "layer limit" in err and "--max-layers" in err
    # a registry that allow-lists media types
    proxy.add(
        method="PUT",
        path="/manifests/",
        status=415,
        body=json.dumps(
            {"errors": [{"code": "MANIFEST_INVALID", "message": "media type not allowed"}]}
        ).encode(),
    )
    err = barge(
        "push", "vm", f"{proxy.host}/types/vm:v1", "--chunk-size", "8M", code=ExitCode.UNSUPPORTED
    )
    assert "application/vnd.barge.disk.chunk.v1+zstd" in err and "media type not allowed" in err


def test_second_repository_gets_the_stream_again_when_mounts_are_refused(
    vm: tuple[Store, Path], registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registries that answer every mount with a fresh upload session (202) still get every
    repository's blobs: the chunk is encoded and streamed again."""
    from barge.oci.client import RegistryClient

    monkeypatch.setattr(RegistryClient, "mount_blob", lambda self, repo, digest, src: False)
    store, disk = vm
    refs = [f"{registry.host}/one/vm:v1", f"{registry.host}/two/vm:v1"]
    res = push(store, "vm", refs, SMALL)
    assert res.stats.mounted_blobs == 0
    for ref in refs:
        pulled = pull(Store(store.home.parent / ref.replace("/", "_")), ref)
        assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)
