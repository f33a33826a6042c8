"""Command-line front end (placeholder until the store lands)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit(0)
