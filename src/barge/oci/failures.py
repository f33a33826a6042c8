"""What a failed exchange means: connection-level failures classified and named.

urllib3, http.client, ssl and the socket layer each raise their own exceptions, wrapped in
one another. This module walks such a chain once (:func:`chain`) and answers the questions
the transport and the request loop ask: did it time out (:func:`timed_out`), was it only a
broken pooled connection (:func:`broken_connection`), a certificate that did not verify
(:func:`is_verify_error`)? :func:`unreachable` turns any of them into the one error a user
sees, :class:`~barge.oci.errors.RegistryUnreachable` (or its
:class:`~barge.oci.errors.RegistryTimeout`), naming the host, what was waited for and how
long; ``retryable`` on it says whether trying again can help.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

from urllib3.exceptions import ConnectTimeoutError, LocationValueError, NewConnectionError, SSLError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from barge.oci.errors import RegistryTimeout, RegistryUnreachable
from barge.oci.settings import HostSettings
from barge.reference import Registry

__all__ = [
    "CONNECTION_ERRORS",
    "broken_connection",
    "chain",
    "is_verify_error",
    "reason",
    "timed_out",
    "unreachable",
]

# What a request or a body read raises when the connection breaks. ValueError: http.client
# and the socket file raise "I/O operation on closed file" when a connection is torn down
# under a request (urllib3 closing a broken pooled connection can raise it too).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    Urllib3Error,
    http.client.HTTPException,
    OSError,
    ValueError,
)


def chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it wraps (in ``args``, as cause or context), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        todo.extend(x for x in (cur.__cause__, cur.__context__) if x is not None)


def broken_connection(e: BaseException) -> bool:
    """The failure says only that the pooled connection was unusable, nothing about the server:
    http.client refused to use it (a previous response on it was unfinished:
    ``ResponseNotReady``/``CannotSendRequest``) or it was torn down under the request
    (``ValueError: I/O operation on closed file``). Worth one immediate retry on a new
    connection. Resets, refusals, timeouts and TLS failures are left to the caller's backoff."""
    for cur in chain(e):
        if isinstance(cur, LocationValueError):
            return False
        if isinstance(cur, (http.client.ImproperConnectionState, ValueError)):
            return True
    return False


def is_verify_error(e: BaseException) -> bool:
    """Somewhere in ``e``'s chain a TLS certificate that did not verify."""
    return any(
        isinstance(cur, ssl.SSLCertVerificationError)
        or "CERTIFICATE_VERIFY_FAILED" in str(cur)
        or "certificate verify failed" in str(cur)
        for cur in chain(e)
    )


def reason(e: BaseException) -> str:
    """A short reason for a user: "connection refused", "TLS error: …", the innermost text."""
    cur: BaseException = e
    for _ in range(5):
        nxt = getattr(cur, "reason", None) or cur.__cause__ or cur.__context__
        if not isinstance(nxt, BaseException):
            break
        cur = nxt
    if isinstance(cur, ConnectionRefusedError) or "Connection refused" in str(cur):
        return "connection refused"
    if isinstance(cur, ssl.SSLError):
        return f"TLS error: {cur.reason or cur}"
    text = str(cur)
    # urllib3 messages embed the connection object's repr; keep the end
    if ": " in text and "object at 0x" in text:
        text = text.rsplit(": ", 1)[-1]
    return text or type(cur).__name__


def timed_out(e: BaseException) -> bool:
    """Somewhere in ``e``'s chain a socket or urllib3 timeout."""
    for cur in chain(e):
        if isinstance(cur, (TimeoutError, Urllib3Timeout)):
            return not isinstance(cur, NewConnectionError)
        if isinstance(cur, ssl.SSLError) and "timed out" in str(cur):
            return True
    return False


def _timeout_error(
    host: str, e: BaseException, settings: HostSettings, method: str | None, what: str | None
) -> RegistryTimeout:
    """The message for a timeout: what was waited for, for how long."""
    about = f" ({what})" if what else ""
    if isinstance(e, ConnectTimeoutError):
        text = f"cannot connect to {host} within {settings.connect_timeout:g} s{about}"
    elif isinstance(e, Urllib3Timeout):  # ReadTimeoutError: waiting for the answer
        to = f" to {method}" if method else ""
        text = f"no answer from {host} for {settings.stall_timeout:g} s{to}{about}"
    else:  # the socket timed out while the request was being sent
        text = f"{host} took no data for {settings.stall_timeout:g} s while {method or 'a request'} was sent{about}"
    return RegistryTimeout(text)


def unreachable(
    registry: Registry,
    url: str,
    e: BaseException,
    settings: HostSettings | None = None,
    *,
    method: str | None = None,
    what: str | None = None,
) -> RegistryUnreachable:
    """The error for a request to ``url`` (of ``registry``, or where it redirected) that
    failed with ``e``: a :class:`RegistryTimeout` when it timed out (given ``settings``)."""
    parts = urlsplit(url)
    host = parts.netloc
    if settings is not None and timed_out(e):
        err: RegistryUnreachable = _timeout_error(host, e, settings, method, what)
        err.retryable = True  # type: ignore[attr-defined]
        return err
    why = reason(e)
    ours = (parts.hostname or "").lower() == registry.hostname.lower()
    where = registry.name if ours else f"{registry} (via {host})"
    hint = None
    if isinstance(e, SSLError) and is_verify_error(e):
        hint = "put the registry's CA certificate in $BARGE_HOME/certs.d/HOST:PORT/ca.crt"
        why = f"TLS certificate not trusted ({why})"
    err = RegistryUnreachable(f"cannot reach registry {where}: {why}", hint=hint)
    err.__cause__ = None
    err.retryable = not (isinstance(e, SSLError) and is_verify_error(e))  # type: ignore[attr-defined]
    return err
