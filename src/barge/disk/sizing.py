"""Chunk sizing against a registry's layer limit: the arithmetic.

What each registry accepts (its layer cap, its PATCH size) is registry knowledge, kept with
the registry client (:mod:`barge.oci.settings`); this module only chooses a chunk size
given a cap.

The chunk size is chosen once per push, before any byte is uploaded: the default, or the
smallest multiple of the frame size that keeps the image within the registry's layer cap.
The layer count is the worst case ``ceil(size / chunk)`` per disk: which chunks are all zeros
(and so omitted) is only known after hashing, and the decision must come first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from barge.errors import LimitError, UsageError
from barge.units import format_size

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_MAX_CHUNK_SIZE",
    "SizingDecision",
    "choose_chunk_size",
    "count_layers",
]

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_FRAME_SIZE = 4 * MiB
DEFAULT_CHUNK_SIZE = 512 * MiB
# The largest chunk barge raises to on its own. Registries cap single blobs (ECR: 52,000 MiB),
# and a big layer is a long upload that a flaky network restarts from its beginning.
DEFAULT_MAX_CHUNK_SIZE = 8 * GiB


@dataclass(frozen=True, slots=True)
class SizingDecision:
    chunk_size: int
    layers: int  # worst-case number of disk layers at chunk_size
    reason: str | None  # one line when the default was raised, else None


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
