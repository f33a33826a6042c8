"""The registry configuration file (containers-registries.conf(5) v2 and barge's host keys):
parsing, podman's own examples, prefix choice, precedence of files, errors, `config show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from barge.errors import UsageError
from barge.oci.auth import CredentialStore
from barge.oci.client import RegistryClient
from barge.oci.registries_conf import RegistriesConf, config_files, load, parse_text
from barge.oci.settings import settings_for
from barge.reference import parse, parse_registry
from clitest import barge
from registries import TestCA

# containers-registries.conf(5), EXAMPLE (written from the man page's example)
PODMAN_MAN_EXAMPLE = """\
unqualified-search-registries = ["example.com"]

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true
"""

# the man page's wildcard example and its location-less form
PODMAN_WILDCARD_EXAMPLE = """\
[[registry]]
prefix = "*.example.com"
blocked = false
insecure = true

[[registry.mirror]]
location = "mirror.internal/example"
"""

# the shape of the distribution's default /etc/containers/registries.conf: comments, the
# global keys barge does not use, and a short-name alias drop-in
PODMAN_DEFAULT_FILE = """\
# For more information on this configuration file, see containers-registries.conf(5).
#
# [[registry]]
# # The "prefix" field is used to choose the relevant [[registry]] TOML table;
# prefix = "example.com/foo"
# insecure = false
# blocked = false
# location = "internal-registry-for-example.com/bar"
unqualified-search-registries = ["registry.fedoraproject.org", "docker.io", "quay.io"]
short-name-mode = "enforcing"
credential-helpers = ["containers-auth.json"]

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
"""

# the man page's pull-from-mirror example (a mirror used only for digests, one only for tags)
PODMAN_PULL_FROM_MIRROR = """\
[[registry]]
prefix = "registry.example.com/image"
location = "registry.example.com/image"

[[registry.mirror]]
location = "mirror-1.example.com/image"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "mirror-2.example.com/image"
pull-from-mirror = "tag-only"

[[registry.mirror]]
location = "mirror-3.example.com/image"
"""

DIGEST = "sha256:" + "ab" * 32


def conf_of(text: str, name: str = "test.conf") -> RegistriesConf:
    rules, _hosts, _warnings = parse_text(text, name)
    return RegistriesConf(tuple(rules))


def order(conf: RegistriesConf, ref: str, **kw: bool) -> list[str]:
    r = parse(ref)
    return [f"{s.role} {s.at(r)}" for s in conf.sources(r, **kw)]


def test_podman_man_page_example_tries_mirrors_in_order_then_location() -> None:
    conf = conf_of(PODMAN_MAN_EXAMPLE)
    assert order(conf, "example.com/foo/image:latest") == [
        "mirror example-mirror-0.local/mirror-for-foo/image:latest",
        "mirror example-mirror-1.local/mirrors/foo/image:latest",
        "upstream internal-registry-for-example.com/bar/image:latest",
    ]
    assert [s.insecure for s in conf.sources(parse("example.com/foo/image"))] == [
        False,
        True,
        False,
    ]
    # --no-mirrors: only the location
    assert order(conf, "example.com/foo/image:latest", mirrors=False) == [
        "upstream internal-registry-for-example.com/bar/image:latest"
    ]
    # outside the prefix (a boundary: foobar is not foo/...): the reference as named
    assert order(conf, "example.com/foobar/image:1") == ["upstream example.com/foobar/image:1"]


def test_podman_default_file_and_aliases_parse_without_warnings() -> None:
    rules, hosts, warnings = parse_text(PODMAN_DEFAULT_FILE, "registries.conf")
    assert rules == [] and warnings == [] and not hosts.values


def test_wildcard_prefix_matches_subdomains_without_rewrite() -> None:
    conf = conf_of(PODMAN_WILDCARD_EXAMPLE)
    assert order(conf, "blah.example.com/foo/myimage:latest") == [
        "mirror mirror.internal/example/foo/myimage:latest",
        "upstream blah.example.com/foo/myimage:latest",
    ]
    assert conf.rule_for(parse("example.com/foo/x")) is None  # not a subdomain
    assert conf.rule_for(parse("badexample.com/foo/x")) is None


def test_wildcard_with_a_location_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"w\.conf:3: a wildcard prefix"):
        parse_text('[[registry]]\nprefix = "*.example.com"\nlocation = "x.io"\n', "w.conf")


def test_pull_from_mirror_digest_only_and_tag_only() -> None:
    conf = conf_of(PODMAN_PULL_FROM_MIRROR)
    by_tag = order(conf, "registry.example.com/image:v1")
    assert by_tag == [
        "mirror mirror-2.example.com/image:v1",
        "mirror mirror-3.example.com/image:v1",
        "upstream registry.example.com/image:v1",
    ]
    by_digest = order(conf, f"registry.example.com/image@{DIGEST}")
    assert [s.split()[1].split("/")[0] for s in by_digest] == [
        "mirror-1.example.com",
        "mirror-3.example.com",
        "registry.example.com",
    ]


def test_mirror_by_digest_only_covers_every_mirror() -> None:
    conf = conf_of(
        '[[registry]]\nlocation = "r.io"\nmirror-by-digest-only = true\n'
        '[[registry.mirror]]\nlocation = "m.io"\n'
    )
    assert order(conf, "r.io/a:1") == ["upstream r.io/a:1"]
    assert order(conf, f"r.io/a@{DIGEST}")[0] == f"mirror m.io/a@{DIGEST}"


def test_longest_prefix_wins_and_plain_beats_wildcard() -> None:
    conf = conf_of(
        '[[registry]]\nprefix = "*.corp.io"\n[[registry.mirror]]\nlocation = "wild.io"\n'
        '[[registry]]\nprefix = "reg.corp.io"\n[[registry.mirror]]\nlocation = "host.io"\n'
        '[[registry]]\nprefix = "reg.corp.io/team"\n[[registry.mirror]]\nlocation = "team.io/t"\n'
    )
    assert order(conf, "reg.corp.io/team/vm:1")[0] == "mirror team.io/t/vm:1"
    assert order(conf, "reg.corp.io/other/vm:1")[0] == "mirror host.io/other/vm:1"
    assert order(conf, "x.corp.io/other/vm:1")[0] == "mirror wild.io/other/vm:1"
    # the prefix with a port: the host without one does not match it, and vice versa
    conf2 = conf_of('[[registry]]\nprefix = "reg.io:5000"\nblocked = true\n')
    assert conf2.rule_for(parse("reg.io/x")) is None
    assert conf2.rule_for(parse("reg.io:5000/x")) is not None


def test_blocked_is_refused() -> None:
    conf = conf_of('[[registry]]\nprefix = "evil.io/bad"\nblocked = true\n')
    with pytest.raises(UsageError, match="blocked"):
        conf.sources(parse("evil.io/bad/vm:1"))
    assert order(conf, "evil.io/good/vm:1") == ["upstream evil.io/good/vm:1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[registry]]\nprefix = "a.io"\nlocation = \n', r"bad\.conf: not valid TOML.*line 3"),
        ('[[registry]]\nprefix = "a.io"\n\ninsecure = "yes"\n', r"bad\.conf:4: insecure must be"),
        ('[[registry]]\nlocation = "https://a.io/x"\n', r"bad\.conf:2: location 'https://a\.io/x'"),
        ('[[registry]]\nlocation = "a.io/x//y"\n', r"bad\.conf:2: location"),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "a.io"\n',
            r"bad\.conf:3: mirror 'a\.io' is the registry's own location",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\n'
            'pull-from-mirror = "sometimes"\n',
            r"bad\.conf:5: pull-from-mirror must be one of all, digest-only, tag-only",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry]]\nprefix = "a.io"\n',
            r"bad\.conf:3: prefix 'a\.io' is given twice",
        ),
        ("[[registry]]\ninsecure = true\n", r"bad\.conf:1: a \[\[registry\]\] table needs"),
        (
            '[barge.hosts."a.io"]\nstall-timeout = -1\n',
            r"bad\.conf:1: \[barge\.hosts\.'a\.io'\]: .*stall_timeout",
        ),
        ('[barge.hosts."a.io"]\nlayer-limit = "many"\n', r"bad\.conf:1: .*layer_limit"),
    ],
)
def test_bad_files_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_text(text, "bad.conf")


def test_unknown_keys_are_warned_with_their_line() -> None:
    text = (
        "colour = 1\n"
        '[[registry]]\nlocation = "a.io"\nmirrors = []\n'
        '[[registry.mirror]]\nlocation = "m.io"\nweight = 3\n'
        '[barge.hosts."a.io"]\nstall-timeout = 5\nspeed = "fast"\n'
        "[barge.other]\n"
    )
    _rules, hosts, warnings = parse_text(text, "w.conf")
    assert warnings == [
        "w.conf:1: unknown key 'colour' ignored",
        "w.conf:4: unknown key 'mirrors' in [[registry]] ignored",
        "w.conf:7: unknown key 'weight' in [[registry.mirror]] ignored",
        "w.conf:10: unknown key 'speed' in [barge.hosts.'a.io'] ignored",
        "w.conf:11: unknown key 'other' in [barge] ignored",
    ]
    assert hosts.values == {"a.io": {"stall_timeout": 5}}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_files_order_dropins_and_precedence(tmp_path: Path) -> None:
    system = write(
        tmp_path / "etc/registries.conf",
        '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "sys.io"\n'
        '[barge.hosts."a.io"]\nstall-timeout = 7\nconnect-timeout = 3\n',
    )
    write(
        tmp_path / "etc/registries.conf.d/10-site.conf",
        '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "site.io"\n'
        '[[registry]]\nlocation = "b.io"\n[[registry.mirror]]\nlocation = "bsite.io"\n',
    )
    write(
        tmp_path / "etc/registries.conf.d/20-more.conf", '[barge.hosts."a.io"]\nstall-timeout = 8\n'
    )
    write(tmp_path / "etc/registries.conf.d/ignored.txt", "not toml [")
    user = write(
        tmp_path / "home/.config/barge/registries.conf",
        '[[registry]]\nlocation = "b.io"\n[[registry.mirror]]\nlocation = "mine.io"\n'
        '[barge.hosts."a.io"]\nconnect-timeout = 4\n',
    )
    env = {"BARGE_SYSTEM_REGISTRIES_CONF": str(system), "HOME": str(tmp_path / "home")}
    files = config_files(env)
    assert files == [
        system,
        tmp_path / "etc/registries.conf.d/10-site.conf",
        tmp_path / "etc/registries.conf.d/20-more.conf",
        user,
    ]
    conf = load(env)
    assert order(conf, "a.io/x:1")[0] == "mirror site.io/x:1"  # the drop-in replaced the table
    assert order(conf, "b.io/x:1")[0] == "mirror mine.io/x:1"  # barge's own file wins
    s = settings_for(parse_registry("a.io"), hosts=conf.hosts, environ={})
    assert (s.stall_timeout, s.connect_timeout) == (8.0, 4.0)  # merged key by key
    # XDG_CONFIG_HOME wins over HOME; BARGE_REGISTRIES_CONF over both; "" turns it off
    xdg = write(tmp_path / "xdg/barge/registries.conf", "")
    assert config_files({**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})[-1] == xdg
    assert config_files({**env, "BARGE_REGISTRIES_CONF": ""})[-1] != user
    assert config_files({"BARGE_SYSTEM_REGISTRIES_CONF": "", "BARGE_REGISTRIES_CONF": ""}) == []


def test_host_keys_feed_the_client_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_ca: TestCA
) -> None:
    ca = test_ca.ca_cert
    path = write(
        tmp_path / "r.conf",
        '[[registry]]\nlocation = "plain.corp.io"\ninsecure = true\n'
        '[barge.hosts."*.corp.io"]\nlayer-limit = 100\n'
        '[barge.hosts."ecr.corp.io"]\nupload-chunk = 1048576\nconcurrency = 6\n'
        f'ca-file = "{ca}"\n',
    )
    monkeypatch.setenv("BARGE_REGISTRIES_CONF", str(path))
    with RegistryClient("ecr.corp.io") as c:
        s = c.settings
        assert (s.layer_limit, s.upload_chunk, s.concurrency, s.ca_file) == (
            100,
            1 << 20,
            6,
            str(ca),
        )
        assert not s.insecure
    with RegistryClient("plain.corp.io") as c:
        assert c.settings.insecure and c.settings.layer_limit == 100
    with RegistryClient("ghcr.io") as c:  # barge's knowledge stays below the file
        assert c.settings.upload_chunk == 4 << 20


def test_config_show_text_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, barge_home: Path
) -> None:
    path = write(
        tmp_path / "r.conf",
        PODMAN_MAN_EXAMPLE
        + '[barge.hosts."example-mirror-0.local"]\nstall-timeout = 5\nca-file = "/site.pem"\n'
        "bogus = 1\n",
    )
    monkeypatch.setenv("BARGE_REGISTRIES_CONF", str(path))

    CredentialStore(barge_home).save("internal-registry-for-example.com", "me", "s3cret-pw")
    out = barge("config", "show", "example.com/foo/image:latest")
    lines = out.splitlines()
    assert (
        "1. mirror example-mirror-0.local/mirror-for-foo/image:latest, pull-from-mirror all"
        in lines
    )
    assert "3. upstream internal-registry-for-example.com/bar/image:latest" in lines
    assert "timeouts: connect 10s, stall 5s, retry 10s, deadline none" in out
    assert "ca-file: /site.pem" in out
    assert "s3cret" not in out and "credentials: stored" in out
    info = json.loads(barge("config", "show", "--format", "json", "example.com/foo/image:latest"))
    assert [s["role"] for s in info["sources"]] == ["mirror", "mirror", "upstream"]
    assert info["sources"][1]["settings"]["insecure"] is True
    assert info["sources"][2]["credentials"] == "stored"
    assert info["warnings"] == [
        f"{path}:18: unknown key 'bogus' in [barge.hosts.'example-mirror-0.local'] ignored"
    ]
    assert "s3cret" not in json.dumps(info)
    nomirror = json.loads(
        barge("config", "show", "--no-mirrors", "--format", "json", "example.com/foo/image")
    )
    assert [s["role"] for s in nomirror["sources"]] == ["upstream"]


def test_a_bad_file_fails_commands_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, barge_home: Path
) -> None:
    path = write(tmp_path / "r.conf", '[[registry]]\nprefix = "a.io"\nblocked = "no"\n')
    monkeypatch.setenv("BARGE_REGISTRIES_CONF", str(path))
    out = barge("config", "show", "a.io/x", code=2)
    assert f"{path}:3: blocked must be true or false" in out
    out = barge("pull", "a.io/x:1", code=2)
    assert f"{path}:3: blocked" in out
