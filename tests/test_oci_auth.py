"""Authentication, credentials lookup, TLS and addressing against real registries."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from barge.errors import AuthError, UsageError
from barge.oci import (
    Credentials,
    CredentialStore,
    Denied,
    RegistryClient,
    RegistryUnreachable,
    Unauthorized,
)
from barge.oci.auth import parse_challenge
from barge.oci.settings import settings_for
from clitest import at, opener, sha
from registries import RunningRegistry
from seed import push_image, put_blob


def fast(c: RegistryClient) -> RegistryClient:
    c.retry.base = 0.01
    c.retry.attempts = 3
    return c


# -- Basic ------------------------------------------------------------------------------------


def test_basic_auth_roundtrip(registry_basic: RunningRegistry, barge_home: Path) -> None:
    creds = CredentialStore.fixed(registry_basic.username or "", registry_basic.password or "")
    c = fast(RegistryClient(registry_basic.host, home=barge_home, credentials=creds))
    c.ping()
    data = os.urandom(10_000)
    c.upload_blob(at(c, "priv/a"), sha(data), len(data), opener(data), chunk_size=4096)
    assert c.read_blob(at(c, "priv/a"), sha(data), max_size=len(data)) == data
    assert c.auth.scheme == "basic"


def test_basic_auth_anonymous_gets_login_hint(
    registry_basic: RunningRegistry, barge_home: Path
) -> None:
    c = fast(RegistryClient(registry_basic.host, home=barge_home))
    with pytest.raises(Unauthorized) as ei:
        c.list_tags(at(c, "priv/a"))
    assert isinstance(ei.value, AuthError)
    assert f"barge login {registry_basic.host}" in (ei.value.hint or "")


def test_basic_auth_bad_password_not_leaked(
    registry_basic: RunningRegistry, barge_home: Path
) -> None:
    creds = CredentialStore.fixed("alice", "wrong-password-XYZ")
    c = fast(RegistryClient(registry_basic.host, home=barge_home, credentials=creds))
    with pytest.raises(Unauthorized) as ei:
        c.ping()
    text = str(ei.value) + (ei.value.hint or "") + repr(ei.value) + repr(c.auth.credentials)
    assert "wrong-password-XYZ" not in text
    assert "alice" in str(ei.value)


def test_credentials_lookup_order(
    registry_basic: RunningRegistry,
    barge_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = registry_basic.host
    store = CredentialStore(barge_home)
    assert store.get(host) is None
    # docker config.json auths
    dc = Path(os.environ["DOCKER_CONFIG"])
    dc.mkdir(parents=True)
    raw = base64.b64encode(b"dockeruser:dockerpw").decode()
    (dc / "config.json").write_text(json.dumps({"auths": {f"https://{host}": {"auth": raw}}}))
    got = store.get(host)
    assert got == Credentials("dockeruser", "dockerpw", "docker config.json")
    assert "dockerpw" not in repr(got) and "dockerpw" not in str(got)
    # barge's auth.json wins over docker
    path = store.save(host, "alice", registry_basic.password or "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.get(host).username == "alice"  # type: ignore[union-attr]
    # TART_* wins over auth.json, BARGE_* over TART_*
    monkeypatch.setenv("TART_REGISTRY_USERNAME", "tart")
    monkeypatch.setenv("TART_REGISTRY_PASSWORD", "tartpw")
    assert store.get(host).username == "tart"  # type: ignore[union-attr]
    monkeypatch.setenv("BARGE_REGISTRY_USERNAME", "bargeenv")
    monkeypatch.setenv("BARGE_REGISTRY_PASSWORD", "bargepw")
    assert store.get(host).username == "bargeenv"  # type: ignore[union-attr]
    monkeypatch.delenv("BARGE_REGISTRY_USERNAME")
    monkeypatch.delenv("TART_REGISTRY_USERNAME")
    # and the client uses auth.json end to end
    c = fast(RegistryClient(host, home=barge_home))
    c.ping()
    assert store.remove(host) is True
    assert store.remove(host) is False
    assert store.get(host).username == "dockeruser"  # type: ignore[union-attr]


def test_docker_credential_helper(
    barge_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-bargetest"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'printf \'{"ServerURL":"%s","Username":"helperuser","Secret":"helpersecret"}\' "$server"\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    dc = Path(os.environ["DOCKER_CONFIG"])
    dc.mkdir(parents=True)
    (dc / "config.json").write_text(json.dumps({"credHelpers": {"reg.example:5000": "bargetest"}}))
    store = CredentialStore(barge_home)
    got = store.get("reg.example:5000")
    assert got is not None and got.username == "helperuser" and got.password == "helpersecret"
    assert store.get("other.example") is None
    (dc / "config.json").write_text(json.dumps({"credsStore": "bargetest"}))
    assert store.get("other.example").username == "helperuser"  # type: ignore[union-attr]
    (dc / "config.json").write_text(json.dumps({"credsStore": "not-installed"}))
    assert store.get("other.example") is None


def test_parse_challenge() -> None:
    ch = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg, io",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
    )
    assert ch is not None and ch.scheme == "bearer"
    assert ch.realm == "https://auth.example/token"
    assert ch.params["service"] == "reg, io"
    assert ch.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    assert parse_challenge('Basic realm="x"').scheme == "basic"  # type: ignore[union-attr]


# -- token auth -------------------------------------------------------------------------------


def token_client(reg: RunningRegistry, home: Path, user: str | None) -> RegistryClient:
    creds = CredentialStore.fixed(user, reg.users[user]) if user else CredentialStore.anonymous()
    return fast(RegistryClient(reg.host, home=home, credentials=creds))


def test_token_auth_push_pull(registry_token: RunningRegistry, barge_home: Path) -> None:
    ts = registry_token.token_server
    assert ts is not None
    c = token_client(registry_token, barge_home, "pusher")
    c.ping()
    data = os.urandom(100_000)
    d = sha(data)
    c.upload_blob(at(c, "team/app"), d, len(data), opener(data), chunk_size=30_000)
    assert c.read_blob(at(c, "team/app"), d, max_size=len(data)) == data
    assert c.auth.scheme == "bearer"
    # tokens are cached per scope: one for ping, one for push, one for pull at most
    n = len(ts.requests)
    for _ in range(5):
        assert c.blob_exists(at(c, "team/app"), d) == len(data)
    assert len(ts.requests) == n
    scopes = [s for _u, ss in ts.requests for s in ss]
    assert "repository:team/app:pull,push" in scopes
    # mount needs pull on the source too: both scopes in one token request
    assert c.mount_blob(at(c, "team/other"), d, at(c, "team/app")) is True
    assert any(
        "repository:team/other:pull,push" in ss and "repository:team/app:pull" in ss
        for _u, ss in ts.requests
    )


def test_token_auth_pull_only_user_denied_push(
    registry_token: RunningRegistry, barge_home: Path
) -> None:
    put_blob(registry_token, "team/app", b"seed")
    puller = token_client(registry_token, barge_home, "puller")
    assert puller.read_blob(at(puller, "team/app"), sha(b"seed"), max_size=10) == b"seed"
    data = b"not allowed"
    with pytest.raises(Denied) as ei:
        puller.upload_blob(at(puller, "team/app"), sha(data), len(data), opener(data))
    assert "puller" in str(ei.value)
    assert "pull-password" not in str(ei.value)


def test_token_auth_anonymous_and_bad_password(
    registry_token: RunningRegistry, barge_home: Path
) -> None:
    anon = token_client(registry_token, barge_home, None)
    with pytest.raises(Unauthorized) as ei:
        anon.list_tags(at(anon, "team/app"))
    assert "barge login" in (ei.value.hint or "")
    bad = fast(
        RegistryClient(
            registry_token.host,
            home=barge_home,
            credentials=CredentialStore.fixed("pusher", "nope"),
        )
    )
    with pytest.raises(Unauthorized) as ei2:
        bad.ping()
    assert "refused" in str(ei2.value) and "nope" not in str(ei2.value)


def test_token_cache_expiry_and_refresh_on_401(
    registry_token: RunningRegistry, barge_home: Path, make_proxy
) -> None:
    ts = registry_token.token_server
    assert ts is not None
    digest, _ = push_image(registry_token, "team/app", "v1")
    proxy = make_proxy(registry_token)
    c = fast(
        RegistryClient(
            proxy.host,
            home=barge_home,
            credentials=CredentialStore.fixed("pusher", registry_token.users["pusher"]),
        )
    )
    c.get_manifest(at(c, "team/app", "v1"))
    n = len(ts.requests)
    c.get_manifest(at(c, "team/app", "v1"))
    assert len(ts.requests) == n  # cached
    # the registry revokes the token mid-operation: 401 with a fresh challenge
    challenge = (
        f'Bearer realm="{ts.url}/token",service="{ts.service}",scope="repository:team/app:pull"'
    )
    proxy.add(
        method="GET",
        path="/manifests/",
        action="status",
        status=401,
        headers={"WWW-Authenticate": challenge},
    )
    assert c.get_manifest(at(c, "team/app", "v1")).digest == digest
    assert len(ts.requests) == n + 1
    # a short-lived token is renewed before it expires
    ts.expires_in = 1
    c.auth._tokens.clear()
    c.get_manifest(at(c, "team/app", "v1"))
    m = len(ts.requests)
    import time

    time.sleep(1.1)
    c.get_manifest(at(c, "team/app", "v1"))
    assert len(ts.requests) == m + 1


def test_debug_log_redacts_credentials(
    registry_basic: RunningRegistry, barge_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    creds = CredentialStore.fixed("alice", registry_basic.password or "")
    c = fast(RegistryClient(registry_basic.host, home=barge_home, credentials=creds, debug=True))
    with caplog.at_level(logging.DEBUG, logger="barge.oci"):
        c.ping()
    text = caplog.text
    assert "GET" in text and "REDACTED" in text
    assert registry_basic.password not in text
    assert base64.b64encode(f"alice:{registry_basic.password}".encode()).decode() not in text


# -- TLS --------------------------------------------------------------------------------------


def test_tls_rejected_without_ca(registry_tls: RunningRegistry, barge_home: Path) -> None:
    c = fast(RegistryClient(registry_tls.host, home=barge_home))
    with pytest.raises(RegistryUnreachable) as ei:
        c.ping()
    assert "certificate" in str(ei.value).lower()
    assert "certs.d" in (ei.value.hint or "")
    assert "gave up after" not in str(ei.value)  # not retried: retrying cannot help


def test_tls_with_certs_d(registry_tls: RunningRegistry, barge_home: Path) -> None:
    assert registry_tls.ca_cert is not None
    d = barge_home / "certs.d" / registry_tls.host
    d.mkdir(parents=True)
    (d / "ca.crt").write_bytes(registry_tls.ca_cert.read_bytes())
    c = fast(RegistryClient(registry_tls.host, home=barge_home))
    c.ping()
    assert c._transport.base_url().startswith("https://")
    data = os.urandom(5000)
    c.upload_blob(at(c, "tls/a"), sha(data), len(data), opener(data))
    assert c.read_blob(at(c, "tls/a"), sha(data), max_size=len(data)) == data


def test_tls_ssl_cert_file(
    registry_tls: RunningRegistry, barge_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(registry_tls.ca_cert))
    c = fast(RegistryClient(registry_tls.host, home=barge_home))
    c.ping()


def test_tls_ca_file_in_host_settings(registry_tls: RunningRegistry, barge_home: Path) -> None:
    """The host's ``ca_file`` setting (as a registries.conf entry will give it) is trusted for
    that host; a CA file that cannot be read is a usage error naming it, not a TLS failure."""
    assert registry_tls.ca_cert is not None
    hosts = {registry_tls.host: {"ca_file": str(registry_tls.ca_cert)}}
    settings = settings_for(registry_tls.host, hosts=hosts)
    assert settings.ca_file == str(registry_tls.ca_cert)
    c = fast(RegistryClient(registry_tls.host, home=barge_home, settings=settings))
    c.ping()
    assert c._transport.base_url().startswith("https://")
    other = settings_for("127.0.0.1:1", hosts=hosts)
    assert other.ca_file is None  # another host's entry does not apply
    missing = barge_home / "no-such-ca.pem"
    bad = settings_for(registry_tls.host, hosts={registry_tls.host: {"ca_file": str(missing)}})
    with pytest.raises(UsageError, match="cannot read the CA file .*no-such-ca.pem"):
        RegistryClient(registry_tls.host, home=barge_home, settings=bad).ping()


def test_tls_insecure_skips_verification(registry_tls: RunningRegistry, barge_home: Path) -> None:
    c = fast(RegistryClient(registry_tls.host, home=barge_home, insecure=True))
    c.ping()
    assert c._transport.base_url().startswith("https://")


def test_loopback_http_fallback(registry: RunningRegistry, barge_home: Path) -> None:
    c = fast(RegistryClient(registry.host, home=barge_home))
    c.ping()
    assert c._transport.base_url() == registry.url


def test_ipv6_registry(registry_ipv6: RunningRegistry, barge_home: Path) -> None:
    assert registry_ipv6.host.startswith("[::1]:")
    c = fast(RegistryClient(registry_ipv6.host, home=barge_home))
    data = os.urandom(20_000)
    c.upload_blob(at(c, "v6/a"), sha(data), len(data), opener(data), chunk_size=8192)
    assert c.read_blob(at(c, "v6/a"), sha(data), max_size=len(data)) == data
    digest, _ = push_image(registry_ipv6, "v6/img", "latest")
    assert c.get_manifest(at(c, "v6/img", "latest")).digest == digest


def test_relative_locations(registry2: RunningRegistry, barge_home: Path) -> None:
    c = fast(RegistryClient(registry2.host, home=barge_home))
    data = os.urandom(70_000)
    c.upload_blob(at(c, "rel/a"), sha(data), len(data), opener(data), chunk_size=20_000)
    c.upload_blob(at(c, "rel/b"), sha(data + b"x"), len(data) + 1, opener(data + b"x"))
    assert c.read_blob(at(c, "rel/a"), sha(data), max_size=len(data)) == data
