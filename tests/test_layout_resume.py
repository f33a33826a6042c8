"""A blob write into an OCI layout that is killed part-way resumes, and leaves nothing behind.

A killed ``barge copy`` (or push) into ``oci:DIR`` left each blob it was writing as a
``.tmp-XXXX.partial`` file under a random name: never removed, never reused, so every kill
leaked up to a chunk per worker into the layout, and the next run copied those blobs from the
start. A partial blob now has one name per digest: the next writer of that blob takes it over
(under a lock), re-hashes what it holds, fetches only the rest, and starts over if the bytes
kept do not verify.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from barge.errors import IntegrityError
from barge.oci.layout import OCILayout
from barge.oci.types import Descriptor
from barge.transfer.layout import LayoutEnd
from clitest import opener

MiB = 1 << 20
DATA = os.urandom(5 * MiB + 123)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
BLOB = Descriptor("application/octet-stream", DIGEST, len(DATA))

KILLED_WRITER = """
import os, signal, sys
from barge.oci.layout import OCILayout

data = open(sys.argv[2], "rb").read()
cut = int(sys.argv[3])

class Dying:
    def __init__(self):
        self.pos = 0
    def read(self, n=-1):
        if self.pos >= cut:  # what a SIGKILL part-way through the blob leaves
            os.kill(os.getpid(), signal.SIGKILL)
        n = min(n, cut - self.pos)
        out = data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

OCILayout(sys.argv[1], create=True).write_blob(sys.argv[4], len(data), Dying())
"""


def _killed_write(tmp_path: Path, layout: Path, cut: int) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(DATA)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(layout), str(src), str(cut), DIGEST],
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL


def _strays(layout: Path) -> list[str]:
    """Files in the blob directory that are not blobs."""
    return sorted(p.name for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith("."))


def test_a_killed_blob_write_resumes_where_it_stopped_and_leaves_no_file(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    cut = 3 * MiB + 17
    _killed_write(tmp_path, layout, cut)
    offsets: list[int] = []
    end = LayoutEnd(layout, create=True)
    end.put_blob(BLOB, opener(DATA, offsets), None)
    assert offsets == [cut]  # only the rest was read from the source
    assert (layout / "blobs" / "sha256" / DIGEST[7:]).read_bytes() == DATA
    assert _strays(layout) == []


def test_a_blob_killed_once_all_of_it_was_written_is_not_read_again(tmp_path: Path) -> None:
    """Killed after the last byte, before the rename: asking the source for the bytes from
    its end on would be a Range no registry satisfies (HTTP 416, a copy that never ends)."""
    layout = tmp_path / "layout"
    _killed_write(tmp_path, layout, len(DATA))
    offsets: list[int] = []
    LayoutEnd(layout).put_blob(BLOB, opener(DATA, offsets), None)
    assert offsets == []
    assert (layout / "blobs" / "sha256" / DIGEST[7:]).read_bytes() == DATA
    assert _strays(layout) == []


def test_kept_bytes_that_do_not_verify_are_written_again(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    cut = 2 * MiB
    _killed_write(tmp_path, layout, cut)
    (partial,) = [p for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    with open(partial, "r+b") as f:  # the kept bytes were damaged meanwhile
        f.seek(MiB)
        f.write(b"\xff")
    offsets: list[int] = []
    LayoutEnd(layout).put_blob(BLOB, opener(DATA, offsets), None)
    assert offsets == [cut, 0]
    assert (layout / "blobs" / "sha256" / DIGEST[7:]).read_bytes() == DATA
    assert _strays(layout) == []


def test_a_wrong_source_still_leaves_nothing(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "layout", create=True)
    with pytest.raises(IntegrityError):
        lay.write_blob(DIGEST, len(DATA), io.BytesIO(DATA[:-1] + b"x"))
    assert _strays(tmp_path / "layout") == []
    assert lay.has_blob(DIGEST) is None


def test_two_writers_of_one_blob_write_it_once(tmp_path: Path) -> None:
    path = tmp_path / "layout"
    OCILayout(path, create=True)
    reads = [0, 0]
    gate = threading.Event()

    class Slow(io.BytesIO):
        def __init__(self, k: int) -> None:
            super().__init__(DATA)
            self.k = k

        def read(self, n: int | None = -1) -> bytes:
            gate.wait(10)
            out = super().read(n)
            reads[self.k] += len(out)
            return out

    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            OCILayout(path).write_blob(DIGEST, len(DATA), Slow(k))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(reads) == [0, len(DATA)]  # one wrote it, the other found it written
    assert (path / "blobs" / "sha256" / DIGEST[7:]).read_bytes() == DATA
    assert _strays(path) == []
