"""Chunk sizing against layer caps (the registries' caps themselves: test_oci_settings)."""

from __future__ import annotations

import pytest

from barge.disk.sizing import (
    choose_chunk_size,
    count_layers,
)
from barge.errors import LimitError, UsageError
from barge.units import format_size

MiB = 1 << 20
GiB = 1 << 30
FS = 4 * MiB


def test_default_fits() -> None:
    d = choose_chunk_size({"root": 20 * GiB}, max_layers=127, other_layers=3)
    assert (d.chunk_size, d.layers, d.reason) == (512 * MiB, 40, None)
    d = choose_chunk_size({"root": 20 * GiB})  # no cap known
    assert d.reason is None and d.layers == 40


def test_raised_to_smallest_fit() -> None:
    disks = {"root": 100 * GiB, "data": 30 * GiB + 1}
    d = choose_chunk_size(disks, max_layers=127, other_layers=3)
    assert d.chunk_size % FS == 0 and d.chunk_size > 512 * MiB
    assert d.layers == count_layers(disks, d.chunk_size) <= 124
    assert count_layers(disks, d.chunk_size - FS) > 124  # smallest that fits
    assert d.reason is not None and "512 MiB" in d.reason and "127" in d.reason
    assert "\n" not in d.reason


def test_exact_boundary() -> None:
    # 124 chunks of 512 MiB exactly fit 127 - 3
    d = choose_chunk_size({"root": 124 * 512 * MiB}, max_layers=127, other_layers=3)
    assert d.chunk_size == 512 * MiB and d.layers == 124
    d = choose_chunk_size({"root": 124 * 512 * MiB + 1}, max_layers=127, other_layers=3)
    assert d.chunk_size == 512 * MiB + FS and d.layers == 124


def test_impossible_cap() -> None:
    with pytest.raises(LimitError) as ei:
        choose_chunk_size({"root": 2048 * GiB}, max_layers=20, other_layers=3, max_chunk=8 * GiB)
    msg = str(ei.value)
    assert "256 layers" in msg and "8 GiB" in msg and "20" in msg
    with pytest.raises(LimitError):
        choose_chunk_size({"a": 1, "b": 1}, max_layers=3, other_layers=3)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        choose_chunk_size({"a": 1}, default_chunk=FS + 1)


def test_format_size() -> None:
    """The one size formatter (barge.units) as the sizing messages use it."""
    assert format_size(512 * MiB) == "512 MiB"
    assert format_size(3 * GiB // 2) == "1.5 GiB"
    assert format_size(10) == "10 B"
