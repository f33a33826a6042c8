"""Manifests in a registry: get (verified against its digest), head, put, delete.

``ref`` says which manifest: its digest if it has one, else its tag, else ``latest``
(:attr:`~barge.reference.Reference.ref`). A manifest fetched by digest must hash to it; one
fetched by tag must hash to the ``Docker-Content-Digest`` the registry sent, if any.
"""

from __future__ import annotations

import hashlib
import logging

from barge.oci.api import MAX_ERROR_BODY, RegistryAPI
from barge.oci.errors import DigestMismatch
from barge.oci.types import MANIFEST_ACCEPT, Descriptor, Manifest, is_digest, media_type_of
from barge.reference import Reference

__all__ = ["Manifests"]

log = logging.getLogger("barge.oci")


class Manifests(RegistryAPI):
    """The manifest endpoints of :class:`~barge.oci.client.RegistryClient`."""

    def get_manifest(self, ref: Reference) -> Manifest:
        """The manifest ``ref`` names: its exact bytes, media type and digest."""
        repo = self._check(ref)
        reference = ref.ref
        what = f"manifest {repo}{'@' if is_digest(reference) else ':'}{reference}"
        r = self._request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            scopes=(ref.scope("pull"),),
            ok=(200,),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
            kind="manifest",
            what=what,
        )
        algo = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        actual = f"{algo}:{hashlib.new(algo, r.data).hexdigest()}"
        expected = reference if is_digest(reference) else None
        header = r.headers.get("Docker-Content-Digest")
        if expected is None and header and header.startswith("sha256:"):
            expected = header
        if expected is not None and actual != expected:
            raise DigestMismatch(what, expected, actual, size=len(r.data))
        digest = actual if algo == "sha256" else "sha256:" + hashlib.sha256(r.data).hexdigest()
        if is_digest(reference):
            digest = reference
        return Manifest(r.data, media_type_of(r.data, r.headers.get("Content-Type")), digest)

    def head_manifest(self, ref: Reference) -> Descriptor | None:
        """The descriptor of the manifest ``ref`` names, or None when there is none (a
        registry that answers HEAD without digest, size or type is asked with GET)."""
        repo = self._check(ref)
        reference = ref.ref
        r = self._request(
            "HEAD",
            f"/v2/{repo}/manifests/{reference}",
            scopes=(ref.scope("pull"),),
            ok=(200,),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
            missing_ok=True,
            kind="manifest",
            what=f"manifest {repo}:{reference}",
        )
        if r.status == 404:
            return None
        digest = r.headers.get("Docker-Content-Digest")
        cl = r.headers.get("Content-Length")
        ct = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        if not digest or not is_digest(digest) or not (cl and cl.isdigit()) or not ct:
            return self.get_manifest(ref).descriptor()
        if is_digest(reference) and digest != reference:
            raise DigestMismatch(f"manifest {repo}@{reference}", reference, digest)
        return Descriptor(ct, digest, int(cl))

    def put_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        """Put ``data`` under ``ref``'s digest if it has one (which must be the data's), else
        its tag; returns the manifest's digest. A reference with neither is a ValueError (an
        untagged manifest is put by its digest: ``ref.with_digest(sha256_digest(data))``)."""
        repo = self._check(ref)
        reference = ref.digest or ref.tag
        if reference is None:
            raise ValueError(f"{ref}: a manifest is put by tag or digest; this names neither")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if is_digest(reference) and reference != digest:
            raise DigestMismatch(f"manifest to push to {repo}", reference, digest)
        r = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scopes=(ref.scope("pull", "push"),),
            ok=(200, 201, 202, 204),
            headers={"Content-Type": media_type, "Content-Length": str(len(data))},
            body=lambda: data,
            kind="manifest",
            what=f"push manifest {repo}:{reference}",
            max_body=MAX_ERROR_BODY,
        )
        served = r.headers.get("Docker-Content-Digest")
        if served and served.startswith("sha256:") and served != digest:
            log.debug("registry reports digest %s for manifest %s", served, digest)
        return digest

    def delete_manifest(self, ref: Reference) -> None:
        """Delete the manifest ``ref``'s digest names (registries delete by digest)."""
        repo = self._check(ref)
        digest = ref.digest
        if digest is None:
            raise ValueError(f"{ref}: a manifest is deleted by digest; this names none")
        self._request(
            "DELETE",
            f"/v2/{repo}/manifests/{digest}",
            scopes=(ref.scope("delete"), ref.scope("pull")),
            ok=(200, 202, 204),
            kind="manifest",
            what=f"delete manifest {repo}@{digest}",
            max_body=MAX_ERROR_BODY,
        )
