"""What every command module shares: output (every line escaped), the output-format option,
the registry timeout options, and the group each module collects its commands in."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from barge import api
from barge.oci.settings import ENV, FLAGS, HostSettings, set_flag
from barge.untrusted import printable

__all__ = [
    "F",
    "collector",
    "echo",
    "emit_json",
    "format_option",
    "no_mirrors_option",
    "timeout_options",
    "warn",
    "warn_config",
]


def collector() -> click.Group:
    """A command module's own group: ``barge.cli`` adds its commands to the ``barge`` group."""
    return click.Group()


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


def warn_config(*, quiet: bool = False) -> None:
    """Read the registry configuration now (a bad file is one usage error naming the file,
    the line and the key) and print its warnings (unknown keys) on stderr."""
    warnings = api.registry_config_warnings()
    if not quiet:
        for w in warnings:
            warn(w)


no_mirrors_option = click.option(
    "--no-mirrors",
    is_flag=True,
    help="Read from the upstream location only (ignore the registries.conf mirrors).",
)


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
