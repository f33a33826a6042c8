"""CLI command modules: each collects its commands in its ``commands`` group, and
:mod:`barge.cli` adds them to the ``barge`` group (no module imports the CLI back)."""
