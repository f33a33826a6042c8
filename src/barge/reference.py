"""Image references: parse, normalise and format ``[host[:port]/]path[:tag][@algo:hex]``.

The grammar is Docker's (``github.com/distribution/reference``: ``regexp.go`` and
``normalize.go``):

* path components match ``[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`` and are joined by ``/``;
* the first component is a registry host if it is ``localhost``, contains a ``.`` or a ``:``,
  or is a bracketed IPv6 literal (``[::1]:5000``); otherwise the registry is ``docker.io``;
* ``index.docker.io`` is the legacy spelling of ``docker.io``; a single-component repository
  on ``docker.io`` gets the ``library/`` prefix (``ubuntu`` -> ``docker.io/library/ubuntu``);
* a tag matches ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``, i.e. at most **128** characters. (The
  distribution spec text once mentioned longer tags; Docker's regex, which every registry and
  client in practice enforces, caps them at 128, and barge follows the regex.);
* a digest is ``algo:hex``; barge accepts the OCI-registered algorithms ``sha256`` (64
  lowercase hex digits) and ``sha512`` (128);
* a reference may carry a tag and a digest together (``name:tag@sha256:...``); the digest then
  decides what is fetched;
* the full normalised name (``registry/repository``) is at most 255 characters.

Besides registry references, a :class:`Reference` names an image in an OCI layout directory
``oci:PATH[:tag]`` or archive ``oci-archive:FILE[:tag]`` (skopeo's spelling; regclient's one
``Ref`` has an ``ocidir`` scheme beside ``reg`` in the same way), and :class:`Registry` is the
registry host alone, split once into host name and port, so nothing else parses ``host:port``.

Where barge is stricter than Docker, on purpose:

* Docker treats a first component with an uppercase letter (``Foo/bar``) as a registry host;
  barge reports ``repository name must be lowercase`` instead, as that is nearly always a
  typo rather than a registry called ``Foo``.
* Hosts are validated for real: DNS labels of at most 63 characters, all-numeric hosts must be
  valid IPv4 addresses, bracketed IPv6 literals must parse with :mod:`ipaddress`, and the port
  is decimal in 1-65535 (written without leading zeros in the canonical form).

The module is a little over 600 lines: it is one grammar (the host, the repository, the tag and
digest, and the layout spelling that shares the tag and digest rules), and its checks are
private so that nothing outside it takes a reference apart.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import PurePath as _PurePath
from typing import Literal

from barge.errors import UsageError

__all__ = [
    "DEFAULT_REGISTRY",
    "LAYOUT_SCHEMES",
    "MISSING_HOST",
    "NAME_TOTAL_LENGTH_MAX",
    "TAG_LENGTH_MAX",
    "Reference",
    "ReferenceError",
    "Registry",
    "Scheme",
    "cached_spelling",
    "layout_key",
    "looks_like_reference",
    "parse",
    "parse_layout",
    "parse_location",
    "parse_registry",
    "parse_registry_host",
    "parse_repository",
    "validate_digest",
    "validate_tag",
]

#: Where an image reference points: a registry repository, an OCI image layout directory, or an
#: OCI archive (a tar of a layout).
Scheme = Literal["registry", "oci", "oci-archive"]
#: The layout schemes. In the catalog a cached image pulled from a layout is keyed (registry =
#: the scheme, repository = the layout's absolute path, tag): no registry reference is ever spelt
#: "oci" or "oci-archive" (a name without '.' or ':' is a repository on docker.io), so the two
#: never meet.
LAYOUT_SCHEMES: tuple[Scheme, ...] = ("oci", "oci-archive")

DEFAULT_REGISTRY = "docker.io"
LEGACY_DEFAULT_REGISTRY = "index.docker.io"
#: where Docker Hub's API is served: ``docker.io`` is a name, not a host that answers ``/v2/``
DOCKER_HUB_API = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255
TAG_LENGTH_MAX = 128
MISSING_HOST = "missing registry host"

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST_ALGO = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*")
_LOWER_HEX = re.compile(r"[a-f0-9]+")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_QUOTE_MAX = 300


class ReferenceError(UsageError):
    """A malformed image reference, repository name, tag or digest.

    The message names what is wrong and quotes the input.
    """


def _quote(s: str) -> str:
    """Quote user input for an error message: escaped, bounded in length."""
    if len(s) > _QUOTE_MAX:
        s = s[:_QUOTE_MAX] + "..."
    return json.dumps(s, ensure_ascii=False)


class _Invalid(Exception):
    """Internal: a reason, turned into a ReferenceError with the right prefix by the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# component validators (raise _Invalid with a bare reason)


def _check_tag(tag: str) -> None:
    if tag == "":
        raise _Invalid("tag is empty")
    if len(tag) > TAG_LENGTH_MAX:
        raise _Invalid(f"tag is longer than {TAG_LENGTH_MAX} characters ({len(tag)})")
    if not _TAG.fullmatch(tag):
        raise _Invalid(
            "tag must start with a letter, digit or '_' and contain only letters, digits, "
            "'_', '.' and '-'"
        )


def _check_digest(digest: str) -> None:
    if digest == "":
        raise _Invalid("digest is empty")
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        raise _Invalid("digest must have the form algorithm:hex")
    if not _DIGEST_ALGO.fullmatch(algo):
        raise _Invalid(f"digest algorithm {_quote(algo)} is malformed")
    expected = _DIGEST_HEX_LENGTHS.get(algo)
    if expected is None:
        raise _Invalid(
            f"unsupported digest algorithm {_quote(algo)} (supported: "
            + ", ".join(sorted(_DIGEST_HEX_LENGTHS))
            + ")"
        )
    if not _LOWER_HEX.fullmatch(hexpart):
        raise _Invalid(f"{algo} digest must be lowercase hexadecimal")
    if len(hexpart) != expected:
        raise _Invalid(f"{algo} digest must have {expected} hex digits, not {len(hexpart)}")


def _check_port(port: str) -> int:
    if port == "":
        raise _Invalid("port is empty")
    if not (port.isascii() and port.isdigit()):
        raise _Invalid(f"port {_quote(port)} is not a decimal number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise _Invalid(f"port {port} is out of range 1-65535")
    return value


def _split_registry(registry: str) -> tuple[str, str, int | None]:
    """Validate ``host[:port]`` and return (canonical host part, bare host, port).

    The canonical host part keeps brackets around IPv6 literals; the bare host drops them.
    """
    if registry == "":
        raise _Invalid("registry host is empty")
    if registry.startswith("["):
        end = registry.find("]")
        if end == -1:
            raise _Invalid("IPv6 address is missing its closing ']'")
        literal = registry[1:end]
        rest = registry[end + 1 :]
        if literal == "" or not re.fullmatch(r"[A-Fa-f0-9:]+", literal):
            raise _Invalid(f"{_quote(literal)} is not a valid IPv6 address")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise _Invalid(f"{_quote(literal)} is not a valid IPv6 address") from None
        if rest == "":
            return registry, literal, None
        if not rest.startswith(":"):
            raise _Invalid(f"unexpected {_quote(rest)} after IPv6 address (expected ':port')")
        return f"[{literal}]", literal, _check_port(rest[1:])
    if "]" in registry:
        raise _Invalid("registry host has ']' without '['")
    if registry.count(":") > 1:
        raise _Invalid("an IPv6 address must be written in brackets, as in [::1]:5000")
    host, sep, port_s = registry.partition(":")
    port = _check_port(port_s) if sep else None
    if host == "":
        raise _Invalid("registry host is empty")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(f"{_quote(host)} is not a valid IPv4 address") from None
    else:
        for label in host.split("."):
            if label == "":
                raise _Invalid(f"registry host {_quote(host)} has an empty label")
            if not _HOST_LABEL.fullmatch(label):
                raise _Invalid(
                    f"registry host label {_quote(label)} is invalid (letters, digits and "
                    "inner '-', at most 63 characters)"
                )
    return host, host, port


def _canonical_registry(registry: str) -> str:
    hostpart, _, port = _split_registry(registry)
    if hostpart == LEGACY_DEFAULT_REGISTRY and port is None:
        return DEFAULT_REGISTRY
    return hostpart if port is None else f"{hostpart}:{port}"


def _is_host_component(first: str) -> bool:
    """Docker's rule: the first path component is a registry host if it is ``localhost``
    or contains ``.`` or ``:`` (bracketed IPv6 literals always contain ``:``)."""
    return first == "localhost" or "." in first or ":" in first or first.startswith("[")


def _check_repository(repository: str) -> None:
    if repository == "":
        raise _Invalid("repository name is empty")
    if repository.lower() != repository:
        raise _Invalid("repository name must be lowercase")
    if repository.startswith("/"):
        raise _Invalid("repository name must not start with '/'")
    if repository.endswith("/"):
        raise _Invalid("repository name must not end with '/'")
    for component in repository.split("/"):
        if component == "":
            raise _Invalid("repository name has an empty path component ('//')")
        if not _PATH_COMPONENT.fullmatch(component):
            raise _Invalid(
                f"repository path component {_quote(component)} is invalid (lowercase letters "
                "and digits, separated by '.', '_', '__' or '-')"
            )


def _normalise(registry: str, repository: str) -> tuple[str, str]:
    """Validate and normalise a (registry, repository) pair; check the total length."""
    registry = _canonical_registry(registry)
    if not _is_host_component(registry):
        raise _Invalid(
            f"registry {_quote(registry)} must be 'localhost', an IP address, or contain "
            "a '.' or a ':port'"
        )
    _check_repository(repository)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = OFFICIAL_REPO_PREFIX + repository
    name_len = len(registry) + 1 + len(repository)
    if name_len > NAME_TOTAL_LENGTH_MAX:
        raise _Invalid(
            f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters ({name_len})"
        )
    return registry, repository


# ---------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Registry:
    """A registry host ``host[:port]``, validated, canonical and split once.

    This is the one place a registry name is taken apart: the transport connects to
    :attr:`api_name`, per-host settings match :attr:`hostname` (:meth:`matches`), credentials
    and certificates are filed under :attr:`name`. Like :class:`Reference`, the first
    component rule holds: the name is ``localhost``, an IP address, or contains a ``.`` or a
    ``:port`` (``index.docker.io`` is spelt ``docker.io``).
    """

    name: str
    """Canonical ``host[:port]``; an IPv6 literal in brackets (``[::1]:5000``)."""
    hostname: str = field(init=False, repr=False, compare=False)
    """The host without port; an IPv6 address without brackets."""
    port: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            hostpart, hostname, port = _split_registry(self.name)
            if hostpart == LEGACY_DEFAULT_REGISTRY and port is None:
                hostpart = hostname = DEFAULT_REGISTRY
            name = hostpart if port is None else f"{hostpart}:{port}"
            if not _is_host_component(name):
                raise _Invalid(
                    "a registry host must be 'localhost', an IP address, or contain a '.' or "
                    "a ':port'"
                )
        except _Invalid as e:
            raise ReferenceError(f"invalid registry {_quote(self.name)}: {e.reason}") from None
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "hostname", hostname)
        object.__setattr__(self, "port", port)

    @property
    def api_name(self) -> str:
        """``host[:port]`` the registry API is served at (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.name == DEFAULT_REGISTRY else self.name

    @property
    def api_hostname(self) -> str:
        """:attr:`api_name` without the port (an IPv6 address without brackets)."""
        return DOCKER_HUB_API if self.name == DEFAULT_REGISTRY else self.hostname

    @property
    def is_loopback(self) -> bool:
        """``localhost``, ``*.localhost``, 127.0.0.0/8 or ``::1``: a registry on this machine."""
        h = self.hostname.lower()
        if h == "localhost" or h.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False

    def matches(self, pattern: str) -> bool:
        """Does ``pattern`` name this registry? An exact ``host[:port]``, or an ``fnmatch``
        pattern over the host name (``*.dkr.ecr.*.amazonaws.com``: any port), or a pattern
        with a port over the whole name (``*.example.com:5000``). Case-insensitive."""
        p = pattern.strip().lower()
        if p == self.name.lower():
            return True
        target = self.name if _has_port(p) else self.hostname
        return fnmatch.fnmatchcase(target.lower(), p)

    def __str__(self) -> str:
        return self.name


def _has_port(pattern: str) -> bool:
    if pattern.startswith("["):
        return "]:" in pattern
    return pattern.count(":") == 1


def parse_registry(text: str, *, url: bool = False) -> Registry:
    """``host[:port]`` -> :class:`Registry`. With ``url``, a URL's scheme and path are
    dropped first (``https://host:5000/v1/`` -> ``host:5000``), as ``barge login`` and
    Docker's credential files spell hosts. Raises :class:`ReferenceError`."""
    v = text.strip()
    if url:
        for prefix in ("https://", "http://"):
            if v.lower().startswith(prefix):
                v = v[len(prefix) :]
        v = v.split("/", 1)[0]
    if not v:
        raise ReferenceError(MISSING_HOST)
    return Registry(v)


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: a registry repository, or an OCI layout (as regclient's
    one ``Ref`` names both), with an optional tag and digest.

    Constructing one directly validates and normalises the fields the same way :func:`parse`
    does, so every instance satisfies ``str(parse_location(str(r))) == str(r)``. A layout
    reference is made with :meth:`layout`; its ``registry`` and ``repository`` are empty.
    """

    registry: str
    """Canonical ``host[:port]``; an IPv6 literal in brackets (``[::1]:5000``)."""
    repository: str
    """Path within the registry, e.g. ``library/ubuntu``."""
    tag: str | None = None
    digest: str | None = None
    scheme: Scheme = "registry"
    """``registry``, or a layout: ``oci`` (a directory) or ``oci-archive`` (a tar file)."""
    path: str | None = None
    """The layout's path as given (layouts only)."""

    def __post_init__(self) -> None:
        try:
            if self.tag is not None:
                _check_tag(self.tag)
            if self.digest is not None:
                _check_digest(self.digest)
            if self.scheme != "registry":
                _check_layout(self)
                return
            registry, repository = _normalise(self.registry, self.repository)
        except _Invalid as e:
            raise ReferenceError(f"invalid reference {_quote(self._raw())}: {e.reason}") from None
        object.__setattr__(self, "registry", registry)
        object.__setattr__(self, "repository", repository)

    @classmethod
    def layout(
        cls,
        scheme: Scheme,
        path: str | os.PathLike[str],
        tag: str | None = None,
        digest: str | None = None,
    ) -> Reference:
        """An image in the OCI layout at ``path`` (``scheme`` ``oci`` or ``oci-archive``)."""
        return cls("", "", tag, digest, scheme, os.fspath(path))

    def _raw(self) -> str:
        s = f"{self.scheme}:{self.path}" if self.is_layout else f"{self.registry}/{self.repository}"
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s

    @property
    def is_layout(self) -> bool:
        """An OCI layout directory or archive rather than a registry."""
        return self.scheme != "registry"

    @cached_property
    def registry_host(self) -> Registry:
        """The registry as a :class:`Registry` (host name and port split once)."""
        return Registry(self.registry)

    @property
    def host(self) -> str:
        """The registry host name without port; an IPv6 address without brackets."""
        return self.registry_host.hostname

    @property
    def port(self) -> int | None:
        """The registry port, or None when not given."""
        return self.registry_host.port

    def scope(self, *actions: str) -> str:
        """The token scope for ``actions`` on this repository (Docker's token spec, as
        go-containerregistry's ``Repository.Scope``): ``repository:team/vm:pull,push``."""
        return f"repository:{self.repository}:{','.join(actions)}"

    def same_repository(self, other: Reference) -> bool:
        """Same registry and repository, or the same layout (tags and digests aside)."""
        return self.scheme == other.scheme and self.name == other.name

    @property
    def name(self) -> str:
        """``registry/repository`` (a layout: ``scheme:path``): the reference without tag or
        digest."""
        return (
            f"{self.scheme}:{self.path}" if self.is_layout else f"{self.registry}/{self.repository}"
        )

    @property
    def ref(self) -> str:
        """What to ask for: the digest if set, else the tag, else ``latest``."""
        if self.digest is not None:
            return self.digest
        if self.tag is not None:
            return self.tag
        return "latest"

    def with_tag(self, tag: str) -> Reference:
        """The same repository with ``tag`` and no digest."""
        return replace(self, tag=validate_tag(tag), digest=None)

    def with_digest(self, digest: str) -> Reference:
        """The same repository and tag, pinned to ``digest``."""
        return replace(self, digest=validate_digest(digest))

    def at(self, tag_or_digest: str) -> Reference:
        """The same repository at a tag (:meth:`with_tag`) or a digest (:meth:`with_digest`),
        whichever ``tag_or_digest`` is: what ``/v2/<repo>/manifests/<ref>`` takes."""
        if ":" in tag_or_digest:  # a tag never has one
            return self.with_digest(tag_or_digest)
        return self.with_tag(tag_or_digest)

    def without_tag_or_digest(self) -> Reference:
        """Only the repository."""
        return replace(self, tag=None, digest=None)

    def cache_key(self) -> tuple[str, str, str]:
        """(registry, repository, tag) as the catalog keys an image pulled from here; the tag is
        "" when none was given (a digest, if any, is :attr:`digest`). A layout is keyed by its
        scheme and :func:`layout_key` of its path."""
        if self.is_layout:
            assert self.path is not None
            return self.scheme, layout_key(self.path), self.tag or ""
        return self.registry, self.repository, self.tag or ""

    def __str__(self) -> str:
        return self._raw()


def _check_layout(r: Reference) -> None:
    if r.scheme not in LAYOUT_SCHEMES:
        raise _Invalid(f"unknown scheme {_quote(str(r.scheme))}")
    if r.registry or r.repository:
        raise _Invalid("a layout reference has a path, not a registry and repository")
    if not r.path:
        raise _Invalid("the path is empty")
    if "\0" in r.path:
        raise _Invalid("NUL in path")


def layout_key(path: str | os.PathLike[str]) -> str:
    """The stable name of a layout path: absolute and normalised (``.``, ``..`` and repeated
    or trailing ``/`` resolved lexically, as typed; symbolic links are not followed)."""
    text = os.path.abspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"the path {_quote(text)} is not valid UTF-8") from None
    return text


# ---------------------------------------------------------------------------------------------
# public functions


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag (at most 128 characters, Docker's regex); raise
    :class:`ReferenceError` otherwise."""
    try:
        _check_tag(tag)
    except _Invalid as e:
        raise ReferenceError(f"invalid tag {_quote(tag)}: {e.reason}") from None
    return tag


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>`` or ``sha512:<128 lowercase
    hex>``; raise :class:`ReferenceError` otherwise."""
    try:
        _check_digest(digest)
    except _Invalid as e:
        raise ReferenceError(f"invalid digest {_quote(digest)}: {e.reason}") from None
    return digest


def looks_like_reference(s: str) -> bool:
    """True if ``s`` is meant as an image reference rather than a VM name (VM names never
    contain ``/``, ``:`` or ``@``)."""
    return any(c in s for c in "/:@")


def _parse(s: str, *, allow_tag_and_digest: bool) -> Reference:
    if s == "":
        raise _Invalid("reference is empty")
    if s != s.strip() or any(c.isspace() for c in s):
        raise _Invalid("reference contains whitespace")
    if _IMAGE_ID.fullmatch(s):
        raise _Invalid(
            "repository name must not be a 64-character hexadecimal string (that is an image ID)"
        )
    if s.startswith("[") and "]" not in s:
        raise _Invalid("IPv6 address is missing its closing ']'")
    rest, at, digest = s.partition("@")
    if at:
        if not allow_tag_and_digest:
            raise _Invalid("a digest is not allowed here (give a repository only)")
        if "@" in digest:
            raise _Invalid("more than one '@'")
        _check_digest(digest)
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/") and not rest.endswith("]"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not allow_tag_and_digest:
            raise _Invalid("a tag is not allowed here (give a repository only)")
        _check_tag(tag)
    if rest == "":
        raise _Invalid("repository name is empty")
    slash = rest.find("/")
    if slash != -1 and _is_host_component(rest[:slash]):
        registry, repository = rest[:slash], rest[slash + 1 :]
        if repository == "":
            raise _Invalid("repository name is empty")
    else:
        if rest.startswith("[") or (slash == -1 and ":" in rest):
            raise _Invalid("a registry host must be followed by '/repository'")
        registry, repository = DEFAULT_REGISTRY, rest
    registry, repository = _normalise(registry, repository)
    return Reference(registry, repository, tag, digest if at else None)


def parse(s: str) -> Reference:
    """Parse and normalise ``[host[:port]/]path[:tag][@algo:hex]``.

    Raises :class:`ReferenceError` whose message quotes ``s`` and names the problem.
    """
    try:
        return _parse(s, allow_tag_and_digest=True)
    except _Invalid as e:
        raise ReferenceError(f"invalid reference {_quote(s)}: {e.reason}") from None


def parse_repository(s: str) -> Reference:
    """Parse ``[host[:port]/]path`` (no tag, no digest) into a Reference with neither."""
    try:
        return _parse(s, allow_tag_and_digest=False)
    except _Invalid as e:
        raise ReferenceError(f"invalid repository name {_quote(s)}: {e.reason}") from None


def parse_layout(s: str) -> Reference:
    """Parse ``oci:PATH[:tag][@digest]`` / ``oci-archive:FILE[:tag][@digest]``.

    As in skopeo, the tag follows a ':' after the path. barge takes the *last* ':' and only
    if what follows is a valid tag (so ``oci:/a:b/dir`` is the path ``/a:b/dir``, and
    ``oci:dir:v1`` is the path ``dir`` with tag ``v1``). An empty tag (``oci:dir:``) means no
    tag, as in skopeo. A trailing ``@sha256:<hex>`` pins the image by digest.
    """
    scheme: Scheme
    if s.startswith("oci:"):
        scheme, rest = "oci", s[len("oci:") :]
    elif s.startswith("oci-archive:"):
        scheme, rest = "oci-archive", s[len("oci-archive:") :]
    else:
        raise UsageError(
            f"invalid OCI layout location {json.dumps(s)}: expected oci:PATH[:tag] or "
            "oci-archive:FILE[:tag]"
        )
    digest: str | None = None
    head, at, tail = rest.rpartition("@")
    if at:
        try:
            _check_digest(tail)
        except _Invalid:
            pass
        else:
            rest, digest = head, tail
    tag: str | None = None
    colon = rest.rfind(":")
    if colon != -1:
        candidate = rest[colon + 1 :]
        if candidate == "":
            rest = rest[:colon]
        else:
            try:
                _check_tag(candidate)
            except _Invalid:
                pass
            else:
                rest, tag = rest[:colon], candidate
    if rest == "":
        raise UsageError(f"invalid OCI layout location {json.dumps(s)}: the path is empty")
    if "\0" in rest:
        raise UsageError(f"invalid OCI layout location {json.dumps(s)}: NUL in path")
    # a Path's spelling, as the layout ends show it ("dir/" is "dir")
    return Reference.layout(scheme, os.fspath(_PurePath(rest)), tag, digest)


def parse_location(s: str) -> Reference:
    """An image location as a user types it: ``host[:port]/repo[:tag][@digest]``,
    ``oci:PATH[:tag]`` or ``oci-archive:FILE[:tag]``."""
    if s.startswith(("oci:", "oci-archive:")):
        return parse_layout(s)
    return parse(s)


def parse_registry_host(value: str) -> str:
    """``HOST[:PORT]`` (a URL is accepted: its scheme and path are dropped) -> the canonical
    registry name, as references spell it (:func:`parse_registry`'s :attr:`Registry.name`)."""
    try:
        return parse_registry(value, url=True).name
    except ReferenceError as e:
        if e.message == MISSING_HOST:
            raise
        raise UsageError(f"not a registry host: {value!r} (expected HOST[:PORT])") from None


def cached_spelling(registry: str, repository: str, tag: str, digest: str) -> str:
    """The one spelling of a cached reference (a catalog row): ``list`` shows it, and ``get``,
    ``verify``, ``clone``, ``delete`` and ``pull`` take it back (:func:`parse_location` reads
    it as the same :meth:`Reference.cache_key`)."""
    if registry in LAYOUT_SCHEMES:
        text = f"{registry}:{repository}"
        if tag:
            return f"{text}:{tag}"
        # a path whose last ':' is followed by something tag-like needs the empty tag ("…:")
        return text if parse_layout(text).tag is None else f"{text}:"
    return f"{registry}/{repository}:{tag}" if tag else f"{registry}/{repository}@{digest}"
