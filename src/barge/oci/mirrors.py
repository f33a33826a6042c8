"""Reading through mirrors: one reference read from its sources in order.

:func:`source_client` is what a command opens for a registry it reads from: a plain
:class:`~barge.oci.client.RegistryClient` when the registry configuration
(:mod:`barge.oci.registries_conf`) has no ``[[registry]]`` table for the reference, else a
:class:`MirroredClient` with the same read methods, which tries the table's mirrors in order
and then the upstream location:

* a source that cannot be reached or times out is marked down for the rest of the operation;
  one that answers 404, 5xx or an auth error for a manifest or blob is skipped for it; each
  skip is a note (``note``), and the next source is tried;
* a blob stream that breaks part-way continues from the next source at the same offset
  (``Range``); a whole blob is checked against its digest whatever the sources, and one that
  fails is reported (:class:`~barge.oci.errors.DigestMismatch`) with the source marked bad
  for that blob: the caller asks :meth:`MirroredClient.reject_blob` whether another source
  remains and reads it again (a caller that checks frames itself reports a bad one the
  same way);
* which source answered the first manifest is :attr:`MirroredClient.answered` (the pull's
  summary and JSON say it);
* when every source fails, one error lists each source and why (its exit code is the
  upstream's error's).

Each source has its own client, so credentials are looked up for the host actually contacted
(``auth.json``'s entry for a mirror host, or none): the upstream's are never sent to a mirror.
Mirrors get at most :data:`MIRROR_RETRY_TIMEOUT` seconds of retrying without progress, so a
dead mirror costs seconds, not the upstream's full retry budget. Writes (a push, a copy's
destination) never come here: they use the reference's own registry, as podman does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from barge.errors import AuthError, BargeError, RegistryError
from barge.oci.auth import CredentialStore
from barge.oci.client import RegistryClient
from barge.oci.errors import DigestMismatch, RegistryResponseError, RegistryUnreachable
from barge.oci.registries_conf import RegistriesConf, Source, load
from barge.oci.settings import HostSettings, settings_for
from barge.oci.types import Descriptor, Manifest
from barge.reference import Reference

__all__ = [
    "MIRROR_RETRY_TIMEOUT",
    "AllSourcesFailed",
    "MirroredClient",
    "effective",
    "source_client",
]

MIRROR_RETRY_TIMEOUT = 10.0

Note = Callable[[str], None]


class AllSourcesFailed(RegistryError):
    """Every source of a reference failed; the message lists each and why."""

    def __init__(self, what: str, failures: list[tuple[str, BaseException]]) -> None:
        lines = "; ".join(f"{label}: {_reason(e)}" for label, e in failures)
        super().__init__(f"{what}: every source failed ({lines})")
        last = failures[-1][1] if failures else None
        if isinstance(last, BargeError):  # the upstream's answer decides the exit code
            self.exit_code = last.exit_code
        self.failures = failures


def source_client(
    ref: Reference,
    *,
    insecure: bool = False,
    home: Path | None = None,
    mirrors: bool = True,
    note: Note | None = None,
    conf: RegistriesConf | None = None,
) -> RegistryClient | MirroredClient:
    """The client to read ``ref`` with (module doc); ``mirrors=False`` is ``--no-mirrors``.
    A blocked reference is a UsageError."""
    conf = conf if conf is not None else load()
    if conf.rule_for(ref) is None:
        return RegistryClient(ref.registry, insecure=insecure, home=home)
    return MirroredClient(ref, conf, insecure=insecure, home=home, mirrors=mirrors, note=note)


class MirroredClient:
    """The read side of a :class:`RegistryClient` over a reference's sources (module doc).
    Every ``ref`` passed is a reference as the user named it (the logical name)."""

    def __init__(
        self,
        ref: Reference,
        conf: RegistriesConf,
        *,
        insecure: bool = False,
        home: Path | None = None,
        mirrors: bool = True,
        note: Note | None = None,
        credentials: CredentialStore | None = None,
    ) -> None:
        self.conf = conf
        self.ref = ref
        self.registry = ref.registry
        self.sources = conf.sources(ref, mirrors=mirrors)  # raises for a blocked reference
        self.note = note or (lambda _msg: None)
        self._insecure = insecure
        self._home = home
        self._credentials = credentials
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()
        self.down: dict[str, str] = {}  # source label -> why it is skipped from now on
        self._bad: set[tuple[str, str]] = set()  # (source label, digest) that failed it
        self._serving: dict[str, Source] = {}  # digest -> the source that last served it
        self.answered: Source | None = None
        self.upstream = self.sources[-1]
        self.settings: HostSettings = self.client(self.upstream).settings

    # -- the sources -----------------------------------------------------------------------
    def client(self, source: Source) -> RegistryClient:
        host = source.at(self.ref).registry_host
        with self._lock:
            c = self._clients.get(host.name)
            if c is None:
                s = settings_for(host, hosts=self.conf.hosts, insecure=self._insecure)
                if source.insecure and not s.insecure:
                    s = replace(s, insecure=True)
                if source.role == "mirror" and s.retry_timeout > MIRROR_RETRY_TIMEOUT:
                    s = replace(s, retry_timeout=MIRROR_RETRY_TIMEOUT)
                c = RegistryClient(host, home=self._home, credentials=self._credentials, settings=s)
                self._clients[host.name] = c
            return c

    def _candidates(self, ref: Reference, digest: str | None = None) -> list[Source]:
        out = []
        for s in self.sources:
            if s.label in self.down:
                continue
            if digest is not None and (s.label, digest) in self._bad:
                continue
            out.append(s)
        return out

    def _skip(self, source: Source, what: str, e: BaseException) -> None:
        if isinstance(e, RegistryUnreachable):
            with self._lock:
                self.down[source.label] = _reason(e)
        if source is not self.upstream:
            self.note(f"{source.label} skipped for {what}: {_reason(e)}")

    def _each(
        self,
        ref: Reference,
        what: str,
        call: Callable[[RegistryClient, Reference], Any],
        digest: str | None = None,
    ) -> tuple[Source, Any]:
        """``call`` on each candidate source in order until one answers."""
        failures: list[tuple[str, BaseException]] = []
        for source in self._candidates(ref, digest):
            try:
                return source, call(self.client(source), source.at(ref))
            except (RegistryError, AuthError, DigestMismatch) as e:
                if len(self.sources) == 1:
                    raise
                failures.append((source.label, e))
                self._skip(source, what, e)
        raise AllSourcesFailed(
            what, failures or [(s.label, _Down(self.down.get(s.label, ""))) for s in self.sources]
        )

    # -- manifests and tags ----------------------------------------------------------------
    def get_manifest(self, ref: Reference) -> Manifest:
        source, m = self._each(ref, f"manifest {ref}", lambda c, r: c.get_manifest(r))
        if self.answered is None:
            self.answered = source
            if source is not self.sources[0]:
                self.note(f"{ref} answered by {source.label}")
        return m  # type: ignore[no-any-return]

    def head_manifest(self, ref: Reference) -> Descriptor | None:
        return self._each(ref, f"manifest {ref}", lambda c, r: c.head_manifest(r))[1]  # type: ignore[no-any-return]

    def list_tags(self, ref: Reference) -> list[str]:
        return self._each(ref, f"tags of {ref.name}", lambda c, r: c.list_tags(r))[1]  # type: ignore[no-any-return]

    def referrers(
        self, ref: Reference, artifact_type: str | None = None
    ) -> list[Descriptor] | None:
        return self._each(ref, f"referrers of {ref}", lambda c, r: c.referrers(r, artifact_type))[1]  # type: ignore[no-any-return]

    # -- blobs -----------------------------------------------------------------------------
    def blob_exists(self, ref: Reference, digest: str) -> int | None:
        for source in self._candidates(ref, digest):
            try:
                size = self.client(source).blob_exists(source.at(ref), digest)
            except (RegistryError, AuthError) as e:
                self._skip(source, f"blob {digest}", e)
                continue
            if size is not None:
                return size
        return None

    def read_blob(self, ref: Reference, digest: str, *, max_size: int) -> bytes:
        source, data = self._each(
            ref, f"blob {digest}", lambda c, r: c.read_blob(r, digest, max_size=max_size), digest
        )
        return data  # type: ignore[no-any-return]

    def open_blob(
        self, ref: Reference, digest: str, *, offset: int = 0, length: int | None = None
    ) -> _FallbackReader:
        return _FallbackReader(self, ref, digest, offset, length)

    def reject_blob(self, digest: str, error: BaseException) -> bool:
        """The blob ``digest`` last served failed a check (``error``): mark its source bad
        for it; True when another source remains to read it from."""
        source = self._serving.get(digest)
        if source is None:
            return False
        with self._lock:
            self._bad.add((source.label, digest))
        remaining = self._candidates(self.ref, digest)
        if remaining:
            self.note(
                f"{source.label} skipped for blob {digest}: {_reason(error)}; "
                f"reading it from {remaining[0].label}"
            )
        return bool(remaining)

    # -- writes go to the upstream location (a source end is never written to) -------------
    def mount_blob(self, ref: Reference, digest: str, source: Reference) -> bool:
        return self.client(self.upstream).mount_blob(self.upstream.at(ref), digest, source)

    def upload_blob(
        self, ref: Reference, digest: str, size: int, open_at: Callable[[int], BinaryIO], **kw: Any
    ) -> None:
        self.client(self.upstream).upload_blob(self.upstream.at(ref), digest, size, open_at, **kw)

    def upload_stream(
        self, ref: Reference, produce: Callable[[], Iterable[bytes]], **kw: Any
    ) -> tuple[str, int]:
        return self.client(self.upstream).upload_stream(self.upstream.at(ref), produce, **kw)

    def put_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        return self.client(self.upstream).put_manifest(self.upstream.at(ref), data, media_type)

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()

    def __enter__(self) -> MirroredClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FallbackReader(io.RawIOBase):
    """A blob stream that moves to the next source when one fails part-way (module doc)."""

    def __init__(
        self, owner: MirroredClient, ref: Reference, digest: str, offset: int, length: int | None
    ) -> None:
        self.owner = owner
        self.ref = ref
        self.digest = digest
        self.start = offset
        self.length = length
        self.pos = 0  # bytes delivered
        self.whole = offset == 0 and length is None
        self._hash = hashlib.sha256() if self.whole and len(owner.sources) > 1 else None
        self._inner: Any = None
        self._source: Source | None = None
        self._failures: list[tuple[str, BaseException]] = []
        self.total_size: int | None = None
        self._open()

    def _open(self) -> None:
        owner = self.owner
        while True:
            candidates = owner._candidates(self.ref, self.digest)
            if not candidates:
                raise AllSourcesFailed(f"blob {self.digest}", self._failures)
            source = candidates[0]
            left = None if self.length is None else self.length - self.pos
            try:
                inner = owner.client(source).open_blob(
                    source.at(self.ref), self.digest, offset=self.start + self.pos, length=left
                )
            except (RegistryError, AuthError) as e:
                if len(owner.sources) == 1:
                    raise
                self._failed(source, e)
                continue
            self._inner, self._source = inner, source
            owner._serving[self.digest] = source
            if self.total_size is None:
                self.total_size = getattr(inner, "total_size", None)
            return

    def _failed(self, source: Source, e: BaseException) -> None:
        self._failures.append((source.label, e))
        with self.owner._lock:
            self.owner._bad.add((source.label, self.digest))
        self.owner._skip(source, f"blob {self.digest}", e)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while True:
            try:
                n = int(self._inner.readinto(b) or 0)
            except DigestMismatch:
                assert self._source is not None
                with self.owner._lock:
                    self.owner._bad.add((self._source.label, self.digest))
                raise
            except (RegistryError, AuthError) as e:
                if len(self.owner.sources) == 1 or self._source is None:
                    raise
                self._close_inner()
                self._failed(self._source, e)
                self._open()
                continue
            if n:
                self.pos += n
                if self._hash is not None:
                    self._hash.update(memoryview(b)[:n])
                return n
            if self._hash is not None:
                actual = "sha256:" + self._hash.hexdigest()
                self._hash = None
                if actual != self.digest:
                    assert self._source is not None
                    with self.owner._lock:
                        self.owner._bad.add((self._source.label, self.digest))
                    raise DigestMismatch(f"blob from {self._source.label}", self.digest, actual)
            return 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while piece := self.read(1 << 20):
                chunks.append(piece)
            return b"".join(chunks)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def _close_inner(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            with contextlib.suppress(Exception):  # a broken stream being dropped
                inner.close()

    def close(self) -> None:
        if not self.closed:
            self._close_inner()
        super().close()


class _Down(Exception):
    def __str__(self) -> str:
        return self.args[0] if self.args and self.args[0] else "skipped"


def _reason(e: BaseException) -> str:
    if isinstance(e, RegistryResponseError) and getattr(e, "status", None):
        return f"HTTP {e.status}: {getattr(e, 'message', str(e))}"
    return getattr(e, "message", None) or str(e) or type(e).__name__


def effective(
    ref: Reference,
    *,
    home: Path | None = None,
    insecure: bool = False,
    mirrors: bool = True,
    conf: RegistriesConf | None = None,
) -> dict[str, Any]:
    """What reading ``ref`` would use (``barge config show``): the files read, the
    ``[[registry]]`` table chosen, each source in order with its host's settings and whether
    credentials are stored for that host (never the credentials themselves)."""
    conf = conf if conf is not None else load()
    rule = conf.rule_for(ref)
    out: dict[str, Any] = {
        "reference": str(ref),
        "files": list(conf.files),
        "warnings": list(conf.warnings),
        "table": None,
        "blocked": bool(rule and rule.blocked),
        "sources": [],
        "push": str(ref),  # pushes go to the reference's own registry
    }
    if rule is not None:
        out["table"] = {"prefix": rule.prefix, "location": rule.location, "source": rule.source}
    if rule is not None and rule.blocked:
        return out
    creds = CredentialStore(home)
    for source in conf.sources(ref, mirrors=mirrors):
        at = source.at(ref)
        s = settings_for(at.registry_host, hosts=conf.hosts, insecure=insecure or source.insecure)
        if source.role == "mirror" and s.retry_timeout > MIRROR_RETRY_TIMEOUT:
            s = replace(s, retry_timeout=MIRROR_RETRY_TIMEOUT)
        try:
            stored = creds.get(at.registry) is not None
        except BargeError:
            stored = False
        out["sources"].append(
            {
                "role": source.role,
                "location": source.name,
                "reference": str(at),
                "pullFromMirror": source.mirror.pull_from_mirror if source.mirror else None,
                "credentials": "stored" if stored else "none",
                "settings": _settings_json(s),
            }
        )
    return out


def _settings_json(s: HostSettings) -> dict[str, Any]:
    return {
        "connectTimeout": s.connect_timeout,
        "stallTimeout": s.stall_timeout,
        "retryTimeout": s.retry_timeout,
        "timeout": s.timeout,
        "layerLimit": s.layer_limit,
        "uploadChunk": s.upload_chunk,
        "insecure": s.insecure,
        "caFile": s.ca_file,
        "concurrency": s.concurrency,
    }
