"""The streamed upload source hands out the blob's bytes from any offset it is moved to (a
resumed or retried upload continues there) and always hashes exactly the blob: generated
cases of piece boundaries and seeks, compared with the bytes themselves."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from barge.oci.retry import Budget, RetryPolicy
from barge.oci.settings import HostSettings
from barge.oci.upload_sources import Produced, Progress
from clitest import sha

# take n bytes; seek to n; step back n bytes (a retry of the piece just sent, or part of it);
# stream the rest
ops = st.lists(
    st.tuples(st.sampled_from(["take", "seek", "back", "stream"]), st.integers(0, 3000)),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
# two steps back within the piece just taken (found by this test)
@example(data=b"\0\0", cuts=[], steps=[("take", 2), ("seek", 1), ("seek", 0)])
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    steps=ops,
)
def test_produced_source_matches_the_blob(data: bytes, cuts: list[int], steps: list) -> None:  # type: ignore[type-arg]
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] + [b""]
    produced = [0]

    def produce() -> list[bytes]:
        produced[0] += 1
        return list(pieces)

    budget = Budget(RetryPolicy(), HostSettings(), registry="r", what="w")
    src = Produced(produce)
    for op, n in steps:
        start = src.position
        if op == "take":
            assert src.take(n) == data[start : start + n]
        elif op in ("seek", "back"):
            off = min(n, len(data)) if op == "seek" else max(0, start - n % 400)
            src.seek(off)
            assert src.position == off
        else:
            assert b"".join(src.pieces(Progress(None, budget))) == data[start:]
    start = src.position
    assert src.take(len(data) + 1) == data[start:]
    assert src.take(1) == b""
    assert src.size == len(data)
    assert src.digest() == sha(data)
    assert produced[0] <= 1 + sum(op in ("seek", "back") for op, _ in steps)
