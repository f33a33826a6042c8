"""Chunk sizing against registry layer limits, and per-registry upload defaults.

The chunk size is chosen once per push, before any byte is uploaded: the default, or the
smallest multiple of the frame size that keeps the image within the registry's layer cap.
The layer count is the worst case ``ceil(size / chunk)`` per disk: which chunks are all zeros
(and so omitted) is only known after hashing, and the decision must come first.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from barge.errors import LimitError, UsageError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_MAX_CHUNK_SIZE",
    "SizingDecision",
    "choose_chunk_size",
    "count_layers",
    "default_upload_chunk_size",
    "format_size",
    "known_layer_limit",
]

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_FRAME_SIZE = 4 * MiB
DEFAULT_CHUNK_SIZE = 512 * MiB
# The largest chunk barge raises to on its own. Registries cap single blobs (ECR: 52,000 MiB),
# and a big layer is a long upload that a flaky network restarts from its beginning.
DEFAULT_MAX_CHUNK_SIZE = 8 * GiB

# Layer caps by registry host (fnmatch patterns, checked in order; first match wins).
# ECR: its 2016 "Service Limits" page stated "Maximum number of layers per image: 127 (this is
# the current Docker limit)"; today's quotas page lists no per-image layer quota. barge keeps
# the conservative documented 127 until a larger cap is confirmed on a real ECR push.
_LAYER_LIMITS: tuple[tuple[str, int], ...] = (
    ("*.dkr.ecr.*.amazonaws.com", 127),
    ("*.dkr.ecr.*.amazonaws.com.cn", 127),
    ("*.dkr-ecr.*.on.aws", 127),
)

# PATCH body size by registry host; None = monolithic POST + PUT (fastest where accepted).
# ghcr.io rejects chunked-upload PATCH bodies over 4 MiB. ECR's parts are 5..10 MiB (all but
# the last), so 10 MiB. Google Artifact Registry / gcr.io: monolithic only.
_UPLOAD_CHUNK: tuple[tuple[str, int | None], ...] = (
    ("ghcr.io", 4 * MiB),
    ("*.dkr.ecr.*.amazonaws.com", 10 * MiB),
    ("*.dkr.ecr.*.amazonaws.com.cn", 10 * MiB),
    ("*.dkr-ecr.*.on.aws", 10 * MiB),
    ("*-docker.pkg.dev", None),
    ("gcr.io", None),
    ("*.gcr.io", None),
)


@dataclass(frozen=True, slots=True)
class SizingDecision:
    chunk_size: int
    layers: int  # worst-case number of disk layers at chunk_size
    reason: str | None  # one line when the default was raised, else None


def format_size(n: int) -> str:
    """``512 MiB``, ``1.5 GiB``: a compact binary size for messages."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}".replace(".00", "")
    return f"{n} B"


def count_layers(disk_sizes: Mapping[str, int], chunk_size: int) -> int:
    """Worst-case number of disk layers: ``ceil(size / chunk_size)`` per disk."""
    return sum(-(-size // chunk_size) for size in disk_sizes.values())


def choose_chunk_size(
    disk_sizes: Mapping[str, int],
    *,
    default_chunk: int = DEFAULT_CHUNK_SIZE,
    frame_size: int = DEFAULT_FRAME_SIZE,
    max_layers: int | None = None,
    other_layers: int = 0,
    max_chunk: int = DEFAULT_MAX_CHUNK_SIZE,
) -> SizingDecision:
    """The chunk size for one push.

    ``default_chunk`` unless the worst-case layer count would exceed ``max_layers -
    other_layers`` (the non-disk layers: config, index, nvram...); then the smallest multiple
    of ``frame_size`` that fits. Raises :class:`LimitError` when even ``max_chunk`` does not.
    """
    if frame_size <= 0 or default_chunk <= 0 or default_chunk % frame_size:
        raise UsageError(
            f"chunk size {default_chunk} must be a positive multiple of the frame size {frame_size}"
        )
    max_chunk = max(max_chunk - max_chunk % frame_size, default_chunk)
    layers = count_layers(disk_sizes, default_chunk)
    if max_layers is None:
        return SizingDecision(default_chunk, layers, None)
    budget = max_layers - other_layers
    if layers <= budget:
        return SizingDecision(default_chunk, layers, None)
    at_max = count_layers(disk_sizes, max_chunk)
    if budget <= 0 or at_max > budget:
        raise LimitError(
            f"the disks need {at_max} layer{'s' if at_max != 1 else ''} even at the largest chunk size "
            f"{format_size(max_chunk)}, but the registry allows {max_layers} layers "
            f"({other_layers} taken by config and metadata)",
            hint="allow a larger chunk size, use fewer or smaller disks, or another registry",
        )
    lo, hi = default_chunk // frame_size + 1, max_chunk // frame_size
    while lo < hi:  # smallest k with count_layers(k * frame_size) <= budget
        mid = (lo + hi) // 2
        if count_layers(disk_sizes, mid * frame_size) <= budget:
            hi = mid
        else:
            lo = mid + 1
    chunk = lo * frame_size
    fitted = count_layers(disk_sizes, chunk)
    reason = (
        f"chunk size raised from {format_size(default_chunk)} to {format_size(chunk)}: "
        f"{layers} disk layers would exceed the registry's cap of {max_layers} layers "
        f"({other_layers} non-disk); now {fitted}"
    )
    return SizingDecision(chunk, fitted, reason)


def _host_only(registry_host: str) -> str:
    h = registry_host.strip().lower()
    if h.startswith("["):  # [::1]:5000
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def known_layer_limit(registry_host: str) -> int | None:
    """The number of layers a registry accepts per manifest, when barge knows it."""
    host = _host_only(registry_host)
    for pattern, limit in _LAYER_LIMITS:
        if fnmatch.fnmatchcase(host, pattern):
            return limit
    return None


def default_upload_chunk_size(registry_host: str) -> int | None:
    """PATCH body size for uploads to this registry; None = monolithic POST + PUT."""
    host = _host_only(registry_host)
    for pattern, size in _UPLOAD_CHUNK:
        if fnmatch.fnmatchcase(host, pattern):
            return size
    return None
