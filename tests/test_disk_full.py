"""A full disk. A pull or clone that cannot fit is refused before it writes (exit 9, with what
it needs and what is free); running out of space mid-pull is exit 9, gives the space back and
says what to free; the catalog, ``list`` and ``prune`` keep working on a full disk, and
``prune`` removes abandoned work in ``tmp/``.

Each test puts ``$BARGE_HOME`` on a small tmpfs of its own (mounted here, unmounted in
teardown; skipped where mounting is not permitted) and pulls from the real registry."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clitest import barge, run_cli, sha256_file, spawn, wait_until
from faultproxy import FaultProxy
from registries import RunningRegistry

MiB = 1 << 20


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount(size)``: a fresh tmpfs of that size (``64M``) under tmp_path."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in reversed(mounted):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Write a file on ``fs`` until only ``leave`` bytes are free (0: completely full)."""
    path = fs / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    piece = os.urandom(MiB)
    try:
        while (room := free_bytes(fs) - leave) > 0:
            try:
                os.write(fd, piece[: min(room, MiB)])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path


@pytest.fixture
def image(barge_home: Path, tmp_path: Path, registry: RunningRegistry) -> tuple[str, str]:
    """A 48 MiB image (random data on a 128 MiB sparse disk) in the registry, pushed from
    barge_home: (its repository path, the source disk's sha256)."""
    disk = tmp_path / "src.raw"
    with open(disk, "wb") as f:
        f.truncate(128 * MiB)
        f.write(random.Random(7).randbytes(48 * MiB))
    barge("create", "src", "--from-disk", str(disk))
    barge("push", "src", f"{registry.host}/full/vm:v1", "--chunk-size", "16M")
    return "full/vm:v1", sha256_file(disk)


def slowed_pull(
    image: tuple[str, str],
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    home: Path,
    rate: int,
) -> tuple[FaultProxy, str, subprocess.Popen[str]]:
    """``barge pull`` of ``image`` into ``home`` started through a proxy that moves layers at
    ``rate`` bytes/s: (the proxy, the reference pulled, the running process)."""
    proxy = make_proxy(registry)
    proxy.add(method="GET", path=r"/blobs/sha256:", action="slow", rate=rate, times=None)
    ref = f"{proxy.host}/{image[0]}"
    return proxy, ref, spawn("pull", ref, home=home)


def cached_disk(home: Path) -> Path:
    (path,) = (home / "cache").glob("*/disk.img")
    return path


def test_pull_and_clone_that_cannot_fit_are_refused_before_writing(
    image: tuple[str, str],
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    small_fs: Callable[[str], Path],
) -> None:
    home = small_fs("40M") / "home"
    proxy = make_proxy(registry)
    ref = f"{proxy.host}/{image[0]}"
    r = run_cli("pull", ref, home=home)
    assert r.returncode == 9, r.stderr
    m = re.search(
        r"not enough space to pull .*: it needs about ([\d.]+ MiB), ([\d.]+ MiB) is free", r.stderr
    )
    assert m, r.stderr
    assert float(m.group(1).split()[0]) >= 48 > float(m.group(2).split()[0])
    assert "hint: free at least" in r.stderr and "Traceback" not in r.stderr
    # only the small metadata blobs were read: no layer was downloaded
    assert proxy.response_bytes("GET", r"/blobs/") < MiB
    assert os.listdir(home / "tmp") == []

    r = run_cli("clone", ref, "copy", home=home)
    assert r.returncode == 9, r.stderr
    m = re.search(r"not enough space to pull and clone .*: it needs about ([\d.]+) MiB", r.stderr)
    assert m and float(m.group(1)) >= 96, r.stderr  # no copy-on-write on tmpfs: twice
    assert run_cli("list", home=home).returncode == 0
    assert run_cli("prune", home=home).returncode == 0


def test_running_out_of_space_mid_pull_gives_the_space_back_and_says_what_to_free(
    image: tuple[str, str],
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    small_fs: Callable[[str], Path],
) -> None:
    fs = small_fs("96M")
    home = fs / "home"
    proxy, ref, proc = slowed_pull(image, registry, make_proxy, home, 4 * MiB)

    def writing() -> bool:
        return any(
            p.stat().st_blocks * 512 >= 8 * MiB for p in (home / "tmp").glob("pull-*/disk.img")
        )

    wait_until(lambda: proc.poll() is not None or writing(), 120, "the pull writing its disk")
    filler = fill(fs)  # something else takes the rest of the disk
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert "no space left on the filesystem of" in err and "while pulling" in err, err
    assert "the partial pull was removed" in err
    assert "hint: free" in err and "Traceback" not in err and "internal error" not in err
    assert list((home / "tmp").glob("pull-*")) == []  # the space went back

    for cmd in (("list",), ("prune",), ("list", "--source", "oci")):
        r = run_cli(*cmd, home=home)
        assert r.returncode == 0, (cmd, r.stderr)
    filler.unlink()
    proxy.clear()
    r = run_cli("pull", ref, home=home)
    assert r.returncode == 0, r.stderr
    assert sha256_file(cached_disk(home)) == image[1]


def _killed_pull(proxy: FaultProxy, proc: subprocess.Popen[str], at: int) -> None:
    """SIGKILL a pull once ``at`` bytes of layers went through the proxy: its staging
    directory stays in tmp/ with no live lease holder."""
    try:
        wait_until(
            lambda: proc.poll() is not None or proxy.response_bytes("GET", "/blobs/") >= at,
            120,
            "the pull downloading",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)


def test_catalog_list_and_prune_work_on_a_full_disk(
    image: tuple[str, str],
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    small_fs: Callable[[str], Path],
) -> None:
    fs = small_fs("64M")
    home = fs / "home"
    proxy, _ref, proc = slowed_pull(image, registry, make_proxy, home, 8 * MiB)
    _killed_pull(proxy, proc, 16 * MiB)
    (staging,) = (home / "tmp").glob("pull-*")
    fill(fs)
    assert free_bytes(fs) == 0

    for cmd in (("list",), ("list", "--source", "oci", "--format", "json")):
        r = run_cli(*cmd, home=home)
        assert r.returncode == 0, (cmd, r.stderr)
    r = run_cli("prune", home=home)
    assert r.returncode == 0, r.stderr
    assert "1 abandoned entry of tmp/" in r.stdout, r.stdout
    assert not staging.exists()
    with sqlite3.connect(home / "catalog.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM leases").fetchone() == (0,)


def test_a_catalog_that_cannot_grow_is_exit_9_with_what_to_free(
    image: tuple[str, str], registry: RunningRegistry, small_fs: Callable[[str], Path]
) -> None:
    fs = small_fs("80M")
    home = fs / "home"
    ref = f"{registry.host}/{image[0]}"
    assert run_cli("pull", ref, home=home).returncode == 0
    (home / "catalog.reserve").unlink(missing_ok=True)  # as if something had eaten it
    filler = fill(fs)
    r = run_cli("pull", ref, home=home)  # cached: only the catalog is written
    assert r.returncode == 9, r.stderr
    assert "no space left on the filesystem of" in r.stderr and "catalog" in r.stderr, r.stderr
    assert "hint:" in r.stderr and "internal error" not in r.stderr
    filler.unlink()
    r = run_cli("pull", ref, home=home)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stderr
    assert (home / "catalog.reserve").stat().st_blocks * 512 >= 8 * MiB  # made again


def test_space_check_counts_what_an_interrupted_pull_kept(
    image: tuple[str, str],
    registry: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
    small_fs: Callable[[str], Path],
) -> None:
    fs = small_fs("80M")
    home = fs / "home"
    proxy, ref, proc = slowed_pull(image, registry, make_proxy, home, 8 * MiB)
    wait_until(lambda: proxy.response_bytes("GET", "/blobs/") >= 24 * MiB, 120, "downloading")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (disk,) = (home / "tmp").glob("pull-*/disk.img")
    kept = disk.stat().st_blocks * 512
    assert kept >= 16 * MiB
    # room for the rest of the pull, but not for the whole image
    fill(fs, leave=48 * MiB - kept + 6 * MiB)
    assert free_bytes(fs) < 48 * MiB
    proxy.clear()
    r = run_cli("pull", ref, home=home)
    assert r.returncode == 0, r.stderr
    assert sha256_file(cached_disk(home)) == image[1]


def test_a_push_spool_that_cannot_fit_is_exit_9_and_leaves_nothing(
    registry: RunningRegistry,
    registry2: RunningRegistry,
    small_fs: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    fs = small_fs("64M")
    home = fs / "home"
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.write(random.Random(3).randbytes(24 * MiB))
    assert run_cli("create", "src", "--from-disk", str(raw), home=home).returncode == 0
    fill(fs, leave=6 * MiB)
    # two registries: every chunk is compressed once into a spool file in tmp/
    dests = (f"{registry.host}/a/vm:v1", f"{registry2.host}/b/vm:v1")
    r = run_cli("push", "src", *dests, "--chunk-size", "16M", home=home)
    assert r.returncode == 9, r.stderr
    assert "compresses each chunk once into tmp/" in r.stderr, r.stderr
    assert "one registry at a time" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(home / "tmp") == []
    assert run_cli("list", home=home).returncode == 0


def test_a_base_too_big_to_copy_is_left_out_rather_than_refusing(
    registry: RunningRegistry, small_fs: Callable[[str], Path], tmp_path: Path, barge_home: Path
) -> None:
    """On a filesystem without copy-on-write an incremental pull starts from a copy of the
    base: when that copy does not fit but the image does, the pull goes on without the base."""
    data = random.Random(5).randbytes(40 * MiB)
    for name, size in (("big", 40 * MiB), ("small", 8 * MiB)):  # small shares big's start
        raw = tmp_path / f"{name}.raw"
        with open(raw, "wb") as f:
            f.truncate(64 * MiB)
            f.write(data[:size])
        barge("create", name, "--from-disk", str(raw))
        barge("push", name, f"{registry.host}/base/vm:{name}")
    fs = small_fs("96M")
    home = fs / "home"
    assert run_cli("pull", f"{registry.host}/base/vm:big", home=home).returncode == 0
    fill(fs, leave=20 * MiB)  # room for the small image, not for a copy of the big one
    r = run_cli("pull", f"{registry.host}/base/vm:small", home=home)
    assert r.returncode == 0, r.stderr
    assert "pulling without it" in r.stderr
    pulled = [
        p
        for p in (home / "cache").glob("*/disk.img")
        if p.stat().st_size and (p.stat().st_blocks * 512 < 20 * MiB)
    ]
    assert len(pulled) == 1 and sha256_file(pulled[0]) == sha256_file(tmp_path / "small.raw")
