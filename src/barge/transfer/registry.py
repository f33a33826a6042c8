"""The registry end: one repository in one registry, reached through :mod:`barge.oci`.

This is the one module above :mod:`barge.oci` that uses :class:`~barge.oci.RegistryClient`
(and reads the per-host settings it holds: layer caps, upload chunk sizes). The repository's
:class:`~barge.reference.Reference` is passed whole to every call. It also records in the
catalog where each blob was seen, which is what later mounts are made from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO

from barge.oci.auth import CredentialStore
from barge.oci.client import RegistryClient, labelled
from barge.oci.mirrors import MirroredClient, source_client
from barge.oci.types import Descriptor, Manifest, sha256_digest
from barge.reference import Reference
from barge.store import Store
from barge.transfer.base import EndBase
from barge.transfer.end import End, OpenAt, Produce, Progress, Reuse

__all__ = [
    "Clients",
    "RegistryEnd",
    "check_login",
    "forget_login",
    "labelled_transfer",
    "save_login",
]


def labelled_transfer(label: str) -> AbstractContextManager[None]:
    """Name the transfers this thread starts in their error messages ("chunk 3/40 of
    disk.img")."""
    return labelled(label)


class Clients:
    """One registry client per registry host, shared by the ends of one operation."""

    def __init__(self, store: Store, *, insecure: bool = False) -> None:
        self.store = store
        self.insecure = insecure
        self._clients: dict[str, RegistryClient] = {}
        self._sources: list[RegistryClient | MirroredClient] = []

    def get(self, registry: str) -> RegistryClient:
        if registry not in self._clients:
            self._clients[registry] = RegistryClient(
                registry, insecure=self.insecure, home=self.store.home
            )
        return self._clients[registry]

    def source(
        self, ref: Reference, *, mirrors: bool, note: Callable[[str], None]
    ) -> RegistryClient | MirroredClient:
        """The client to read ``ref`` with, through the registry configuration's mirrors
        (``mirrors=False``: ``--no-mirrors``); its own, closed with the others."""
        client = source_client(
            ref, insecure=self.insecure, home=self.store.home, mirrors=mirrors, note=note
        )
        self._sources.append(client)
        return client

    def close(self) -> None:
        for s in self._sources:
            s.close()
        self._sources.clear()
        for c in self._clients.values():
            c.close()
        self._clients.clear()


class RegistryEnd(EndBase):
    """One repository in one registry."""

    verifies_reads = True  # a whole-blob read is checked against its digest at EOF

    def __init__(
        self,
        store: Store,
        client: RegistryClient | MirroredClient,
        ref: Reference,
        *,
        upload_chunk_size: int | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.ref: Reference = ref.without_tag_or_digest()
        self.repo = ref.repository
        self.host = ref.registry  # the registry, as a str (``registry`` is the End protocol's)
        self.registry = ref.registry
        self.label = f"{ref.registry}/{ref.repository}"
        self.upload_chunk_size = upload_chunk_size
        #: the number of layers the registry accepts per manifest, when barge knows it
        self.layer_limit = client.settings.layer_limit

    # -- what barge knows of this registry -------------------------------------------------
    @property
    def host_upload_chunk_size(self) -> int | None:
        """The PATCH body size this registry needs (None: monolithic uploads)."""
        return self.client.settings.upload_chunk_size

    # -- as a source -----------------------------------------------------------------------
    def get_manifest(self, reference: str) -> Manifest:
        return self.client.get_manifest(self.ref.at(reference))

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        return self.client.open_blob(self.ref, digest, offset=offset)  # type: ignore[return-value]

    def read_blob(self, digest: str, max_size: int) -> bytes:
        return self.client.read_blob(self.ref, digest, max_size=max_size)

    def list_tags(self) -> list[str]:
        return self.client.list_tags(self.ref)

    def seen(self, digests: list[str]) -> None:
        """Record that this repository holds ``digests`` (later mounts come from here)."""
        self.store.catalog.add_blob_locations(digests, self.host, self.repo)

    def reject_blob(self, digest: str, error: BaseException) -> bool:
        if isinstance(self.client, MirroredClient):
            return self.client.reject_blob(digest, error)
        return False

    @property
    def answered(self) -> str | None:
        """Which source answered the first manifest (read through mirrors), else None."""
        if isinstance(self.client, MirroredClient) and self.client.answered is not None:
            return self.client.answered.label
        return None

    # -- as a destination ------------------------------------------------------------------
    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        """HEAD here; then a mount from ``source``'s repository when it is on this registry;
        then from every other repository of this registry the catalog knows holds it."""
        digest = blob.digest
        if self.client.blob_exists(self.ref, digest) is not None:
            self.store.catalog.add_blob_location(digest, self.host, self.repo)
            return Reuse.PRESENT
        for other in self._mount_sources(digest, source):
            if self.client.mount_blob(self.ref, digest, Reference(self.host, other)):
                self.store.catalog.add_blob_location(digest, self.host, self.repo)
                return Reuse.MOUNTED
        return None

    def _mount_sources(self, digest: str, source: End | None) -> Iterator[str]:
        tried = {self.repo}
        src = source.ref if source is not None else None
        same_registry = src is not None and not src.is_layout and src.registry == self.host
        if same_registry and src is not None and src.repository not in tried:
            tried.add(src.repository)
            yield src.repository
        for other in self.store.catalog.blob_repositories(digest, self.host):
            if other not in tried:
                tried.add(other)
                yield other

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        self.client.upload_blob(
            self.ref,
            blob.digest,
            blob.size,
            open_at,
            chunk_size=self.upload_chunk_size,
            progress=progress,
        )
        self.store.catalog.add_blob_location(blob.digest, self.host, self.repo)

    def put_stream(
        self,
        produce: Produce,
        progress: Progress | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        """Upload a blob while it is produced; returns its (digest, size). ``resume_key``
        (naming exactly the bytes ``produce`` yields) lets a later run continue the upload."""
        digest, size = self.client.upload_stream(
            self.ref,
            produce,
            chunk_size=self.upload_chunk_size,
            progress=progress,
            before_commit=before_commit,
            resume_key=resume_key,
        )
        self.store.catalog.add_blob_location(digest, self.host, self.repo)
        return digest, size

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        target = self.ref.with_tag(tag) if tag else self.ref.with_digest(sha256_digest(data))
        return self.client.put_manifest(target, data, media_type)


def check_login(
    store: Store, registry: str, username: str, password: str, *, insecure: bool = False
) -> None:
    """Check that ``registry`` accepts these credentials (it answers ``/v2/`` with them)."""
    with RegistryClient(
        registry,
        insecure=insecure,
        home=store.home,
        credentials=CredentialStore.fixed(username, password),
    ) as client:
        client.ping()


def save_login(store: Store, registry: str, username: str, password: str) -> None:
    """Keep credentials for ``registry`` in the store's ``auth.json`` (mode 0600)."""
    CredentialStore(store.home).save(registry, username, password)


def forget_login(store: Store, registry: str) -> bool:
    """Drop the credentials kept for ``registry``; whether there were any."""
    return CredentialStore(store.home).remove(registry)
