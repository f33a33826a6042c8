"""Defaults every end shares: what an end cannot do is refused with one clear error."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, BinaryIO

from barge.errors import UnsupportedError
from barge.oci.types import Descriptor, Manifest
from barge.reference import Reference
from barge.transfer.end import End, OpenAt, Produce, Progress, Reuse


class EndBase:
    """An end that can do nothing yet: each end overrides what it can do."""

    label = "end"
    ref: Reference | None = None
    registry: str | None = None
    serial = False
    verifies_reads = False
    large_first = False
    layer_limit: int | None = None

    def _cannot(self, what: str) -> UnsupportedError:
        return UnsupportedError(f"{self.label} cannot {what}")

    def get_manifest(self, reference: str) -> Manifest:
        raise self._cannot("be read")

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        raise self._cannot("be read")

    def read_blob(self, digest: str, max_size: int) -> bytes:
        raise self._cannot("be read")

    def list_tags(self) -> list[str]:
        raise self._cannot("list tags")

    def seen(self, digests: list[str]) -> None:
        pass

    def reject_blob(self, digest: str, error: BaseException) -> bool:
        return False

    def begin(self, manifest: Manifest, source: End) -> bool:
        return False

    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        return None

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        raise self._cannot("store blobs")

    def put_stream(
        self,
        produce: Produce,
        progress: Progress | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        raise self._cannot("take a streamed blob")

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        raise self._cannot("store manifests")

    def put_child_manifest(self, data: bytes, media_type: str) -> str:
        return self.put_manifest(data, media_type, None)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"


class Counting(io.RawIOBase):
    """A read-only stream that reports every read to ``progress`` (and closes its source)."""

    def __init__(self, src: BinaryIO, progress: Progress | None) -> None:
        super().__init__()
        self.src = src
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.src.read(len(view))
        n = len(data)
        view[:n] = data
        if n and self.progress:
            self.progress(n)
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data and self.progress:
            self.progress(len(data))
        return data

    def close(self) -> None:
        if not self.closed:
            self.src.close()
        super().close()


def skip(f: BinaryIO, n: int) -> None:
    """Read and drop ``n`` bytes of a stream that cannot seek."""
    while n > 0:
        piece = f.read(min(n, 1 << 20))
        if not piece:
            break
        n -= len(piece)
