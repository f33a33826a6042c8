"""docs/api.md's examples run as they are: every ```python block, in order, in one namespace,
against a loopback registry (standing in for ``127.0.0.1:5000``) and a throwaway
$BARGE_HOME."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from registries import RunningRegistry

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
PLACEHOLDER = "127.0.0.1:5000"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_page_has_examples_and_names_its_placeholder() -> None:
    found = blocks()
    assert len(found) >= 5
    assert PLACEHOLDER in found[0]


def test_api_examples_run(
    barge_home: Path, registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, object] = {"__name__": "api_md"}
    for i, code in enumerate(blocks()):
        code = code.replace(PLACEHOLDER, registry.host)
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "not found:" in out and "a digest names existing content" in out
    assert "note: no tag given" in out
