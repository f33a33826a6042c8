"""Paged listings in a registry: a repository's tags and a manifest's referrers.

Both follow ``Link: <…>; rel="next"`` pages (at most :data:`MAX_TAG_PAGES` /
:data:`MAX_REFERRER_PAGES`; a page seen twice ends the listing).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from barge.errors import LimitError
from barge.oci.api import RegistryAPI, Response
from barge.oci.errors import RegistryResponseError, error_from_response
from barge.oci.types import Descriptor, Index
from barge.reference import Reference
from barge.untrusted import load_json

__all__ = ["MAX_REFERRER_PAGES", "MAX_TAG_PAGES", "Listings"]

MAX_TAG_PAGES = 10_000
MAX_REFERRER_PAGES = 1_000


class Listings(RegistryAPI):
    """The listing endpoints of :class:`~barge.oci.client.RegistryClient`."""

    def _paged(
        self, first: str, scopes: tuple[str, ...], what: str, max_pages: int
    ) -> Iterator[Response]:
        path: str | None = first
        pages = 0
        seen: set[str] = set()
        while path is not None:
            pages += 1
            if pages > max_pages:
                raise LimitError(f"{self.registry}: {what}: more than {max_pages} pages")
            r = self._request("GET", path, scopes=scopes, ok=(200,), missing_ok=True, what=what)
            yield r
            if r.status != 200:
                return
            nxt = _next_link(r.headers.get("Link"))
            if nxt is None:
                return
            url = self._transport.resolve(nxt)
            if url in seen:
                return
            seen.add(url)
            path = url

    def list_tags(self, ref: Reference) -> list[str]:
        """Every tag of ``ref``'s repository, in the registry's order."""
        repo = self._check(ref)
        what = f"tags of {repo}"
        tags: list[str] = []
        for r in self._paged(f"/v2/{repo}/tags/list", (ref.scope("pull"),), what, MAX_TAG_PAGES):
            if r.status == 404:
                raise error_from_response(
                    404, r.data, r.headers, registry=self.registry, what=what, kind=None
                )
            doc = _json(r.data, what, self.registry)
            page = doc.get("tags") or [] if isinstance(doc, dict) else []
            tags.extend(str(t) for t in page)
        return tags

    def referrers(
        self, ref: Reference, artifact_type: str | None = None
    ) -> list[Descriptor] | None:
        """The descriptors of manifests whose subject is ``ref``'s digest (of
        ``artifact_type`` only, if given); None when the registry has no referrers API."""
        repo = self._check(ref)
        digest = ref.digest
        if digest is None:
            raise ValueError(f"{ref}: referrers are listed for a digest; this names none")
        path = f"/v2/{repo}/referrers/{digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        out: list[Descriptor] = []
        what = f"referrers of {repo}@{digest}"
        for r in self._paged(path, (ref.scope("pull"),), what, MAX_REFERRER_PAGES):
            if r.status == 404:
                return None
            try:
                idx = Index.from_json(_json(r.data, "referrers", self.registry))
            except ValueError as e:
                raise RegistryResponseError(f"{self.registry}: bad referrers answer: {e}") from None
            out.extend(idx.manifests)
        if artifact_type:
            out = [d for d in out if d.artifact_type == artifact_type]
        return out


_LINK = re.compile(r"<([^>]*)>\s*;\s*(?:[^,]*?;\s*)*rel=\"?next\"?", re.IGNORECASE)


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    m = _LINK.search(header)
    return m.group(1) if m else None


def _json(data: bytes, what: str, registry: str) -> Any:
    try:
        return load_json(data, what)
    except ValueError:
        raise RegistryResponseError(f"{registry}: {what}: answer is not JSON") from None
