"""Helpers shared by the tests: the CLI run in-process, and file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from barge.cli import main

MiB = 1 << 20


def barge(*args: str, code: int = 0) -> str:
    """Run ``barge ARGS`` in-process; assert its exit code and that no traceback leaked.
    Returns stdout on success; otherwise what it printed (a verdict on stdout, if any, then
    the one-line error on stderr)."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == code, (args, res.exit_code, res.output, res.stderr)
    assert "Traceback" not in res.output + res.stderr
    return res.stdout if code == 0 else res.stdout + res.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()
