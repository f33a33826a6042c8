"""barge's exception hierarchy and the exit codes the CLI maps them to.

Every error a user can cause or meet derives from :class:`BargeError`; the CLI prints
``barge: <message>`` on one line and exits with the class's ``exit_code``. Nothing else
reaches a user as a traceback.
"""

from __future__ import annotations


class ExitCode:
    """The CLI's exit codes; every :class:`BargeError` subclass names its own."""

    OK = 0
    FAILURE = 1  # generic failure
    USAGE = 2  # bad input: malformed reference, unparsable size, invalid name
    NOT_FOUND = 3  # unknown VM, image, tag or blob
    CONFLICT = 4  # already exists
    BUSY = 5  # locked by another process, or running
    INTEGRITY = 6  # digest or size mismatch, corrupt or hostile content
    REGISTRY = 7  # network or registry-side failure
    AUTH = 8  # unauthorized / denied / no credentials
    NO_SPACE = 9  # disk full
    LIMIT = 10  # a registry or format limit cannot be met
    UNSUPPORTED = 11  # a format or feature barge refuses on purpose
    NOT_RUNNING = 12  # the VM is not running (stop, ip, ssh, exec of a stopped VM)
    INTERRUPTED = 130


class BargeError(Exception):
    """Base class of every error barge reports to a user."""

    exit_code: int = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(BargeError, ValueError):
    exit_code = ExitCode.USAGE


class NotFoundError(BargeError):
    exit_code = ExitCode.NOT_FOUND


class ConflictError(BargeError):
    exit_code = ExitCode.CONFLICT


class BusyError(BargeError):
    exit_code = ExitCode.BUSY


class IntegrityError(BargeError):
    exit_code = ExitCode.INTEGRITY


class NoSpaceError(BargeError):
    exit_code = ExitCode.NO_SPACE


class Interrupted(BargeError):
    """Ctrl-C or SIGTERM stopped the operation; the message says what was kept."""

    exit_code = ExitCode.INTERRUPTED


class LimitError(BargeError):
    exit_code = ExitCode.LIMIT


class UnsupportedError(BargeError):
    exit_code = ExitCode.UNSUPPORTED


class NotRunningError(BargeError):
    exit_code = ExitCode.NOT_RUNNING


class RegistryError(BargeError):
    """A registry or network failure. barge.oci defines the typed subclasses."""

    exit_code = ExitCode.REGISTRY


class AuthError(RegistryError):
    exit_code = ExitCode.AUTH
