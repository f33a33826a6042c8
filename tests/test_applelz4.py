"""Apple LZ4 streams: Apple's own vectors, round trips through an independent reader, hostile
streams."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import struct
import tracemalloc
from pathlib import Path

import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from barge.disk import applelz4
from barge.disk.applelz4 import AppleLZ4Decoder, AppleLZ4Encoder
from barge.errors import IntegrityError
from clitest import independent_apple_lz4_decode

VECTORS = Path(__file__).parent / "testdata" / "apple-lz4"
NAMES = ["hello-world.txt", "pg2554.txt"]


def vector(name: str) -> tuple[bytes, bytes]:
    return (VECTORS / name).read_bytes(), (VECTORS / f"{name}.lz4").read_bytes()


class Dribble(io.RawIOBase):
    """A reader that returns at most a few bytes per read(), like a slow socket."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self._buf = io.BytesIO(data)
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        k = self._rng.randint(1, 7)
        return self._buf.read(k if n < 0 else min(n, k))


# ---------------------------------------------------------------------------------------------
# Apple's vectors


@pytest.mark.parametrize("name", NAMES)
def test_apple_vectors_decode_exactly(name: str) -> None:
    plain, stream = vector(name)
    out = hashlib.sha256()
    n = AppleLZ4Decoder().decode_into(io.BytesIO(stream), out.update, expected_size=len(plain))
    assert n == len(plain)
    assert out.hexdigest() == hashlib.sha256(plain).hexdigest()


def test_apple_vector_uses_dictionary_and_64k_blocks() -> None:
    """The big vector has 64 KiB bv41 blocks that reference the previous block: a decoder
    without dictionary support fails on the second block."""
    plain, stream = vector("pg2554.txt")
    usize, csize = struct.unpack_from("<II", stream, 4)
    assert stream[:4] == b"bv41" and usize == 64 * 1024
    second = 12 + csize
    assert stream[second : second + 4] == b"bv41"
    u2, c2 = struct.unpack_from("<II", stream, second + 4)
    with pytest.raises(lz4.block.LZ4BlockError):
        lz4.block.decompress(stream[second + 12 : second + 12 + c2], uncompressed_size=u2)
    assert independent_apple_lz4_decode(stream) == plain


@pytest.mark.parametrize("name", NAMES)
def test_apple_vectors_decode_from_short_reads(name: str) -> None:
    plain, stream = vector(name)
    assert b"".join(applelz4.decode_stream(Dribble(stream))) == plain  # type: ignore[arg-type]


def test_decoder_blocks_are_bounded() -> None:
    plain, stream = vector("pg2554.txt")
    sizes = [len(b) for b in applelz4.decode_stream(io.BytesIO(stream))]
    assert max(sizes) <= 64 * 1024 and sum(sizes) == len(plain)


# ---------------------------------------------------------------------------------------------
# Encoder


def test_encode_empty() -> None:
    assert applelz4.encode(b"") == b"bv4$"
    assert applelz4.decode(b"bv4$") == b""


@pytest.mark.parametrize("name", NAMES)
def test_encode_vectors_round_trip(name: str) -> None:
    plain, _ = vector(name)
    enc = applelz4.encode(plain)
    assert applelz4.decode(enc, expected_size=len(plain)) == plain
    assert independent_apple_lz4_decode(enc) == plain


def test_encoder_emits_stored_blocks_for_random_data_and_64k_blocks() -> None:
    data = os.urandom(3 * 65536 + 5) + bytes(200_000)
    enc = applelz4.encode(data)
    assert enc.startswith(b"bv4-") and struct.unpack_from("<I", enc, 4)[0] == 65536
    assert b"bv41" in enc  # the zero part compresses
    assert independent_apple_lz4_decode(enc) == data


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=3000),
            st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 30000)),
        ),
        max_size=12,
    ),
    st.lists(st.integers(1, 100_000), min_size=1, max_size=5),
)
def test_streaming_encoder_round_trip(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    enc = AppleLZ4Encoder()
    out = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out.append(enc.write(data[pos : pos + step]))
        pos += step
        i += 1
    out.append(enc.finish())
    stream = b"".join(out)
    assert stream == applelz4.encode(data)  # chunking does not change the output
    assert independent_apple_lz4_decode(stream) == data
    assert applelz4.decode(stream, expected_size=len(data)) == data


def test_encode_into_with_limit() -> None:
    data = bytes(range(256)) * 1000
    src = io.BytesIO(data)
    out = io.BytesIO()
    n_in, n_out = applelz4.encode_into(src, out.write, limit=100_000)
    assert n_in == 100_000 and n_out == len(out.getvalue())
    assert applelz4.decode(out.getvalue()) == data[:100_000]
    assert src.tell() == 100_000


def test_encoder_misuse() -> None:
    enc = AppleLZ4Encoder()
    enc.finish()
    with pytest.raises(ValueError):
        enc.write(b"x")
    with pytest.raises(ValueError):
        enc.finish()


# ---------------------------------------------------------------------------------------------
# Hostile streams


def expect_error(stream: bytes, match: str, **kw: object) -> IntegrityError:
    with pytest.raises(IntegrityError, match=match) as info:
        applelz4.decode(stream, **kw)  # type: ignore[arg-type]
    return info.value


def test_truncated_at_every_position_small_vector() -> None:
    _, stream = vector("hello-world.txt")
    for cut in range(len(stream)):
        with pytest.raises(IntegrityError, match="truncated|empty"):
            applelz4.decode(stream[:cut])


def test_truncated_big_vector_sampled() -> None:
    _, stream = vector("pg2554.txt")
    rng = random.Random(1)
    cuts = {0, 1, 3, 4, 11, 12, 13, len(stream) - 4, len(stream) - 1}
    cuts |= {rng.randrange(len(stream)) for _ in range(40)}
    for cut in sorted(cuts):
        with pytest.raises(IntegrityError, match="truncated|empty"):
            for _ in applelz4.decode_stream(io.BytesIO(stream[:cut])):
                pass


def test_error_messages_name_offset() -> None:
    _, stream = vector("hello-world.txt")
    err = expect_error(stream[:-4], "truncated")
    assert "offset 22" in str(err) and "bv4$" in str(err)
    err = expect_error(stream[:10], "truncated")
    assert "offset 10" in str(err) and "14 bytes" in str(err)


def test_missing_end_marker() -> None:
    plain, stream = vector("pg2554.txt")
    err = expect_error(stream[:-4], "truncated")
    assert f"after {len(plain)} decoded bytes" in str(err)


def test_trailing_garbage() -> None:
    _, stream = vector("hello-world.txt")
    err = expect_error(stream + b"x", "trailing data")
    assert "offset 26" in str(err)
    expect_error(stream + b"bv4$", "trailing data")


def test_unknown_marker() -> None:
    _, stream = vector("hello-world.txt")
    err = expect_error(b"bvx2" + stream[4:], "unknown block marker")
    assert "offset 0" in str(err)
    expect_error(stream[:22] + b"bv4!", "unknown block marker")
    expect_error(b"\x04\x22\x4d\x18" + b"\0" * 20, "unknown block marker")  # an LZ4 frame


def test_empty_stream() -> None:
    expect_error(b"", "empty")


def test_expected_size_mismatch() -> None:
    plain, stream = vector("pg2554.txt")
    expect_error(stream, "expected 1201730", expected_size=len(plain) + 1)
    err = expect_error(stream, "more than the expected", expected_size=100_000)
    # detected at the second block, before it is decoded
    assert "would end at 131072" in str(err)


def _bv41(usize: int, payload: bytes) -> bytes:
    return b"bv41" + struct.pack("<II", usize, len(payload)) + payload


def test_wrong_block_sizes() -> None:
    block = b"abc" * 5000
    comp = lz4.block.compress(block, store_size=False)
    good = _bv41(len(block), comp) + b"bv4$"
    assert applelz4.decode(good) == block
    expect_error(
        _bv41(len(block) + 1, comp) + b"bv4$", "decoded to 15000 bytes; its header says 15001"
    )
    expect_error(_bv41(len(block) - 1, comp) + b"bv4$", "corrupt")
    # compressed size larger than the data: the end marker is swallowed into the block
    expect_error(
        b"bv41" + struct.pack("<II", len(block), len(comp) + 4) + comp + b"bv4$", "corrupt"
    )
    expect_error(
        b"bv41" + struct.pack("<II", len(block), len(comp) + 5) + comp + b"bv4$", "truncated"
    )
    # compressed size smaller: corrupt block
    expect_error(
        b"bv41" + struct.pack("<II", len(block), len(comp) - 1) + comp + b"bv4$", "corrupt"
    )
    expect_error(_bv41(0, b"") + b"bv4$", "claims 0 uncompressed bytes")
    expect_error(b"bv41" + struct.pack("<II", 10, 0) + b"bv4$", "claims 0 compressed bytes")
    expect_error(
        b"bv41" + struct.pack("<II", 10, 100) + b"x" * 100 + b"bv4$", "claims 100 compressed"
    )
    expect_error(b"bv4-" + struct.pack("<I", 10) + b"abc", "truncated")


@pytest.mark.parametrize(
    "stream",
    [
        b"bv41" + struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF) + b"\0" * 16,
        b"bv41" + struct.pack("<II", 65536, 0xFFFFFFFF) + b"\0" * 16,
        b"bv4-" + struct.pack("<I", 0xFFFFFFFF) + b"\0" * 16,
        b"bv4-" + struct.pack("<I", 4 * 1024 * 1024 + 1) + b"\0" * 16,
    ],
)
def test_huge_claims_fail_without_allocating(stream: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="claims"):
            applelz4.decode(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_max_block_is_configurable() -> None:
    data = b"z" * 100_000
    stream = b"bv4-" + struct.pack("<I", len(data)) + data + b"bv4$"
    assert applelz4.decode(stream) == data
    with pytest.raises(IntegrityError, match="expected at most 65536"):
        applelz4.decode(stream, max_block=65536)
    with pytest.raises(ValueError):
        AppleLZ4Decoder(max_block=0)


def test_dictionary_spans_stored_blocks() -> None:
    """A bv41 block may reference bytes of a preceding bv4- block (they become dictionary)."""
    stored = os.urandom(1000)
    tail = stored * 3
    comp = lz4.block.compress(tail, store_size=False, dict=stored)
    stream = b"bv4-" + struct.pack("<I", len(stored)) + stored + _bv41(len(tail), comp) + b"bv4$"
    assert applelz4.decode(stream) == stored + tail
    assert independent_apple_lz4_decode(stream) == stored + tail


def test_corrupt_payload_bytes_never_crash() -> None:
    _, stream = vector("pg2554.txt")
    rng = random.Random(7)
    head = stream[: 12 + struct.unpack_from("<II", stream, 4)[1]] + b"bv4$"
    for _ in range(200):
        bad = bytearray(head)
        i = rng.randrange(len(bad))
        bad[i] ^= 1 << rng.randrange(8)
        with contextlib.suppress(IntegrityError):
            applelz4.decode(bytes(bad))
