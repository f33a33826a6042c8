"""Command-line front end.

The CLI parses arguments, calls one library function per command, and prints. It holds no
logic. Commands live in ``barge.commands.<area>`` modules that register onto :data:`main`.
Every :class:`~barge.errors.BargeError` becomes one line on stderr and its exit code; nothing
else reaches a user as a traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from barge import __version__, cancel
from barge.errors import BargeError, ExitCode, Interrupted
from barge.untrusted import printable

F = TypeVar("F", bound=Callable[..., Any])


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (ASCII only: control characters and lone surrogates
    from image content are JSON escapes)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=True))


def echo(text: str, *, err: bool = False) -> None:
    """Print one line. Every command prints through this: what came from an image, a registry
    or a layout (annotations, names, error messages quoting them) is escaped by
    :func:`barge.untrusted.printable`, so it can neither forge output lines nor break the
    terminal or the encoding half-way."""
    click.echo(printable(text), err=err)


def warn(message: str) -> None:
    """One informational line on stderr (never on stdout, which is for results)."""
    echo(f"barge: {message}", err=True)


format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)


_TIMEOUT_HELP = {
    "connect_timeout": "Seconds to connect to a registry (TCP and TLS).",
    "stall_timeout": "Seconds without a byte moving before an attempt fails.",
    "retry_timeout": "Seconds of retrying without progress before giving up.",
    "timeout": "Seconds for all of this command's work with a registry (0: no limit).",
}


def timeout_options(f: F) -> F:
    """``--connect-timeout``, ``--stall-timeout``, ``--retry-timeout``, ``--timeout``: recorded
    for this command (barge.oci.settings); each overrides its BARGE_* environment variable."""
    from barge.oci.settings import ENV, FLAGS, HostSettings, set_flag

    defaults = HostSettings()

    def record(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
        assert param.name is not None
        set_flag(param.name, value)  # None (not given): the environment's value holds

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        finally:  # the flags are this command's: nothing after it sees them
            for name in ENV:
                set_flag(name, None)

    for name in reversed(list(ENV)):
        command = click.option(
            FLAGS[name],
            name,
            type=click.FloatRange(min=0, min_open=name != "timeout"),
            metavar="SECONDS",
            expose_value=False,
            callback=record,
            help=f"{_TIMEOUT_HELP[name]} [env {ENV[name]}; default {getattr(defaults, name):g}]",
        )(command)
    return cast(F, command)


class BargeGroup(click.Group):
    """A click group that turns every error into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(os.environ.get("BARGE_DEBUG"))
        try:
            with cancel.handle_signals():
                return super().invoke(ctx)
        except Interrupted as e:
            echo(f"barge: {e.message}", err=True)
            ctx.exit(e.exit_code)
        except BargeError as e:
            echo(f"barge: error: {e.message}", err=True)
            if e.hint:
                # a hint may quote several lines (a guest's serial log): each is escaped alone
                first, *rest = e.hint.split("\n")
                echo(f"barge: hint: {first}", err=True)
                for line in rest:
                    echo(f"barge:   {line}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            echo("barge: interrupted", err=True)
            ctx.exit(ExitCode.INTERRUPTED)
        except OSError as e:
            if debug:
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                echo(f"barge: error: no space left on device: {e.filename or ''}", err=True)
                ctx.exit(ExitCode.NO_SPACE)
            where = f": {e.filename}" if e.filename else ""
            echo(f"barge: error: {e.strerror or e}{where}", err=True)
            ctx.exit(ExitCode.FAILURE)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug: one line, no traceback unless asked for
            if debug:
                raise
            echo(
                f"barge: internal error: {type(e).__name__}: {e} (set BARGE_DEBUG=1 for details)",
                err=True,
            )
            ctx.exit(ExitCode.FAILURE)
        return None


@click.group(cls=BargeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="barge")
def main() -> None:
    """barge: manage VM images on Linux and ship them through OCI registries."""


def run() -> None:  # pragma: no cover - thin wrapper for `python -m barge`
    main(prog_name="barge")


def _load_commands() -> None:
    import importlib
    import pkgutil

    import barge.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


_load_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
