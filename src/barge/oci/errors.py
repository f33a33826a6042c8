"""Typed registry errors.

Every failure a registry reports is parsed from the distribution-spec error body
(``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``) or, when the body says
nothing useful, from the HTTP status. The classes fit into :mod:`barge.errors` so the CLI maps
them to the right exit code: "unknown" answers are also :class:`~barge.errors.NotFoundError`,
digest problems are :class:`~barge.errors.IntegrityError`, auth problems are
:class:`~barge.errors.AuthError`.

Messages never contain credentials, tokens or signed URLs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from barge.errors import (
    AuthError,
    IntegrityError,
    LimitError,
    NotFoundError,
    RegistryError,
    UnsupportedError,
    UsageError,
)
from barge.untrusted import load_json

__all__ = [
    "BlobUnknown",
    "BlobUploadUnknown",
    "Denied",
    "DigestInvalid",
    "DigestMismatch",
    "LayerLimitExceeded",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "RegistryResponseError",
    "RegistryTimeout",
    "RegistryUnreachable",
    "SizeInvalid",
    "TooManyRequests",
    "Unauthorized",
    "Unsupported",
    "error_from_response",
]


class RegistryResponseError(RegistryError):
    """A registry answered with an error status. ``status``/``code`` describe the answer."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: Any = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
        self.detail = detail


class RegistryUnreachable(RegistryError):
    """The registry could not be reached (connection refused, DNS, TLS handshake, timeouts)."""


class RegistryTimeout(RegistryUnreachable):
    """The registry did not answer or send within the stall timeout, a connection was not
    made within the connect timeout, or the operation's deadline passed."""


class Unauthorized(AuthError, RegistryResponseError):
    """401: no or bad credentials."""


class Denied(AuthError, RegistryResponseError):
    """403 / DENIED: authenticated, but not allowed to do this."""


class BlobUnknown(NotFoundError, RegistryResponseError):
    pass


class BlobUploadUnknown(NotFoundError, RegistryResponseError):
    """The upload session is gone (expired, or cancelled); the upload must start over."""


class ManifestUnknown(NotFoundError, RegistryResponseError):
    pass


class NameUnknown(NotFoundError, RegistryResponseError):
    """The repository does not exist."""


class NameInvalid(UsageError, RegistryResponseError):
    pass


class ManifestInvalid(RegistryResponseError):
    pass


class Unsupported(UnsupportedError, RegistryResponseError):
    """The registry does not support the operation (e.g. deletes disabled)."""


class DigestInvalid(IntegrityError, RegistryResponseError):
    """The registry computed a different digest than the one the client claimed."""


class SizeInvalid(IntegrityError, RegistryResponseError):
    pass


class TooManyRequests(RegistryResponseError):
    """429 after every retry; ``retry_after`` is the server's last advice in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class LayerLimitExceeded(LimitError, RegistryResponseError):
    """The registry caps the number of layers per image (ECR: 4,000 by default; some: 127)."""

    def __init__(self, message: str, *, limit: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.limit = limit


class DigestMismatch(IntegrityError):
    """Downloaded bytes do not hash to the digest they were fetched by."""

    def __init__(self, what: str, expected: str, actual: str, *, size: int | None = None) -> None:
        extra = f" after {size} bytes" if size is not None else ""
        super().__init__(
            f"digest mismatch for {what}: expected {expected}, got {actual}{extra}",
            hint="the registry served corrupt or altered content; nothing was kept",
        )
        self.what = what
        self.expected = expected
        self.actual = actual


_BY_CODE: dict[str, type[RegistryResponseError]] = {
    "UNAUTHORIZED": Unauthorized,
    "DENIED": Denied,
    "BLOB_UNKNOWN": BlobUnknown,
    "BLOB_UPLOAD_UNKNOWN": BlobUploadUnknown,
    "BLOB_UPLOAD_INVALID": RegistryResponseError,
    "MANIFEST_UNKNOWN": ManifestUnknown,
    "MANIFEST_BLOB_UNKNOWN": BlobUnknown,
    "MANIFEST_INVALID": ManifestInvalid,
    "MANIFEST_UNVERIFIED": ManifestInvalid,
    "NAME_UNKNOWN": NameUnknown,
    "NAME_INVALID": NameInvalid,
    "TAG_INVALID": ManifestInvalid,
    "DIGEST_INVALID": DigestInvalid,
    "SIZE_INVALID": SizeInvalid,
    "TOOMANYREQUESTS": TooManyRequests,
    "UNSUPPORTED": Unsupported,
}

_LAYER_LIMIT = re.compile(r"limit on (the )?number of layers", re.IGNORECASE)
_NUMBER = re.compile(r"\b(\d{1,7})\b")


def _parse_body(body: bytes) -> list[dict[str, Any]]:
    try:
        doc = load_json(body.decode("utf-8", "replace"), "error body")
    except ValueError:
        return []
    if isinstance(doc, dict):
        errs = doc.get("errors")
        if isinstance(errs, list):
            return [e for e in errs if isinstance(e, dict)]
        # ECR and a few others answer {"code": ..., "message": ...} or {"message": ...}
        if "message" in doc or "code" in doc:
            return [doc]
    return []


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    registry: str,
    what: str,
    kind: str | None = None,
    hint: str | None = None,
) -> RegistryResponseError:
    """Build the typed exception for an error answer.

    ``what`` names the request ("manifest foo/bar:latest"); ``kind`` is ``"blob"``,
    ``"manifest"``, ``"upload"`` or ``None`` and decides what a bare 404 means.
    """
    errors = _parse_body(body[:65536])
    code = None
    message = ""
    detail: Any = None
    if errors:
        first = errors[0]
        code = str(first.get("code") or "").upper() or None
        message = str(first.get("message") or "")
        detail = first.get("detail")
    text = message or (body[:200].decode("utf-8", "replace").strip() if not errors else "")
    if not text or "<html" in text.lower():
        text = f"HTTP {status}"
    full = f"{registry}: {what}: {text}"

    if _LAYER_LIMIT.search(message or text):
        m = _NUMBER.search(message or text)
        return LayerLimitExceeded(
            full,
            limit=int(m.group(1)) if m else None,
            status=status,
            code=code,
            detail=detail,
            hint="the registry limits the number of layers per image; push with larger chunks",
        )

    cls: type[RegistryResponseError] | None = _BY_CODE.get(code or "")
    if cls is None or cls is RegistryResponseError:
        if status == 401:
            cls = Unauthorized
        elif status == 403:
            cls = Denied
        elif status == 404:
            cls = {
                "blob": BlobUnknown,
                "manifest": ManifestUnknown,
                "upload": BlobUploadUnknown,
            }.get(kind or "", NameUnknown)
        elif status == 429:
            cls = TooManyRequests
        elif status == 405:
            cls = Unsupported
        else:
            cls = RegistryResponseError
    if cls is TooManyRequests:
        return TooManyRequests(
            full,
            retry_after=_retry_after(headers),
            status=status,
            code=code,
            detail=detail,
            hint=hint or "the registry is rate-limiting; try again later",
        )
    return cls(full, status=status, code=code, detail=detail, hint=hint)
