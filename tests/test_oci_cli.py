"""barge login / logout / inspect / tags through click's CliRunner, against real registries."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from barge.cli import main
from barge.errors import ExitCode
from registries import RunningRegistry
from seed import push_image, put_manifest


def run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_login_logout(registry_basic: RunningRegistry, barge_home: Path) -> None:
    pw = registry_basic.password or ""
    r = run("login", registry_basic.host, "-u", "alice", "--password-stdin", input=pw + "\n")
    assert r.exit_code == 0, r.output
    assert pw not in r.output
    auth = barge_home / "auth.json"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    doc = json.loads(auth.read_text())
    assert registry_basic.host in doc["auths"]
    # stored credentials are used by later commands
    push_image(registry_basic, "cli/img", "v1")
    r = run("tags", f"{registry_basic.host}/cli/img")
    assert r.exit_code == 0 and r.output.split() == ["v1"]
    r = run("logout", registry_basic.host)
    assert r.exit_code == 0
    assert registry_basic.host not in json.loads(auth.read_text())["auths"]
    r = run("tags", f"{registry_basic.host}/cli/img")
    assert r.exit_code == ExitCode.AUTH
    assert f"barge login {registry_basic.host}" in r.output


def test_login_prompts_and_rejects_bad_password(
    registry_basic: RunningRegistry, barge_home: Path
) -> None:
    r = run("login", registry_basic.host, input="alice\nwrong-pass-123\n")
    assert r.exit_code == ExitCode.AUTH
    assert "wrong-pass-123" not in r.output
    assert not (barge_home / "auth.json").exists()
    pw = registry_basic.password or ""
    r = run("login", f"http://{registry_basic.host}/", input=f"alice\n{pw}\n")
    assert r.exit_code == 0, r.output
    assert pw not in r.output


def test_login_unreachable(barge_home: Path) -> None:
    from registries import free_port

    host = f"127.0.0.1:{free_port()}"
    r = run("login", host, "-u", "x", "--password-stdin", input="y\n")
    assert r.exit_code == ExitCode.REGISTRY
    assert f"cannot reach registry {host}" in r.output


def test_inspect_and_tags(registry: RunningRegistry, barge_home: Path) -> None:
    config = json.dumps({"os": "linux", "arch": "arm64", "cpuCount": 4}).encode()
    digest, raw = push_image(
        registry,
        "vm/ubuntu",
        "24.04",
        config=config,
        config_media_type="application/vnd.cirruslabs.tart.config.v1",
        layers=[b"a" * 100, b"b" * 50],
        layer_annotations=[
            {"org.cirruslabs.tart.uncompressed-size": "1000"},
            {"org.cirruslabs.tart.uncompressed-size": "2000"},
        ],
    )
    ref = f"{registry.host}/vm/ubuntu:24.04"
    r = run("inspect", ref)
    assert r.exit_code == 0, r.output
    assert digest in r.output and "linux/arm64" in r.output
    assert "150 B compressed" in r.output and "2.9 KiB uncompressed" in r.output
    r = run("inspect", ref, "--format", "json")
    info = json.loads(r.output)
    assert info["digest"] == digest and info["uncompressedSize"] == 3000
    assert info["compressedSize"] == 150 and len(info["layers"]) == 2
    assert info["platform"] == "linux/arm64"
    r = run("inspect", ref, "--raw")
    assert r.output.encode().rstrip(b"\n") == raw
    r = run("inspect", f"{registry.host}/vm/ubuntu:nope")
    assert r.exit_code == ExitCode.NOT_FOUND
    r = run("tags", f"{registry.host}/vm/ubuntu", "--format", "json")
    assert json.loads(r.output) == {"repository": f"{registry.host}/vm/ubuntu", "tags": ["24.04"]}
    r = run("tags", f"{registry.host}/vm/missing")
    assert r.exit_code == ExitCode.NOT_FOUND


def test_inspect_malformed_manifest_is_an_integrity_error(
    barge_home: Path, registry: RunningRegistry
) -> None:
    """A manifest the registry accepted but barge cannot parse: exit 6, not 'internal error'."""
    _, data = push_image(registry, "r/x", "ok")
    doc = json.loads(data)
    doc["layers"][0]["size"] = -1
    put_manifest(registry, "r/x", "bad", json.dumps(doc).encode())
    r = run("inspect", f"{registry.host}/r/x:bad")
    assert r.exit_code == ExitCode.INTEGRITY
    assert "invalid manifest" in r.output and "internal error" not in r.output


def test_debug_output_has_no_secrets(
    registry_basic: RunningRegistry, barge_home: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    pw = registry_basic.password or ""
    env = {
        "BARGE_HOME": str(barge_home),
        "BARGE_DEBUG": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(barge_home),
    }
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "barge",
            "login",
            registry_basic.host,
            "-u",
            "alice",
            "--password-stdin",
        ],
        input=pw + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "REDACTED" in p.stderr and pw not in p.stderr + p.stdout
    import base64

    assert base64.b64encode(f"alice:{pw}".encode()).decode() not in p.stderr
