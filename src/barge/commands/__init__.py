"""CLI command modules; each registers its commands onto ``barge.cli.main`` on import."""
