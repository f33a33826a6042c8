"""Image builders: put blobs, manifests and whole images into a registry over plain HTTP,
without the client under test (so a test of the client never checks it against itself).

Helpers: :func:`put_blob`, :func:`put_manifest`, :func:`push_image`; the media types
``OCI_MANIFEST``, ``OCI_CONFIG``, ``OCI_LAYER``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from registries import RunningRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

__all__ = ["OCI_CONFIG", "OCI_LAYER", "OCI_MANIFEST", "push_image", "put_blob", "put_manifest"]


# -- helpers: seed a registry without the client under test --------------------------------------


def _auth_header(reg: RunningRegistry, repo: str) -> dict[str, str]:
    if reg.token_server is not None:
        user = next(u for u, (_p, acts) in reg.token_server.users.items() if "push" in acts)
        token = reg.token_server.issue(user, [f"repository:{repo}:pull,push"])
        return {"Authorization": f"Bearer {token}"}
    if reg.username:
        raw = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def _http(
    reg: RunningRegistry, method: str, url: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=reg.ssl_context()) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def put_blob(reg: RunningRegistry, repo: str, data: bytes) -> str:
    """Upload ``data`` as a blob (POST + PUT) with stdlib HTTP; returns its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    auth = _auth_header(reg, repo)
    _, h = _http(reg, "POST", f"{reg.url}/v2/{repo}/blobs/uploads/", b"", auth)
    loc = urllib.parse.urljoin(reg.url + "/", h["Location"])
    sep = "&" if "?" in loc else "?"
    put_url = f"{loc}{sep}digest={urllib.parse.quote(digest)}"
    _http(reg, "PUT", put_url, data, {**auth, "Content-Type": "application/octet-stream"})
    return digest


def put_manifest(
    reg: RunningRegistry, repo: str, ref: str, data: bytes, media_type: str = OCI_MANIFEST
) -> str:
    _http(
        reg,
        "PUT",
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        data,
        {**_auth_header(reg, repo), "Content-Type": media_type},
    )
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(
    reg: RunningRegistry,
    repo: str,
    tag: str,
    *,
    layers: list[bytes] | None = None,
    config: bytes | None = None,
    layer_annotations: list[dict[str, str]] | None = None,
    annotations: dict[str, str] | None = None,
    config_media_type: str = OCI_CONFIG,
    layer_media_type: str = OCI_LAYER,
) -> tuple[str, bytes]:
    """Push a small OCI image; returns (manifest digest, manifest bytes)."""
    layers = layers if layers is not None else [b"layer-one", b"layer-two"]
    config = (
        config
        if config is not None
        else json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    )
    cdig = put_blob(reg, repo, config)
    descs = []
    for i, data in enumerate(layers):
        d = {"mediaType": layer_media_type, "digest": put_blob(reg, repo, data), "size": len(data)}
        if layer_annotations and i < len(layer_annotations):
            d["annotations"] = layer_annotations[i]
        descs.append(d)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": cdig, "size": len(config)},
        "layers": descs,
    }
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc).encode()
    return put_manifest(reg, repo, tag, data), data
