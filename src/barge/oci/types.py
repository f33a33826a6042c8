"""OCI data model: media types, descriptors, manifests and indexes.

Pure data, no I/O. ``Manifest`` is what a registry served (exact bytes + media type + digest);
``ImageManifest`` and ``Index`` are the parsed views, which also serialise (``to_bytes``)
for writers. Unknown fields are kept in ``extra`` so a round trip does not lose them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from barge.untrusted import load_json

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_ACCEPT",
    "OCI_EMPTY_JSON",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "ImageManifest",
    "Index",
    "Manifest",
    "Platform",
    "is_digest",
    "sha256_digest",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def _optional_str(d: dict[str, Any], key: str, what: str) -> str | None:
    """``d[key]`` when it is a string, None when absent; ValueError for any other type."""
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what} {key!r} is not a string")
    return value


def is_digest(s: str) -> bool:
    return bool(_DIGEST.match(s))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Platform:
        return cls(
            architecture=str(d.get("architecture", "")),
            os=str(d.get("os", "")),
            variant=_optional_str(d, "variant", "platform"),
            os_version=_optional_str(d, "os.version", "platform"),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            d["os.version"] = self.os_version
        if self.variant:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, d: Any) -> Descriptor:
        if not isinstance(d, dict):
            raise ValueError("descriptor is not an object")
        known = {"mediaType", "digest", "size", "annotations", "platform", "artifactType", "urls"}
        size = d.get("size")
        digest = d.get("digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor has an invalid size: {size!r}")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ValueError(f"descriptor has an invalid digest: {digest!r}")
        ann = d.get("annotations")
        plat = d.get("platform")
        urls = d.get("urls")
        return cls(
            media_type=str(d.get("mediaType", "")),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else None,
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
            artifact_type=_optional_str(d, "artifactType", "descriptor"),
            urls=tuple(str(u) for u in urls) if isinstance(urls, list) else None,
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_json()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        d.update(self.extra)
        return d


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = OCI_MANIFEST
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None
    subject: Descriptor | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, doc: Any, media_type: str | None = None) -> ImageManifest:
        if not isinstance(doc, dict):
            raise ValueError("manifest is not a JSON object")
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise ValueError("manifest layers is not a list")
        ann = doc.get("annotations")
        subj = doc.get("subject")
        known = {
            "schemaVersion",
            "mediaType",
            "config",
            "layers",
            "annotations",
            "artifactType",
            "subject",
        }
        return cls(
            config=Descriptor.from_json(doc.get("config")),
            layers=[Descriptor.from_json(x) for x in layers],
            media_type=str(doc.get("mediaType") or media_type or OCI_MANIFEST),
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else None,
            artifact_type=_optional_str(doc, "artifactType", "manifest"),
            subject=Descriptor.from_json(subj) if isinstance(subj, dict) else None,
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        d["config"] = self.config.to_json()
        d["layers"] = [x.to_json() for x in self.layers]
        if self.subject:
            d["subject"] = self.subject.to_json()
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        d.update(self.extra)
        return d

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json())


@dataclass(frozen=True)
class Index:
    manifests: list[Descriptor]
    media_type: str = OCI_INDEX
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None
    subject: Descriptor | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, doc: Any, media_type: str | None = None) -> Index:
        if not isinstance(doc, dict):
            raise ValueError("index is not a JSON object")
        ms = doc.get("manifests", [])
        if not isinstance(ms, list):
            raise ValueError("index manifests is not a list")
        ann = doc.get("annotations")
        subj = doc.get("subject")
        known = {
            "schemaVersion",
            "mediaType",
            "manifests",
            "annotations",
            "artifactType",
            "subject",
        }
        return cls(
            manifests=[Descriptor.from_json(x) for x in ms],
            media_type=str(doc.get("mediaType") or media_type or OCI_INDEX),
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else None,
            artifact_type=_optional_str(doc, "artifactType", "manifest"),
            subject=Descriptor.from_json(subj) if isinstance(subj, dict) else None,
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        d["manifests"] = [x.to_json() for x in self.manifests]
        if self.subject:
            d["subject"] = self.subject.to_json()
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        d.update(self.extra)
        return d

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json())


@dataclass(frozen=True)
class Manifest:
    """A manifest as served: the exact bytes, their media type and digest."""

    data: bytes
    media_type: str
    digest: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def json(self) -> Any:
        """The parsed manifest; :class:`~barge.untrusted.JSONError` (a ``ValueError``) if it
        is not JSON or nested or sized beyond the bounds of :func:`~barge.untrusted.load_json`."""
        return load_json(self.data, f"manifest {self.digest}")

    def image(self) -> ImageManifest:
        """The parsed image manifest; ValueError if this is an index or malformed."""
        if self.is_index:
            raise ValueError(f"{self.digest} is an index, not an image manifest")
        return ImageManifest.from_json(self.json(), self.media_type)

    def index(self) -> Index:
        if not self.is_index:
            raise ValueError(f"{self.digest} is not an index")
        return Index.from_json(self.json(), self.media_type)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))

    def __repr__(self) -> str:
        return f"Manifest(media_type={self.media_type!r}, digest={self.digest!r}, size={len(self.data)})"


def media_type_of(data: bytes, content_type: str | None) -> str:
    """The manifest's media type: its own ``mediaType`` field, else the Content-Type header."""
    ct = (content_type or "").split(";")[0].strip()
    try:
        doc = load_json(data, "manifest")
    except ValueError:
        return ct
    if isinstance(doc, dict):
        mt = doc.get("mediaType")
        if isinstance(mt, str) and mt:
            return mt
        if ct in IMAGE_TYPES or ct in INDEX_TYPES:
            return ct
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc:
            return OCI_MANIFEST
    return ct
