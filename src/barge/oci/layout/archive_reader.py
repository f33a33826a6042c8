"""Reading an OCI archive (``oci-archive:FILE``) in place, without unpacking it: members are
indexed once; every blob stream has its own file handle, so blobs can be read in parallel.
Member names are normalised and never become paths.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, cast

from barge.errors import (
    IntegrityError,
    NotFoundError,
)
from barge.oci.layout.common import (
    INDEX_FILE,
    MAX_INDEX_SIZE,
    OCI_LAYOUT_FILE,
    LayoutReader,
    blob_relpath,
    check_oci_layout,
)


def _member_name(name: str, where: str) -> str:
    """Normalise a tar member name; refuse absolute paths and '..'."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise IntegrityError(f"{where}: refusing tar member {json.dumps(name[:200])}")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if any(p == ".." for p in parts):
        raise IntegrityError(f"{where}: refusing tar member {json.dumps(name[:200])}")
    return "/".join(parts)


class _MemberStream(io.RawIOBase):
    """``size`` bytes of an underlying stream (one tar member), with its own file handle."""

    def __init__(self, f: IO[bytes], size: int, also_close: Any = None) -> None:
        super().__init__()
        self._f = f
        self._left = size
        self._also = also_close

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left <= 0:
            return 0
        mv = memoryview(b).cast("B")[: self._left]
        n = self._f.readinto(mv)  # type: ignore[attr-defined]
        n = int(n or 0)
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            if self._also is not None:
                self._also.close()
        super().close()


class OCIArchiveReader(LayoutReader):
    """Read an OCI layout from a tar archive (``oci-archive:FILE``), uncompressed or
    gzip/bzip2/xz compressed. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115
        except FileNotFoundError:
            raise NotFoundError(f"no such archive: {self.path}") from None
        except tarfile.TarError as e:
            raise IntegrityError(f"{self.path} is not a tar archive ({e})") from None
        try:
            self._members: dict[str, tarfile.TarInfo] = {}
            for m in self._tar.getmembers():
                name = _member_name(m.name, self.location)
                if m.isdir() or not name:
                    continue
                if name in self._members:
                    raise IntegrityError(f"{self.location}: tar member {name} appears twice")
                self._members[name] = m
            layout = self._small_member(OCI_LAYOUT_FILE, 4096)
            if layout is None:
                raise NotFoundError(f"{self.location} is not an OCI layout archive (no oci-layout)")
            check_oci_layout(layout, self.location)
        except BaseException:
            self._tar.close()
            raise

    @property
    def location(self) -> str:
        return f"oci-archive:{self.path}"

    def _small_member(self, name: str, limit: int) -> bytes | None:
        m = self._members.get(name)
        if m is None:
            return None
        if not m.isreg():
            raise IntegrityError(f"{self.location}: {name} is not a regular file")
        if m.size > limit:
            raise IntegrityError(f"{self.location}: {name} is larger than {limit} bytes")
        f = self._tar.extractfile(m)
        assert f is not None
        with f:
            return f.read(limit + 1)

    def _read_index(self) -> bytes:
        data = self._small_member(INDEX_FILE, MAX_INDEX_SIZE)
        if data is None:
            raise IntegrityError(f"{self.location}: index.json is missing")
        return data

    def _blob_size(self, digest: str) -> int | None:
        m = self._members.get(blob_relpath(digest))
        if m is None or not m.isreg():
            return None
        return m.size

    def _open_raw(self, digest: str) -> IO[bytes]:
        """A stream of one blob, independent of every other open stream, so that several
        threads can read blobs at once (one shared tar file object would interleave their
        seeks). An uncompressed archive gets its own file handle positioned at the member's
        data; a compressed one its own tarfile."""
        m = self._members.get(blob_relpath(digest))
        if m is None:
            raise NotFoundError(f"blob {digest} is not in {self.location}")
        if not m.isreg():
            raise IntegrityError(f"blob {digest} in {self.location} is not a regular file")
        if (
            self._tar.mode == "r"
            and not m.issparse()
            and isinstance(getattr(self._tar, "fileobj", None), io.BufferedReader)
        ):
            raw = open(self.path, "rb")  # noqa: SIM115 - closed by the returned stream
            raw.seek(m.offset_data)
            return cast(IO[bytes], _MemberStream(raw, m.size))
        tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115 - closed with the stream
        f = tar.extractfile(m.name)
        if f is None:
            tar.close()
            raise IntegrityError(f"blob {digest} in {self.location} cannot be read")
        return cast(IO[bytes], _MemberStream(f, m.size, also_close=tar))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> OCIArchiveReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
