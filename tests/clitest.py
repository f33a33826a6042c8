"""Helpers shared by the tests: the CLI run in-process, digests, blob openers, and an Apple
LZ4 stream reader written from FORMAT.md §1 that shares no code with barge."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block
from click.testing import CliRunner

from barge.cli import main
from barge.oci.api import RegistryAPI
from barge.reference import Reference

MiB = 1 << 20


def barge(*args: str, code: int = 0) -> str:
    """Run ``barge ARGS`` in-process; assert its exit code and that no traceback leaked.
    Returns stdout on success; otherwise what it printed (a verdict on stdout, if any, then
    the one-line error on stderr)."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, (args, res.exit_code, res.output, res.stderr)
    assert "Traceback" not in res.output + res.stderr
    return res.stdout if code == 0 else res.stdout + res.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def at(client: RegistryAPI | str, repository: str, tag_or_digest: str | None = None) -> Reference:
    """``repository`` on ``client``'s registry (or the registry named), at a tag or digest."""
    ref = Reference(client if isinstance(client, str) else client.registry, repository)
    return ref if tag_or_digest is None else ref.at(tag_or_digest)


def opener(data: bytes, calls: list[int] | None = None) -> Callable[[int], io.BytesIO]:
    """An ``open_at(offset)`` over ``data`` for uploads; records the offsets asked for."""

    def open_at(offset: int) -> io.BytesIO:
        if calls is not None:
            calls.append(offset)
        f = io.BytesIO(data)
        f.seek(offset)
        return f

    return open_at


def independent_apple_lz4_decode(data: bytes) -> bytes:
    """Decode an Apple LZ4 stream straight from FORMAT.md §1 (``bv41`` blocks using the
    previous block as dictionary, ``bv4-`` stored blocks, ``bv4$`` end), not barge's decoder."""
    out = bytearray()
    prev = b""
    pos = 0
    for _ in range(len(data)):  # bounded: every block consumes at least 4 bytes
        marker = data[pos : pos + 4]
        pos += 4
        if marker == b"bv41":
            usize, csize = struct.unpack_from("<II", data, pos)
            pos += 8
            block = lz4.block.decompress(
                data[pos : pos + csize], uncompressed_size=usize, dict=prev
            )
            assert len(block) == usize
            pos += csize
        elif marker == b"bv4-":
            (usize,) = struct.unpack_from("<I", data, pos)
            pos += 4
            block = data[pos : pos + usize]
            assert len(block) == usize
            pos += usize
        elif marker == b"bv4$":
            assert pos == len(data), "data after the end marker"
            return bytes(out)
        else:
            raise AssertionError(f"unknown marker {marker!r} at {pos - 4}")
        out += block
        prev = block
    raise AssertionError("no end marker")


def spawn(*args: str, home: Path) -> subprocess.Popen[str]:
    """``barge ARGS`` as a child process with ``$BARGE_HOME`` = ``home`` (stdout/stderr piped)."""
    env = dict(os.environ, BARGE_HOME=str(home))
    return subprocess.Popen(
        [sys.executable, "-m", "barge", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``barge ARGS`` as a child process, to its end."""
    env = dict(os.environ, BARGE_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "barge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(cond: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    """Poll ``cond`` every 10 ms; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.01)


def skopeo_digest(ref: str) -> str:
    """The digest of the manifest skopeo reads at ``ref`` (a registry without TLS)."""
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()
