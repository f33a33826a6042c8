"""barge.disk.codec: parsing, round trips, corrupt frames, thread safety."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import zstandard

from barge.disk.codec import DEFAULT_ZSTD_LEVEL, Codec, parse_codec
from barge.disk.decoder import decode_frame
from barge.disk.index import FrameInfo
from barge.errors import IntegrityError, UsageError

SPECS = ["zstd", "zstd:1", "zstd:3", "lz4", "none"]


def sample(n: int = 1 << 20) -> bytes:
    return (os.urandom(n // 4) + b"barge " * (n // 8))[:n].ljust(n, b"\0")


@pytest.mark.parametrize(
    ("spec", "name", "level", "suffix"),
    [
        ("zstd", "zstd", 1, "+zstd"),
        ("zstd:3", "zstd", 3, "+zstd"),
        ("zstd:1", "zstd", 1, "+zstd"),
        ("ZSTD:19", "zstd", 19, "+zstd"),
        ("lz4", "lz4", 0, "+lz4"),
        ("none", "none", 0, ""),
    ],
)
def test_parse_codec(spec: str, name: str, level: int, suffix: str) -> None:
    c = parse_codec(spec)
    assert (c.name, c.level, c.media_type_suffix) == (name, level, suffix)
    assert parse_codec(c.spec) == c


@pytest.mark.parametrize(
    "spec", ["", "gzip", "zstd:", "zstd:x", "zstd:0", "zstd:22", "none:3", "lz4:99"]
)
def test_parse_codec_errors(spec: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_codec(spec)
    assert "codec" in str(ei.value) or "level" in str(ei.value)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [1, 4095, 65536, (1 << 20) + 7])
def test_round_trip(spec: str, n: int) -> None:
    c = parse_codec(spec)
    data = sample(n)
    comp = c.compress(data)
    assert len(comp) <= c.max_compressed_size(n)
    out = bytearray(n)
    assert c.decompress_into(comp, memoryview(out)) == n
    assert out == data


def test_incompressible_within_bound() -> None:
    for spec in SPECS:
        c = parse_codec(spec)
        data = os.urandom(4 << 20)
        assert len(c.compress(data)) <= c.max_compressed_size(len(data))


def test_zstd_frame_has_size_and_no_checksum() -> None:
    comp = parse_codec("zstd").compress(b"x" * 10000)
    params = zstandard.get_frame_parameters(comp)
    assert params.content_size == 10000
    assert not params.has_checksum


@pytest.mark.parametrize("spec", ["zstd", "lz4", "none"])
def test_corrupt_frames(spec: str) -> None:
    c = parse_codec(spec)
    data = sample(200_000)
    comp = c.compress(data)
    bad_inputs = {
        "truncated": comp[:-5],
        "trailing": comp + b"\0\0\0\0",
        "empty": b"",
    }
    if spec != "none":
        bad_inputs["garbage"] = os.urandom(len(comp))
    for label, bad in bad_inputs.items():
        with pytest.raises(IntegrityError):
            c.decompress_into(bad, memoryview(bytearray(len(data))))
            pytest.fail(label)
    # a frame that decodes to a different size than expected
    for size in (len(data) - 1, len(data) + 1):
        with pytest.raises(IntegrityError):
            c.decompress_into(comp, memoryview(bytearray(size)))


def test_oversized_claim_never_allocated() -> None:
    # a zstd frame header claiming 4 GiB must be refused from the header alone
    c = parse_codec("zstd")
    huge = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 1000)
    params = zstandard.get_frame_parameters(huge)
    assert params.content_size == 1000
    with pytest.raises(IntegrityError, match="claims 1000 bytes, expected 10"):
        c.decompress_into(huge, memoryview(bytearray(10)))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 100)
    with pytest.raises(IntegrityError, match="no content size"):
        c.decompress_into(no_size, memoryview(bytearray(100)))


@pytest.mark.parametrize("spec", ["zstd", "lz4", "none"])
def test_flipped_byte_detected_or_digest_catches(spec: str) -> None:
    """A frame cut short is refused. A flipped byte: the codec raises IntegrityError, or returns exactly the
    frame's length having written exactly that many bytes (never a wrong length, nothing past
    the frame, no other error). Where it returns other bytes, the decoder's check of the
    frame's sha256 refuses them (decode_frame)."""
    c = parse_codec(spec)
    data = sample(100_000)
    comp = c.compress(data)
    frame = FrameInfo(
        0, len(data), 0, len(comp), "sha256:" + hashlib.sha256(data).hexdigest(), False
    )
    guard = b"\xa5" * 64
    outcomes = {"refused": 0, "same bytes": 0, "other bytes": 0}
    for pos in range(0, len(comp), max(1, len(comp) // 50)):
        # cut there: always refused (a short frame never passes for a whole one)
        buf = bytearray(b"\x5a" * len(data) + guard)
        with pytest.raises(IntegrityError):
            c.decompress_into(comp[:pos], memoryview(buf)[: len(data)])
        assert buf[len(data) :] == guard
        bad = bytearray(comp)
        bad[pos] ^= 0x55
        try:
            n = c.decompress_into(bytes(bad), memoryview(buf)[: len(data)])
        except IntegrityError:
            outcomes["refused"] += 1
            continue
        assert n == len(data)
        assert buf[len(data) :] == guard
        if buf[: len(data)] == data:
            outcomes["same bytes"] += 1  # the flip hit a byte that does not matter
            continue
        outcomes["other bytes"] += 1
        with pytest.raises(IntegrityError, match="decodes to"):
            decode_frame(bytes(bad), frame, c)
    # both outcomes are exercised: a stored frame takes every flip as other bytes; a zstd or
    # lz4 frame refuses a flip in its header (position 0 is in the magic number) and, having
    # no content checksum, decodes most others to other bytes of the right length
    assert outcomes["other bytes"] > 0, outcomes
    assert (outcomes["refused"] > 0) == (spec != "none"), outcomes


def test_threads_share_a_codec() -> None:
    c = parse_codec("zstd:1")
    blobs = [sample(300_000) for _ in range(4)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            for _ in range(20):
                comp = c.compress(data)
                out = bytearray(len(data))
                c.decompress_into(comp, memoryview(out))
                assert out == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_codec_identity() -> None:
    assert Codec("zstd", DEFAULT_ZSTD_LEVEL) == parse_codec("zstd")
    assert hash(Codec("lz4")) == hash(parse_codec("lz4:0"))
    assert repr(parse_codec("none")) == "Codec('none')"
