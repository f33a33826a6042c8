"""Hostile input is an integrity error, never an internal one (issue 10, point 6).

Property tests feed generated hostile JSON documents (deep nesting, lone surrogates, control
characters, wrong types, truncations, raw bytes) to every parser entry point of untrusted
JSON: each either returns or raises a :class:`~barge.errors.BargeError` (and, where the API
says so, a ``ValueError``), never ``RecursionError``, ``TypeError`` and the like. Then the
CLI, against a real registry and real layouts: deep documents exit 6 with one line, and
nothing an image says can forge or break a line of ``inspect``, ``list``, ``get`` or a note.
"""

from __future__ import annotations

import contextlib
import json
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from barge.cli import main
from barge.disk.index import FrameIndex
from barge.errors import BargeError, ExitCode
from barge.formats import detect_format
from barge.formats import tart as tartfmt
from barge.formats import vetu as vetufmt
from barge.image import parse_barge_manifest
from barge.oci.errors import _parse_body
from barge.oci.layout import OCILayout
from barge.oci.types import OCI_INDEX, OCI_MANIFEST, Manifest, media_type_of, sha256_digest
from barge.store import VMConfig
from barge.untrusted import MAX_JSON_DEPTH, JSONError, load_json, printable
from clitest import barge, sha
from registries import RunningRegistry
from seed import OCI_CONFIG, put_blob, put_manifest
from vmimages import push_tart, vector_chunks

# -- generated hostile documents ----------------------------------------------------------------

NASTY = [
    "\ud800", "\udfff", "a\udc80b", "\r\n", "\n", "\x1b[2J\x1b[H", "\x00", "\x7f", "\x85",
    "\u2028", "\u2029", "\u202e", "\u2066", "\t", "x" * 300, "", "latest", "sha256:" + "0" * 64,
]  # fmt: skip
hostile_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates included
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(hostile_text, kids, max_size=4),
    max_leaves=16,
)
MEDIA_TYPES = [
    OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, tartfmt.CONFIG_MEDIA_TYPE, tartfmt.DISK_V2_MEDIA_TYPE,
    tartfmt.NVRAM_MEDIA_TYPE, tartfmt.LEGACY_DISK_V1_MEDIA_TYPE, vetufmt.CONFIG_MEDIA_TYPE,
    vetufmt.KERNEL_MEDIA_TYPE, vetufmt.DISK_MEDIA_TYPE, "application/vnd.barge.disk.chunk.v1+zstd",
    "application/vnd.barge.vm.config.v1+json", "application/vnd.barge.disk.index.v1+json",
]  # fmt: skip
ANNOTATION_KEYS = [
    tartfmt.UNCOMPRESSED_SIZE_ANNOTATION, tartfmt.UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION,
    tartfmt.OFFSET_ANNOTATION, tartfmt.UNCOMPRESSED_DISK_SIZE_ANNOTATION,
    vetufmt.NAME_ANNOTATION, vetufmt.UNCOMPRESSED_SIZE_ANNOTATION,
    vetufmt.UNCOMPRESSED_DIGEST_ANNOTATION, "dev.barge.disk.name", "dev.barge.disk.offset",
    "org.opencontainers.image.ref.name",
]  # fmt: skip
digests = st.one_of(st.just(sha(b"x")), st.just(sha(b"y")), hostile_text)
annotations = st.dictionaries(
    st.sampled_from(ANNOTATION_KEYS) | hostile_text,
    st.sampled_from(["0", "1", "4096", "-1", sha(b"p")]) | hostile_text | json_values,
    max_size=4,
)
descriptors = st.one_of(
    st.fixed_dictionaries(
        {
            "mediaType": st.sampled_from(MEDIA_TYPES) | hostile_text,
            "digest": digests,
            "size": st.integers(min_value=-5, max_value=1 << 50) | json_values,
        },
        optional={
            "annotations": annotations | json_values,
            "platform": st.dictionaries(
                st.sampled_from(["os", "architecture", "variant", "os.version", "features"]),
                json_values,
            )
            | json_values,
            "urls": json_values,
        },
    ),
    json_values,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.just(2) | json_values,
        "mediaType": st.sampled_from(MEDIA_TYPES) | hostile_text,
        "config": descriptors,
        "layers": st.lists(descriptors, max_size=5) | json_values,
        "manifests": st.lists(descriptors, max_size=3) | json_values,
        "annotations": annotations | json_values,
        # VM configs (barge's, Tart's, Vetu's) share the bytes: their fields too
        "version": st.just(1) | json_values,
        "os": st.sampled_from(["linux", "darwin"]) | json_values,
        "arch": st.sampled_from(["arm64", "amd64", "aarch64"]) | json_values,
        "cpuCount": json_values,
        "memorySize": json_values,
        "macAddress": st.just("7a:65:8f:01:02:03") | json_values,
        "diskFormat": json_values,
        "disks": st.lists(st.fixed_dictionaries({"name": hostile_text, "size": json_values}))
        | json_values,
        "ecid": json_values,
        "errors": json_values,
    },
)


def nest(doc: bytes, depth: int, key: bool) -> bytes:
    if key:
        return b'{"a":' * depth + doc + b"}" * depth
    return b"[" * depth + doc + b"]" * depth


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """A document as bytes: serialised (ASCII-escaped or UTF-8), maybe nested deep at some
    point, maybe truncated, or raw bytes."""
    kind = draw(st.sampled_from(["doc", "deep", "deep-inside", "truncated", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    doc = draw(documents)
    ascii_only = draw(st.booleans())
    try:
        data = json.dumps(doc, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:  # a lone surrogate can only travel as a JSON escape
        data = json.dumps(doc).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([MAX_JSON_DEPTH + 1, 1000, 5000]))
        return nest(data, depth, draw(st.booleans()))
    if kind == "deep-inside" and data.startswith(b"{") and len(data) > 2:
        depth = draw(st.sampled_from([MAX_JSON_DEPTH + 1, 3000]))
        return b'{"x":' + nest(b"1", depth, draw(st.booleans())) + b"," + data[1:]
    if kind == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


# -- the entry points ---------------------------------------------------------------------------


def _manifest(data: bytes) -> object:
    m = Manifest(data, media_type_of(data, OCI_MANIFEST), sha256_digest(data))
    if m.is_index:
        return [str(d.platform) for d in m.index().manifests]
    img = m.image()
    return [d.digest for d in img.layers]


def _formats(data: bytes) -> object:
    doc = load_json(data, "manifest")
    out: list[object] = [detect_format(doc)]
    for parse in (
        tartfmt.parse_tart_manifest,
        vetufmt.parse_vetu_manifest,
        parse_barge_manifest,
    ):
        with contextlib.suppress(BargeError):
            out.append(parse(doc))
    return out


def _layout(data: bytes, tmp: Path) -> object:
    (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp / "index.json").write_bytes(data)
    lay = OCILayout(tmp)
    out = [lay.tags(), lay.manifests()]
    with contextlib.suppress(BargeError):
        out.append(lay.get_manifest(None))
    return out


def _vetu_config(data: bytes) -> object:
    vm = vetufmt.vetu_vm_info(data)
    img = vetufmt.parse_vetu_manifest(
        {
            "schemaVersion": 2,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(b"c"), "size": 1},
            "layers": [
                {"mediaType": vetufmt.CONFIG_MEDIA_TYPE, "digest": sha(b"v"), "size": 1},
                {"mediaType": vetufmt.KERNEL_MEDIA_TYPE, "digest": sha(b"k"), "size": 1},
            ],
        }
    )
    vetufmt.check_disks_listed(img, vm)
    return vm


ENTRY_POINTS: dict[str, Callable[[bytes], object]] = {
    "load_json": lambda b: load_json(b, "document"),
    "Manifest (json, image, index, platforms)": _manifest,
    "media_type_of": lambda b: media_type_of(b, None),
    "barge VM config": VMConfig.from_bytes,
    "barge frame index": FrameIndex.from_bytes,
    "Tart VM config": tartfmt.tart_vm_info,
    "Vetu VM config": _vetu_config,
    "Tart, Vetu and barge manifests": _formats,
    "registry error body": _parse_body,
}
#: What each may raise besides a BargeError: Manifest.image()/index() document ValueError.
ALSO_ALLOWED: dict[str, tuple[type[Exception], ...]] = {
    "Manifest (json, image, index, platforms)": (ValueError,)
}


def check(name: str, fn: Callable[[bytes], object], data: bytes) -> None:
    try:
        result = fn(data)
    except RecursionError as e:  # name the entry point in hypothesis' report
        raise AssertionError(f"{name}: {e!r}") from e
    except BargeError as e:
        assert e.message and "\n" not in printable(e.message)
        return
    except ALSO_ALLOWED.get(name, ()):
        return
    # what a parser returns can be shown: printable() never leaves a line break or surrogate
    text = printable(repr(result))
    text.encode("utf-8")
    assert "\n" not in text and "\r" not in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes())
@example(data=b"[" * 100_000 + b"]" * 100_000)
@example(data=b'{"a":' * 5000 + b"1" + b"}" * 5000)
@example(data=b'{"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
@example(data=b'{"layers":[{"mediaType":"\\ud800","digest":"x","size":1}]}')
@example(data=b'{"manifests":[{"digest":"' + sha(b"x").encode() + b'","size":1,'
         b'"platform":{"os":"linux","variant":[1]}}],"mediaType":"' + OCI_INDEX.encode()
         + b'"}')  # fmt: skip
def test_every_parser_raises_only_barge_errors(tmp_path_factory: Any, data: bytes) -> None:
    """Each generated document goes to every entry point (generating is the slow part)."""
    for name, fn in ENTRY_POINTS.items():
        check(name, fn, data)
    check("layout index.json", lambda b: _layout(b, tmp_path_factory.mktemp("lay")), data)


@given(depth=st.integers(min_value=0, max_value=3 * MAX_JSON_DEPTH), key=st.booleans())
def test_load_json_depth_bound_is_exact(depth: int, key: bool) -> None:
    data = nest(b'"[{[{"', depth, key)  # brackets inside a string do not count
    if depth <= MAX_JSON_DEPTH:
        assert load_json(data, "doc") == json.loads(data)
    else:
        with pytest.raises(JSONError, match=f"nested {depth} levels deep"):
            load_json(data, "doc")


def test_load_json_size_bound_and_error_classes() -> None:
    with pytest.raises(JSONError, match="over the 10 byte limit"):
        load_json(b"[" + b"1," * 10 + b"1]", "doc", max_size=10)
    for bad in (b"\xff", b"{", b"[1,]", b"NaN1"):
        with pytest.raises(JSONError) as e:
            load_json(bad, "doc")
        assert isinstance(e.value, ValueError) and e.value.exit_code == ExitCode.INTEGRITY


UNSAFE = {"Cc", "Cs", "Zl", "Zp"}


@given(st.text(st.characters(exclude_categories=())))
@example("\ud800 \r\n \x1b[31m \u202e \u2028 \x85 é 中 🙂")
def test_printable_leaves_no_control_surrogate_or_line_break(text: str) -> None:
    out = printable(text)
    out.encode("utf-8")  # never raises: no lone surrogate is left
    assert not any(unicodedata.category(c) in UNSAFE for c in out)
    assert not set(out) & set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@given(st.text(string.printable.strip() + "é中🙂"))
def test_printable_keeps_ordinary_text(text: str) -> None:
    assert printable(text) == text


# -- through the CLI ----------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    """The one line saying what is wrong: an error, or verify's verdict."""
    lines = [x for x in err.splitlines() if x.startswith(("barge: error:", "FAILED:"))]
    assert len(lines) == 1, err
    return lines[0]


def make_layout(path: Path, index: bytes) -> str:
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_bytes(index)
    return f"oci:{path}"


@pytest.mark.parametrize(
    "index",
    [
        b'{"schemaVersion":2,"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"schemaVersion":2,"manifests":[],"x":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    ],
    ids=["manifests-100000-deep", "extra-field-3000-deep"],
)
def test_deep_layout_index_exits_6_with_one_line(
    barge_home: Path, tmp_path: Path, index: bytes
) -> None:
    loc = make_layout(tmp_path / "deep", index)
    for args in (
        ("pull", loc, "-q"),
        ("verify", loc),
        ("copy", loc, f"oci:{tmp_path / 'out'}", "-q"),
        ("import", loc, "vm", "-q"),
        ("clone", loc, "vm2", "-q"),
    ):
        err = barge(*args, code=ExitCode.INTEGRITY)
        assert "nested" in one_error_line(err) and "internal error" not in err


def test_deep_manifest_and_vm_config_exit_6(barge_home: Path, registry: RunningRegistry) -> None:
    # a Tart image whose VM config layer nests 5000 levels deep
    deep_cfg = b'{"version":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    push_tart(registry, "deep/cfg", "v1", vector_chunks()[:1], vm_config=deep_cfg)
    err = barge("pull", f"{registry.host}/deep/cfg:v1", "-q", code=ExitCode.INTEGRITY)
    assert "Tart VM config is nested" in one_error_line(err)
    # a manifest with a deep extra field (the registry parses up to 10000 levels)
    cfg = b'{"architecture":"amd64","os":"linux"}'
    doc = (
        b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":'
        b'{"mediaType":"' + OCI_CONFIG.encode() + b'","digest":"'
        + put_blob(registry, "deep/m", cfg).encode() + b'","size":' + str(len(cfg)).encode()
        + b'},"layers":[],"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    )  # fmt: skip
    put_manifest(registry, "deep/m", "v1", doc)
    ref = f"{registry.host}/deep/m:v1"
    for args in (("pull", ref, "-q"), ("inspect", ref), ("verify", ref), ("clone", ref, "x")):
        err = barge(*args, code=ExitCode.INTEGRITY)
        assert "nested" in one_error_line(err)
    # an OCI config nesting deep is only not shown by inspect (it is optional information)
    deep_oci = b'{"os":' + b"[" * 5000 + b"]" * 5000 + b"}"
    put_manifest(
        registry,
        "deep/c",
        "v1",
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": put_blob(registry, "deep/c", deep_oci),
                    "size": len(deep_oci),
                },
                "layers": [],
            }
        ).encode(),
    )
    info = json.loads(barge("inspect", f"{registry.host}/deep/c:v1", "--format", "json"))
    assert info["config"]["content"] is None and info["platform"] is None


FORGED = "\r\nDigest:     sha256:" + "f" * 64 + "\n\x1b[2J"


def hostile_manifest(registry: RunningRegistry, repo: str) -> dict[str, Any]:
    cfg = b'{"architecture":"amd64","os":"linux"}'
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": put_blob(registry, repo, cfg),
            "size": len(cfg),
        },
        "layers": [],
        "annotations": {"org.example.note": "ok" + FORGED, "lone\ud800": "\udcff surrogate"},
    }
    put_manifest(registry, repo, "v1", json.dumps(doc).encode())  # ASCII, \\ud800 escaped
    return doc


def test_inspect_escapes_annotations(barge_home: Path, registry: RunningRegistry) -> None:
    hostile_manifest(registry, "evil/ann")
    ref = f"{registry.host}/evil/ann:v1"
    out = barge("inspect", ref)  # a lone surrogate used to crash it half-way
    lines = out.splitlines()
    assert [x for x in lines if x.startswith("Digest:")] == [lines[1]]  # not forged
    assert "\x1b" not in out and "\r" not in out
    assert r"ok\r\nDigest:     sha256:" + "f" * 64 + r"\n\x1b[2J" in out
    assert r"lone\ud800=\udcff surrogate" in out
    assert lines[-2:] == [
        "Layers (0):",
        "    #        SIZE  UNCOMPRESSED  DIGEST               MEDIA TYPE",
    ]
    # JSON keeps the values, as JSON escapes
    info = json.loads(barge("inspect", ref, "--format", "json"))
    assert info["annotations"]["org.example.note"] == "ok" + FORGED
    assert info["annotations"]["lone\ud800"] == "\udcff surrogate"


def test_notes_list_and_get_escape_image_content(
    barge_home: Path, registry: RunningRegistry
) -> None:
    # a Tart layer of an unknown type is ignored and named in a note: its name is content
    push_tart(
        registry, "evil/tart", "v1", vector_chunks()[:1],
        extra_layers=[b"x"], extra_type="application/x-evil" + FORGED,
    )  # fmt: skip
    ref = f"{registry.host}/evil/tart:v1"
    res = CliRunner().invoke(main, ["pull", ref], catch_exceptions=False)
    assert res.exit_code == 0
    notes = [x for x in res.stderr.splitlines() if "ignored layers" in x]
    assert len(notes) == 1 and r"application/x-evil\r\nDigest:" in notes[0]
    assert "\x1b" not in res.stderr and not any(
        x.startswith("Digest:") for x in res.stderr.splitlines()
    )
    for args in (("list",), ("get", ref)):
        out = barge(*args)
        assert "\x1b" not in out and "\r" not in out
