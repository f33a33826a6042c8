"""Command-line front end.

The CLI parses arguments, calls one function of the public API (:mod:`barge.api`) per
command, and prints. It holds no logic. Commands live in ``barge.commands.<area>`` modules,
each with a ``commands`` group of its own; this module adds them all to :data:`main`. Every
:class:`~barge.errors.BargeError` becomes one line on stderr and its exit code; nothing else
reaches a user as a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import click

from barge import __version__, cancel
from barge.commands import config, distribution, registry, transfer, vm
from barge.commands import run as run_commands
from barge.commands import vetu as vetu_commands
from barge.commands.common import echo
from barge.errors import BargeError, ExitCode, Interrupted


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


for _module in (config, distribution, registry, run_commands, transfer, vm):
    for _command in _module.commands.commands.values():
        main.add_command(_command)


@click.group(cls=BargeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="barge-vetu")
@click.pass_context
def vetu_main(ctx: click.Context) -> None:
    """Vetu's command line (as Orchard's Linux workers run it), served by barge (the
    `barge-vetu` console script; install it as `vetu`: docs/orchard.md)."""
    ctx.obj = main  # the vetu commands hand their work to barge's own


for _command in vetu_commands.commands.commands.values():
    vetu_main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
