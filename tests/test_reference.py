"""Tests for barge.reference: Docker's reference grammar, normalisation and round trips."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from barge.errors import ExitCode, UsageError
from barge.reference import (
    LAYOUT_SCHEMES,
    Reference,
    ReferenceError,
    Registry,
    layout_key,
    looks_like_reference,
    parse,
    parse_layout,
    parse_location,
    parse_registry,
    parse_registry_host,
    parse_repository,
    validate_digest,
    validate_tag,
)

SHA = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "f" * 128

# ---------------------------------------------------------------------------------------------
# normalisation table: input -> (registry, repository, tag, digest, canonical string)

VALID = [
    ("ubuntu", "docker.io", "library/ubuntu", None, None, "docker.io/library/ubuntu"),
    ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None, None),
    ("docker.io/ubuntu", "docker.io", "library/ubuntu", None, None, "docker.io/library/ubuntu"),
    ("docker.io/library/ubuntu", "docker.io", "library/ubuntu", None, None, None),
    ("index.docker.io/x/y", "docker.io", "x/y", None, None, "docker.io/x/y"),
    ("index.docker.io/y", "docker.io", "library/y", None, None, "docker.io/library/y"),
    ("cirruslabs/macos", "docker.io", "cirruslabs/macos", None, None, "docker.io/cirruslabs/macos"),
    ("localhost/x", "localhost", "x", None, None, "localhost/x"),
    ("localhost:5000/x", "localhost:5000", "x", None, None, "localhost:5000/x"),
    ("localhost:05000/x", "localhost:5000", "x", None, None, "localhost:5000/x"),
    ("host:8221/team/macos:sonoma", "host:8221", "team/macos", "sonoma", None, None),
    (
        "ghcr.io/cirruslabs/macos-sonoma-base:latest",
        "ghcr.io",
        "cirruslabs/macos-sonoma-base",
        "latest",
        None,
        None,
    ),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None, "[::1]:5000/x:y"),
    ("[2001:db8::1]/x", "[2001:db8::1]", "x", None, None, "[2001:db8::1]/x"),
    ("127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", None, None, None),
    ("x@" + SHA, "docker.io", "library/x", None, SHA, "docker.io/library/x@" + SHA),
    ("x:tag@" + SHA, "docker.io", "library/x", "tag", SHA, "docker.io/library/x:tag@" + SHA),
    ("r.example.com/a@" + SHA512, "r.example.com", "a", None, SHA512, None),
    ("a.b/c__d/e-f/g.h/i---j:T_a.g-1", "a.b", "c__d/e-f/g.h/i---j", "T_a.g-1", None, None),
    ("localhost", "docker.io", "library/localhost", None, None, "docker.io/library/localhost"),
    ("localhost:5000", "docker.io", "library/localhost", "5000", None, None),
    ("Registry.Example.COM/x", "Registry.Example.COM", "x", None, None, None),
    ("x:" + "a" * 128, "docker.io", "library/x", "a" * 128, None, None),
]


@pytest.mark.parametrize(("s", "registry", "repository", "tag", "digest", "canonical"), VALID)
def test_normalisation(
    s: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    canonical: str | None,
) -> None:
    r = parse(s)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repository, tag, digest)
    expected = canonical or f"{registry}/{repository}" + (f":{tag}" if tag else "") + (
        f"@{digest}" if digest else ""
    )
    assert str(r) == expected
    assert str(parse(str(r))) == str(r)
    assert parse(str(r)) == r


def test_host_port_name_ref() -> None:
    r = parse("[::1]:5000/team/vm:v1")
    assert r.host == "::1"
    assert r.port == 5000
    assert r.name == "[::1]:5000/team/vm"
    assert r.ref == "v1"
    r = parse("[2001:db8::1]/x")
    assert (r.host, r.port) == ("2001:db8::1", None)
    r = parse("ghcr.io/a/b")
    assert (r.host, r.port, r.ref) == ("ghcr.io", None, "latest")
    r = parse("ghcr.io/a/b:t@" + SHA)
    assert r.ref == SHA
    assert parse("ubuntu").host == "docker.io"


def test_with_methods() -> None:
    r = parse("ghcr.io/a/b:t@" + SHA)
    assert str(r.with_tag("u")) == "ghcr.io/a/b:u"
    assert str(r.with_digest(SHA512)) == "ghcr.io/a/b:t@" + SHA512
    assert str(r.without_tag_or_digest()) == "ghcr.io/a/b"
    with pytest.raises(ReferenceError, match="tag is longer than 128"):
        r.with_tag("a" * 129)
    with pytest.raises(ReferenceError, match="unsupported digest algorithm"):
        r.with_digest("md5:" + "a" * 32)


def test_direct_construction_normalises_and_validates() -> None:
    assert Reference("docker.io", "ubuntu") == parse("ubuntu")
    assert Reference("index.docker.io", "a/b").registry == "docker.io"
    assert Reference("localhost:05000", "x").registry == "localhost:5000"
    with pytest.raises(ReferenceError, match="must be 'localhost', an IP address"):
        Reference("foo", "bar")  # would print as "foo/bar", i.e. docker.io/foo/bar
    with pytest.raises(ReferenceError, match="repository name must be lowercase"):
        Reference("ghcr.io", "Bar")
    with pytest.raises(ReferenceError, match="tag must start with"):
        Reference("ghcr.io", "bar", tag=".x")


def test_parse_repository() -> None:
    assert str(parse_repository("ubuntu")) == "docker.io/library/ubuntu"
    assert str(parse_repository("localhost:5000/a/b")) == "localhost:5000/a/b"
    with pytest.raises(ReferenceError, match=r'invalid repository name "a:b": a tag is not'):
        parse_repository("a:b")
    with pytest.raises(ReferenceError, match="a digest is not allowed"):
        parse_repository("a@" + SHA)


def test_looks_like_reference() -> None:
    assert looks_like_reference("ubuntu:22.04")
    assert looks_like_reference("a/b")
    assert looks_like_reference("a@" + SHA)
    assert not looks_like_reference("myvm")
    assert not looks_like_reference("my-vm_2.0")


def test_validate_tag_and_digest() -> None:
    assert validate_tag("v1.0-rc_1") == "v1.0-rc_1"
    assert validate_tag("a" * 128) == "a" * 128
    assert validate_digest(SHA) == SHA
    assert validate_digest(SHA512) == SHA512
    with pytest.raises(ReferenceError, match=r'invalid tag "-x": tag must start'):
        validate_tag("-x")
    with pytest.raises(ReferenceError, match="tag is empty"):
        validate_tag("")
    with pytest.raises(ReferenceError, match="sha512 digest must have 128 hex digits, not 64"):
        validate_digest("sha512:" + "a" * 64)
    with pytest.raises(ReferenceError, match="must have the form algorithm:hex"):
        validate_digest("a" * 64)


def test_error_is_usage_error() -> None:
    with pytest.raises(UsageError) as info:
        parse("Foo/bar")
    assert info.value.exit_code == ExitCode.USAGE
    assert str(info.value) == 'invalid reference "Foo/bar": repository name must be lowercase'


INVALID = [
    ("", "reference is empty"),
    ("Foo/bar", "repository name must be lowercase"),
    ("ubuntu:22.04/x", 'port "22.04" is not a decimal number'),  # "a:b/" is host:port
    ("ghcr.io/Org/repo", "repository name must be lowercase"),
    (":tag", "repository name is empty"),
    ("@" + SHA, "repository name is empty"),
    ("localhost:0/x", "port 0 is out of range 1-65535"),
    ("host:99999/x", "port 99999 is out of range 1-65535"),
    ("host:abc/x", 'port "abc" is not a decimal number'),
    ("host:/x", "port is empty"),
    ("[::1]:0/x", "port 0 is out of range"),
    ("x@sha256:abc", "sha256 digest must have 64 hex digits, not 3"),
    ("x@sha256:" + "A" * 64, "sha256 digest must be lowercase hexadecimal"),
    ("x@sha256:" + "g" * 64, "sha256 digest must be lowercase hexadecimal"),
    ("x@md5:" + "a" * 32, 'unsupported digest algorithm "md5"'),
    ("x@" + "a" * 64, "digest must have the form algorithm:hex"),
    ("x@", "digest is empty"),
    ("x:", "tag is empty"),
    ("x@" + SHA + "@" + SHA, "more than one '@'"),
    ("x:" + "a" * 129, "tag is longer than 128 characters (129)"),
    ("x:-tag", "tag must start with a letter, digit or '_'"),
    ("ghcr.io/a:t/b", 'repository path component "a:t" is invalid'),
    ("a//b", "empty path component"),
    ("a/", "repository name must not end with '/'"),
    ("ghcr.io/", "repository name is empty"),
    ("/a", "repository name must not start with '/'"),
    ("a..b", 'repository path component "a..b" is invalid'),
    ("a_-b", 'repository path component "a_-b" is invalid'),
    ("-a", 'repository path component "-a" is invalid'),
    ("a___b", 'repository path component "a___b" is invalid'),
    ("[::1", "IPv6 address is missing its closing ']'"),
    ("[::1/x", "IPv6 address is missing its closing ']'"),
    ("[::1]", "a registry host must be followed by '/repository'"),
    ("[::1]:5000", "a registry host must be followed by '/repository'"),
    ("[::g]/x", '"::g" is not a valid IPv6 address'),
    ("[1:2:3:4:5:6:7:8:9]/x", "is not a valid IPv6 address"),
    ("[]/x", "is not a valid IPv6 address"),
    ("[::1]x/y", 'unexpected "x" after IPv6 address'),
    ("::1/x", "an IPv6 address must be written in brackets"),
    ("2001:db8::1/x:tag", "an IPv6 address must be written in brackets"),
    ("fe80::1:5000/x", "an IPv6 address must be written in brackets"),
    ("999.1.1.1/x", '"999.1.1.1" is not a valid IPv4 address'),
    ("-bad.com/x", 'registry host label "-bad" is invalid'),
    ("a" * 64 + ".com/x", "registry host label"),
    ("bad..com/x", "has an empty label"),
    ("a:b:c", "a registry host must be followed by '/repository'"),
    ("a" * 64, "must not be a 64-character hexadecimal string"),
    ("a b", "reference contains whitespace"),
    ("x\n", "reference contains whitespace"),
    ("ghcr.io/" + "/".join(["abcdefghi"] * 25), "longer than 255 characters"),
    ("caf\u00e9/x", 'repository path component "caf\u00e9" is invalid'),
]


@pytest.mark.parametrize(("s", "reason"), INVALID)
def test_invalid(s: str, reason: str) -> None:
    with pytest.raises(ReferenceError) as info:
        parse(s)
    msg = str(info.value)
    assert reason in msg
    assert msg.startswith("invalid reference ")
    assert "\n" not in msg


def test_error_quotes_long_input_bounded() -> None:
    with pytest.raises(ReferenceError) as info:
        parse("A" * 10_000)
    assert len(str(info.value)) < 500


# ---------------------------------------------------------------------------------------------
# property tests

path_component = st.from_regex(r"\A[a-z0-9]{1,8}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,8}){0,2}\Z")
repository_path = st.lists(path_component, min_size=1, max_size=4).map("/".join)
_TAG_FIRST = "ABCXYZabcxyz0189_"
tag_st = st.builds(
    lambda a, b: a + b,
    st.sampled_from(_TAG_FIRST),
    st.text(_TAG_FIRST + ".-", max_size=127),
)
digest_st = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.binary(min_size=64, max_size=64).map(lambda b: "sha512:" + b.hex()),
)
label = st.from_regex(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,10}[A-Za-z0-9])?\Z")
port_st = st.integers(min_value=1, max_value=65535)


def _ipv6_literal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return "[" + addr.compressed + "]"


# barge requires an all-numeric dotted host to be a valid IPv4 address, so give each name a
# letter somewhere
dotted_host = (
    st.lists(label, min_size=2, max_size=4)
    .map(".".join)
    .filter(lambda h: any(c.isalpha() for c in h))
)
ipv4_host = st.ip_addresses(v=4).map(str)
ipv6_host = (
    st.ip_addresses(v=6)
    .filter(lambda a: "." not in a.compressed)  # IPv4-mapped forms are not in the grammar
    .map(_ipv6_literal)
)
# (host, port or None); a single label is a host only with a port or as "localhost"
host_and_port = st.one_of(
    st.tuples(st.one_of(dotted_host, ipv4_host, ipv6_host, st.just("localhost")), st.none()),
    st.tuples(
        st.one_of(
            dotted_host,
            ipv4_host,
            ipv6_host,
            label.filter(lambda h: not h.isdigit()),  # all-digit hosts must be IPv4
            st.just("localhost"),
        ),
        port_st,
    ),
)


@st.composite
def references(draw: st.DrawFn) -> tuple[str, str, str, str | None, str | None]:
    """(input string, expected registry, expected repository, tag, digest)."""
    hp = draw(st.one_of(st.none(), host_and_port))
    repo = draw(repository_path)
    tag = draw(st.one_of(st.none(), tag_st))
    digest = draw(st.one_of(st.none(), digest_st))
    if hp is None:
        # without a host, a first component followed by '/' must not look like one
        first = repo.split("/")[0]
        assume("/" not in repo or ("." not in first and first != "localhost"))
        prefix, registry = "", "docker.io"
    else:
        host, port = hp
        registry = host if port is None else f"{host}:{port}"
        prefix = registry + "/"
    if registry == "index.docker.io":
        registry = "docker.io"
    repository = repo
    if registry == "docker.io" and "/" not in repo:
        repository = "library/" + repo
    assume(len(registry) + 1 + len(repository) <= 255)
    s = prefix + repo + (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")
    return s, registry, repository, tag, digest


@settings(max_examples=500)
@given(references())
def test_generated_references_round_trip(
    case: tuple[str, str, str, str | None, str | None],
) -> None:
    s, registry, repository, tag, digest = case
    r = parse(s)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repository, tag, digest)
    assert str(parse(str(r))) == str(r)
    assert parse(str(r)) == r
    assert Reference(r.registry, r.repository, r.tag, r.digest) == r
    assert r.name == f"{registry}/{repository}"
    assert r.ref == (digest or tag or "latest")
    assert looks_like_reference(s) or (registry == "docker.io" and "/" not in s)
    if registry.startswith("["):
        assert ipaddress.IPv6Address(r.host)
        assert not r.host.startswith("[")


@given(references(), tag_st)
def test_with_tag_round_trip(case: tuple[str, str, str, str | None, str | None], t: str) -> None:
    r = parse(case[0]).with_tag(t)
    assert r.tag == t
    assert r.digest is None
    assert parse(str(r)) == r


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_reference_error(s: str) -> None:
    try:
        r = parse(s)
    except ReferenceError as e:
        assert str(e).startswith("invalid reference ")
    else:
        assert parse(str(r)) == r


# ---------------------------------------------------------------------------------------------
# OCI layout locations (oci:PATH[:tag], oci-archive:FILE[:tag])


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("oci:dir", ("oci", Path("dir"), None)),
        ("oci:dir:v1", ("oci", Path("dir"), "v1")),
        ("oci:/abs/path/dir:latest", ("oci", Path("/abs/path/dir"), "latest")),
        ("oci:/a:b/dir", ("oci", Path("/a:b/dir"), None)),
        ("oci:/a:b/dir:t", ("oci", Path("/a:b/dir"), "t")),
        ("oci:dir:", ("oci", Path("dir"), None)),
        ("oci:dir:bad tag!", ("oci", Path("dir:bad tag!"), None)),
        ("oci-archive:img.tar", ("oci-archive", Path("img.tar"), None)),
        ("oci-archive:img.tar:sonoma", ("oci-archive", Path("img.tar"), "sonoma")),
    ],
)
def test_parse_layout(s: str, expected: tuple[str, Path, str | None]) -> None:
    loc = parse_layout(s)
    assert loc.path is not None
    assert (loc.scheme, Path(loc.path), loc.tag) == expected
    assert parse_location(s) == loc


@pytest.mark.parametrize(
    ("s", "reason"),
    [
        ("oci:", "the path is empty"),
        ("oci::tag", "the path is empty"),
        ("docker://x", "expected oci:PATH[:tag]"),
        ("dir:tag", "expected oci:PATH[:tag]"),
    ],
)
def test_parse_layout_invalid(s: str, reason: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_layout(s)
    assert reason in str(info.value)


def test_layout_reference() -> None:
    loc = parse_layout("oci-archive:img.tar:sonoma")
    assert loc == Reference.layout("oci-archive", Path("img.tar"), "sonoma")
    assert loc.is_layout and loc.ref == "sonoma" and str(loc) == "oci-archive:img.tar:sonoma"
    assert loc.cache_key() == ("oci-archive", os.path.abspath("img.tar"), "sonoma")
    assert loc.at(SHA).ref == SHA and loc.at("v2").tag == "v2"
    assert loc.same_repository(loc.without_tag_or_digest())
    assert not loc.same_repository(Reference.layout("oci", "img.tar"))
    assert layout_key("a/./b/../c/") == os.path.abspath("a/c")
    assert LAYOUT_SCHEMES == ("oci", "oci-archive")
    for bad in (
        lambda: Reference.layout("oci", "d", "bad tag"),
        lambda: Reference.layout("oci", ""),
        lambda: Reference.layout("oci", "a\0b"),
        lambda: loc.with_tag("-x"),
    ):
        with pytest.raises(ReferenceError):
            bad()
    assert not parse_location("ghcr.io/a/b:1").is_layout


# ---------------------------------------------------------------------------------------------
# registry hosts: split once


@pytest.mark.parametrize(
    ("text", "name", "hostname", "port", "api_name"),
    [
        ("ghcr.io", "ghcr.io", "ghcr.io", None, "ghcr.io"),
        ("localhost:05000", "localhost:5000", "localhost", 5000, "localhost:5000"),
        ("[::1]:5000", "[::1]:5000", "::1", 5000, "[::1]:5000"),
        ("127.0.0.1:80", "127.0.0.1:80", "127.0.0.1", 80, "127.0.0.1:80"),
        ("index.docker.io", "docker.io", "docker.io", None, "registry-1.docker.io"),
        ("docker.io", "docker.io", "docker.io", None, "registry-1.docker.io"),
        ("https://r.example.com:8443/v1/", "r.example.com:8443", "r.example.com", 8443, None),
    ],
)
def test_registry_split_once(
    text: str, name: str, hostname: str, port: int | None, api_name: str | None
) -> None:
    r = parse_registry(text, url=True)
    assert (r.name, r.hostname, r.port, str(r)) == (name, hostname, port, name)
    assert r.api_name == (api_name or name)
    assert r == Registry(name)


def test_registry_invalid() -> None:
    for text, reason in [
        ("", "missing registry host"),
        ("https://", "missing registry host"),
        ("foo", "must be 'localhost', an IP address, or contain"),
        ("host:0", "out of range"),
        ("[::1", "closing ']'"),
        ("a..b", "empty label"),
    ]:
        with pytest.raises(ReferenceError, match=re.escape(reason)):
            parse_registry(text, url=True)
    with pytest.raises(ReferenceError):
        parse_registry("https://r.example.com")  # a URL only where it is allowed


@pytest.mark.parametrize(
    ("name", "loopback"),
    [
        ("localhost:5000", True),
        ("a.localhost", True),
        ("127.1.2.3:5000", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("ghcr.io", False),
    ],
)
def test_registry_loopback(name: str, loopback: bool) -> None:
    assert Registry(name).is_loopback is loopback


def test_reference_scope_and_host() -> None:
    r = parse("[::1]:5000/team/vm:v1")
    assert r.registry_host == Registry("[::1]:5000")
    assert (r.host, r.port) == ("::1", 5000)
    assert r.scope("pull") == "repository:team/vm:pull"
    assert r.scope("pull", "push") == "repository:team/vm:pull,push"
    assert r.same_repository(parse("[::1]:5000/team/vm@" + SHA))
    assert r.at("v2") == r.with_tag("v2") and r.at(SHA).ref == SHA
    with pytest.raises(ReferenceError):
        r.at("sha256:short")
    assert not r.same_repository(parse("[::1]:5001/team/vm"))


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("ghcr.io", "ghcr.io"),
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "registry-1.docker.io"),
        ("http://localhost:05000", "localhost:5000"),
        (" [::1]:5000/ignored/path ", "[::1]:5000"),
    ],
)
def test_parse_registry_host(value: str, name: str) -> None:
    assert parse_registry_host(value) == name


def test_parse_registry_host_invalid() -> None:
    with pytest.raises(UsageError, match="missing registry host"):
        parse_registry_host("https://")
    with pytest.raises(
        UsageError, match=re.escape("not a registry host: 'foo' (expected HOST[:PORT])")
    ):
        parse_registry_host("foo")
