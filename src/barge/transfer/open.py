"""Opening ends: every rule about what a typed location means lives here, and only here.

:meth:`Ends.open` turns what a user typed into an end and what to read or write there:

* **Forms.** ``myvm`` (a local VM, where the verb takes one), ``host[:port]/repo[:tag][@digest]``,
  ``oci:DIR[:tag]``, ``oci-archive:FILE[:tag]``; for export and import also a bare path (one
  ending in ``.tar`` is an archive, any other a directory).
* **Sources.** A registry reference with neither tag nor digest reads ``latest`` (and, for the
  verbs that move an image, says so). A layout without a tag reads ``latest``, or the layout's
  only image when none is tagged ``latest``.
* **Destinations.** A digest is refused (a digest names existing content). A registry
  reference without a tag gets ``latest`` where the verb creates an image (push, ``--index``;
  push says so), or keeps the source's tag where it copies one (copy, export of an image); a
  layout likewise.
* **Platforms.** :meth:`Opened.manifest`: an image index is resolved to one platform's
  manifest (``--platform``, default this host) where the verb needs one image (pull, clone,
  import), and kept whole unless ``--platform`` is given where it copies or checks images
  (copy, verify, export).

One registry client per registry is shared by the ends of one :class:`Ends`, and
:meth:`Ends.close` closes everything it opened.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from barge.errors import NotFoundError, UsageError
from barge.oci.types import INDEX_TYPES, Manifest
from barge.reference import (
    Reference,
    looks_like_reference,
    parse_location,
    parse_repository,
)
from barge.store import Store
from barge.transfer.end import End
from barge.transfer.layout import ArchiveReadEnd, ArchiveWriteEnd, LayoutEnd
from barge.transfer.registry import Clients, RegistryEnd

__all__ = [
    "Ends",
    "Opened",
    "Role",
    "Verb",
    "host_platform",
    "is_vm_name",
    "layout_text",
    "select_platform",
]

Role = Literal["source", "destination"]
#: The verbs, each with its own few rules (see the module docstring).
Verb = Literal[
    "push",
    "index",
    "pull",
    "copy",
    "tag",
    "verify",
    "export",
    "export-vm",
    "import",
    "clone",
    "inspect",
]

#: Verbs that say when ``latest`` was filled in for a source without tag or digest.
_SAYS_LATEST = {"pull": "pulling", "copy": "copying", "clone": "pulling", "export": "copying"}
#: Verbs whose registry destination without a tag keeps the source image's tag.
_KEEPS_SOURCE_TAG = {"copy", "export"}
#: Verbs that take a bare path for a layout.
_TAKES_PATH = {"export", "export-vm", "import"}


def is_vm_name(text: str) -> bool:
    """A local VM's name rather than an image location (VM names never contain ``/``, ``:``
    or ``@``)."""
    return not looks_like_reference(text)


def host_platform() -> str:
    """This host's platform in OCI terms: ``linux/amd64``, ``linux/arm64``."""
    m = _platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)
    return f"linux/{arch}"


def layout_text(path: str) -> str:
    """``oci:DIR[:tag]`` / ``oci-archive:FILE[:tag]`` as given; a bare path ending in ``.tar``
    is an archive, any other bare path a directory."""
    if path.startswith(("oci:", "oci-archive:")):
        return path
    if not path:
        raise UsageError("give a path for the OCI layout")
    return f"oci-archive:{path}" if path.endswith(".tar") else f"oci:{path}"


def select_platform(end: End, manifest: Manifest, want: str | None) -> Manifest:
    """Resolve an index to the manifest for ``want`` (default: this host's platform)."""
    if manifest.media_type not in INDEX_TYPES:
        return manifest
    index = manifest.index()
    target = want or host_platform()
    parts = target.split("/")
    if len(parts) < 2:
        raise UsageError(f"invalid --platform {target!r}: expected OS/ARCH, e.g. linux/amd64")
    os_name, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) > 2 else None
    available = []
    for d in index.manifests:
        p = d.platform
        if p is None:
            continue
        available.append(str(p))
        if p.os == os_name and p.architecture == arch and (variant is None or p.variant == variant):
            return end.get_manifest(d.digest)
    raise NotFoundError(
        f"the image index has no manifest for {target}",
        hint=f"available: {', '.join(available) or 'none'}; choose one with --platform",
    )


@dataclass
class Opened:
    """An opened location: its end, and what to read or write there."""

    text: str
    """What the user typed."""
    end: End
    ref: Reference
    """The location with the tag (and digest) to use."""
    given: Reference
    """The location as typed (no ``latest`` filled in)."""
    defaulted: bool = False
    """``latest`` was filled in (a source: or no tag was given for a layout)."""

    @property
    def tag(self) -> str | None:
        return self.ref.tag

    @property
    def reference(self) -> str:
        """What a source is asked for: the digest, else the tag, else ``latest``."""
        return self.ref.ref

    def manifest(self, platform: str | None = None, *, one_image: bool = False) -> Manifest:
        """The source's manifest: with ``one_image`` an index is resolved to ``platform``'s
        image (this host's by default), else only when ``platform`` is given."""
        top = self._top()
        if one_image or (platform and top.is_index):
            return select_platform(self.end, top, platform)
        return top

    def _top(self) -> Manifest:
        if not (self.ref.is_layout and self.defaulted):
            return self.end.get_manifest(self.reference)
        # "latest" is only the default name: a layout whose one image is untagged answers
        try:
            return self.end.get_manifest("latest")
        except NotFoundError:
            if getattr(self.end, "images", lambda: 0)() == 0:
                raise
            return self.end.get_manifest("")


class Ends:
    """Opens ends for typed locations; closes them all at :meth:`close`."""

    def __init__(
        self,
        store: Store,
        *,
        insecure: bool = False,
        note: Callable[[str], None] | None = None,
        upload_chunk_size: int | None = None,
        host_upload_defaults: bool = False,
        mirrors: bool | None = None,
    ) -> None:
        self.store = store
        #: a registry source is read per the registry configuration (its ``location`` and
        #: ``blocked``), through its mirrors when True (pull, clone, copy; False:
        #: ``--no-mirrors``); None: as named, with no configuration (inspect, tag, verify)
        self.mirrors = mirrors
        self.clients = Clients(store, insecure=insecure)
        self.note = note or (lambda _m: None)
        self.upload_chunk_size = upload_chunk_size
        self.host_upload_defaults = host_upload_defaults
        self._opened: dict[tuple[str, Role], End] = {}

    def __enter__(self) -> Ends:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for end in reversed(list(self._opened.values())):
            end.close()
        self._opened.clear()
        self.clients.close()

    # -- the rules -------------------------------------------------------------------------
    def open(self, text: str, role: Role, verb: Verb) -> Opened:
        """The end ``text`` names, as ``role`` of ``verb``."""
        if verb in _TAKES_PATH and not (role == "source" and verb == "export"):
            text = layout_text(text)
        ref = parse_location(text)
        if role == "source":
            return self._source(text, ref, verb)
        return self._destination(text, ref, verb)

    def _source(self, text: str, ref: Reference, verb: Verb) -> Opened:
        if verb == "tag" and ref.is_layout:
            raise UsageError("barge tag works on registry references; use barge copy for layouts")
        defaulted = ref.tag is None and ref.digest is None
        given = ref
        if defaulted and not ref.is_layout:
            ref = ref.with_tag("latest")
            if verb in _SAYS_LATEST:
                self.note(f"no tag given: {_SAYS_LATEST[verb]} {ref}")
        end = self._end(ref, "source", verb)
        return Opened(text, end, ref, given, defaulted=defaulted)

    def _destination(self, text: str, ref: Reference, verb: Verb) -> Opened:
        if ref.digest:
            keeps = " or no tag (the source's tag is kept)" if verb in _KEEPS_SOURCE_TAG else ""
            raise UsageError(
                f"cannot {_verb_text(verb)} to {text!r}: a digest names existing content; "
                f"give a tag{keeps}"
            )
        if verb == "index" and ref.is_layout:
            raise UsageError(f"--index needs a registry reference, not {text!r}")
        given = ref
        defaulted = ref.tag is None
        if defaulted and verb not in _KEEPS_SOURCE_TAG:
            ref = ref.with_tag("latest")
            if verb == "push" and not ref.is_layout:
                self.note(f"no tag given in {text!r}: pushing {ref}")
        end = self._end(ref, "destination", verb)
        return Opened(text, end, ref, given, defaulted=defaulted)

    def open_all_tags(self, source: str, destination: str) -> tuple[Opened, Opened, list[str]]:
        """``copy --all-tags``: a registry repository as the source (no tag or digest) and a
        destination without a tag; the source's tags, sorted."""
        sref = parse_location(source)
        if sref.is_layout:
            raise UsageError("--all-tags copies a registry repository; give one as the source")
        if sref.tag or sref.digest:
            raise UsageError("--all-tags takes a repository without a tag or digest")
        dref = parse_location(destination)
        if dref.tag and not dref.is_layout:
            raise UsageError("--all-tags keeps the source's tags: give a destination repository")
        if dref.tag:
            raise UsageError("--all-tags keeps the source's tags: give no tag in the destination")
        src = Opened(source, self._end(sref, "source", "copy"), sref, sref)
        dst = self._destination(destination, dref, "copy")
        return src, dst, sorted(set(src.end.list_tags()))

    def open_repository(self, text: str) -> RegistryEnd:
        """A registry repository named without tag or digest (``barge tags``)."""
        end = self._end(parse_repository(text), "source", "inspect")
        assert isinstance(end, RegistryEnd)
        return end

    def registry_end(self, ref: Reference) -> RegistryEnd:
        """The end of ``ref``'s repository (a registry reference)."""
        end = self._end(ref, "source", "inspect")
        assert isinstance(end, RegistryEnd)
        return end

    # -- making ends -----------------------------------------------------------------------
    def _end(self, ref: Reference, role: Role, verb: Verb) -> End:
        """One end per repository or layout and role: the tags of one repository share it."""
        key = (ref.name, role)
        if key in self._opened:
            return self._opened[key]
        end: End
        if ref.is_layout and verb == "import" and not Path(str(ref.path)).exists():
            raise NotFoundError(f"no OCI layout at {ref.path}")
        if not ref.is_layout:
            chunk = self.upload_chunk_size
            if role == "source" and self.mirrors is not None:  # registries.conf: mirrors
                client = self.clients.source(ref, mirrors=self.mirrors, note=self.note)
                end = RegistryEnd(self.store, client, ref)
            else:
                end = RegistryEnd(self.store, self.clients.get(ref.registry), ref)
            if role == "destination" and chunk is None and self.host_upload_defaults:
                chunk = end.host_upload_chunk_size
            end.upload_chunk_size = chunk
        else:
            assert ref.path is not None
            path = Path(ref.path)
            if ref.scheme == "oci":
                end = LayoutEnd(path, create=role == "destination")
            elif role == "source":
                end = ArchiveReadEnd(path)
            else:
                if path.is_dir():
                    raise UsageError(f"cannot write the archive {path}: it is a directory")
                end = ArchiveWriteEnd(path)
        self._opened[key] = end
        return end

    def reopen_archive(self, end: End) -> End:
        """An archive just written (and committed), opened for reading."""
        assert isinstance(end, ArchiveWriteEnd)
        reader = ArchiveReadEnd(end.path)
        self._opened[(f"{end.label}#read", "source")] = reader
        return reader


def _verb_text(verb: Verb) -> str:
    return {"index": "push", "export-vm": "export"}.get(verb, verb)
