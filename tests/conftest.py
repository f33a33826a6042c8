"""Shared pytest fixtures. Registry fixtures live in tests/registries.py (registries, CA, token server) and
tests/faultproxy.py (the fault proxy); tests/seed.py puts images into a registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

pytest_plugins = ["registries", "faultproxy", "guests"]

# No test reads this machine's /etc/containers/registries.conf or ~/.config/barge (a test
# that wants a registry configuration points $BARGE_REGISTRIES_CONF at its own file). Set
# here, so the barge processes tests start inherit it too.
os.environ["BARGE_SYSTEM_REGISTRIES_CONF"] = ""
os.environ["BARGE_REGISTRIES_CONF"] = ""

# Tests never assert timings (performance is measured by `make bench`): hypothesis' per-example
# deadline only turns a loaded machine into a flaky failure.
settings.register_profile("barge", deadline=None)
settings.load_profile("barge")


@pytest.fixture
def barge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private $BARGE_HOME for one test."""
    home = tmp_path / "barge-home"
    monkeypatch.setenv("BARGE_HOME", str(home))
    for var in (
        "BARGE_REGISTRY_USERNAME",
        "BARGE_REGISTRY_PASSWORD",
        "TART_REGISTRY_USERNAME",
        "TART_REGISTRY_PASSWORD",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    yield home


def pytest_report_header(config: pytest.Config) -> str:
    import soakfixtures

    return (
        f"reliability suite: seed {soakfixtures.SEED}, scale {soakfixtures.SCALE.name} "
        f"(replay: {soakfixtures.replay_hint()})"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    import soakfixtures

    lines = soakfixtures.TALLY.summary()
    if lines:
        terminalreporter.section("reliability suite")
        for line in lines:
            terminalreporter.write_line(line)
