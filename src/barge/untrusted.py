"""Untrusted content in and out: the one JSON reader for anything an image, a registry or a
layout supplies, and the one escaper for anything printed from it.

:func:`load_json` bounds the size and the nesting depth of a document *before* Python's
recursive decoder sees it (a ``[[[[…`` of 100 000 levels raises ``RecursionError`` inside
``json.loads``, and a document of 990 levels that parses would raise it later, in whatever walks
or re-serialises it), and turns every way of being malformed into :class:`JSONError`, an
:class:`~barge.errors.IntegrityError` (exit 6) that is also a ``ValueError`` for callers that
treat a bad document as one more malformed input.

:func:`printable` makes a string safe to print on one terminal line: control characters (C0,
DEL, C1; so CR, LF, ESC and tab), lone surrogates (which cannot be encoded to UTF-8 and would
crash the write half-way), Unicode line and paragraph separators and bidirectional overrides
become visible ``\\x..``/``\\u....`` escapes. Everything else, non-ASCII letters included, is
kept as is.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import accumulate
from typing import Any

from barge.errors import IntegrityError

#: Deepest nesting accepted in a JSON document. OCI manifests, indexes and configs, barge's VM
#: config and frame index, Tart's and Vetu's configs all stay under 8.
MAX_JSON_DEPTH = 64
#: Largest JSON document accepted unless a caller says otherwise.
MAX_JSON_SIZE = 16 << 20

# A JSON string: the scan below removes them before counting brackets (a "[" inside a string
# is not nesting). Unrolled so that the regex engine does not backtrack.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTA = [0] * 256
_DELTA[ord("[")] = _DELTA[ord("{")] = 1
_DELTA[ord("]")] = _DELTA[ord("}")] = -1

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_SIZE", "JSONError", "load_json", "printable", "shown"]


class JSONError(IntegrityError, ValueError):
    """A JSON document that is malformed, too large or nested too deeply."""


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings not counted. Exact
    for valid JSON; for invalid JSON it is at least the depth a decoder reaches before it
    stops at the first error (both read strings the same way up to that point)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(0, max(accumulate(map(_DELTA.__getitem__, brackets)), default=0))


def load_json(
    data: bytes | str,
    what: str,
    *,
    max_size: int = MAX_JSON_SIZE,
    max_depth: int = MAX_JSON_DEPTH,
    **hooks: Any,
) -> Any:
    """Parse an untrusted JSON document (``hooks`` go to :func:`json.loads`).

    Raises :class:`JSONError` naming ``what`` when it is over ``max_size`` bytes, nested deeper
    than ``max_depth``, not UTF-8, or not JSON; a hook's own :class:`IntegrityError` passes
    through unchanged."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_size:
        raise JSONError(f"{what} is {len(raw)} bytes, over the {max_size} byte limit")
    depth = json_depth(raw)
    if depth > max_depth:
        raise JSONError(f"{what} is nested {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(raw, **hooks)
    except JSONError:
        raise
    except IntegrityError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise JSONError(f"{what} is not valid JSON: {printable(str(e))}") from None


# -- output ------------------------------------------------------------------------------------

#: Characters that move the cursor, end a line, or reorder what a terminal shows.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _unsafe(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


# fast path: most text has none of these (every code point the checks above can flag is in it)
_SUSPECT = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def printable(text: str) -> str:
    """``text`` with every character that could forge or break a terminal line escaped."""
    if not _SUSPECT.search(text):
        return text
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)


def shown(value: Any) -> Any:
    """:func:`printable` applied to every string (keys included) in a JSON-like value."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {shown(k): shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown(v) for v in value]
    return value
