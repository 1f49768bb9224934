"""Tests for siphon.config: loading, defaults, normalisation and error messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from siphon.config import (
    Config,
    ConfigError,
    Credential,
    Listener,
    dump_effective,
    expand_env,
    load_config,
    parse_config,
    parse_hostport,
)

# Config block of /work/shared/seeds/registrar-recipe.txt, verbatim.
RECIPE_YAML = """\
# siphon.yaml
listen:
  udp: ["0.0.0.0:5060"]
  tcp: ["0.0.0.0:5060"]
domain:
  local: ["example.com"]
script:
  path: "/etc/siphon/registrar.py"

registrar:
  backend: redis            # memory | redis | postgres | python
  redis:
    url: "redis://127.0.0.1:6379"
  default_expires: 3600
  max_expires: 7200

auth:
  realm: "example.com"
  backend: static           # static | http | database | diameter_cx
  # static credentials for a quick start (use http/database in production):
  # credentials:
  #   alice: "secret"
"""

EMBEDDED_YAML = """\
listen:
  udp: ["127.0.0.1:5060"]
  tcp:
    - "127.0.0.1:5060"
    - {address: "[::1]:5070", advertise: "sip.example.com"}
  ws: ["127.0.0.1:5060"]
domain:
  local: [example.com, example.org]
script:
  path: scripts/registrar.py
registrar:
  backend: embedded
auth:
  realm: example.com
  nonce_secret: s3cret
  users:
    alice: secret
  credentials:
    bob: {ha1: 0123456789abcdef0123456789abcdef}
admin:
  listen: "127.0.0.1:9091"
"""

MINIMAL = 'listen:\n  udp: ["127.0.0.1:5060"]\ndomain:\n  local: [example.com]\n'


def parse(text: str, base_dir: Path = Path("/etc/siphon"), **kw: object) -> Config:
    """Parse with a fixed base dir."""
    return parse_config(text, base_dir=base_dir, **kw)  # type: ignore[arg-type]


def error_of(text: str) -> str:
    """The ConfigError message for ``text``."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# ------------------------------------------------------------------ happy paths


def test_recipe_config_loads_with_backend_warning(tmp_path: Path) -> None:
    path = tmp_path / "siphon.yaml"
    path.write_text(RECIPE_YAML)
    cfg = load_config(path)
    assert cfg.registrar.backend == "embedded"
    assert cfg.registrar.default_expires == 3600
    assert cfg.registrar.max_expires == 7200
    assert cfg.auth.realm == "example.com"
    assert cfg.auth.backend == "static"
    assert cfg.script.path == "/etc/siphon/registrar.py"
    assert cfg.listen.udp == [Listener(host="0.0.0.0", port=5060)]
    assert cfg.listen.tcp == [Listener(host="0.0.0.0", port=5060)]
    assert any("registrar.backend" in w and "'redis'" in w for w in cfg.warnings)
    assert any("registrar.redis" in w for w in cfg.warnings)


@pytest.mark.parametrize("alias", ["memory", "redis", "postgres", "python"])
def test_backend_aliases_mean_embedded(alias: str) -> None:
    cfg = parse(MINIMAL + f"registrar:\n  backend: {alias}\n  postgres: {{url: x}}\n")
    assert cfg.registrar.backend == "embedded"
    assert any(f"'{alias}'" in w for w in cfg.warnings)
    assert any("registrar.postgres" in w for w in cfg.warnings)


def test_embedded_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "siphon.yaml"
    path.write_text(EMBEDDED_YAML)
    cfg = load_config(path)
    reg = cfg.registrar
    assert (reg.backend, reg.min_expires, reg.max_contacts) == ("embedded", 60, 10)
    assert reg.enforce_auth_aor_match is False
    assert (reg.group_commit_max, reg.sweep_interval, reg.kafka) == (2000, 1.0, None)
    assert reg.path == str(tmp_path / "var" / "siphon-log.db")
    assert cfg.script.path == str(tmp_path / "scripts" / "registrar.py")
    assert (cfg.script.reload, cfg.script.include_paths) == ("sighup", [])
    assert cfg.domain.local == ["example.com", "example.org"]
    assert cfg.advertised_address is None
    assert cfg.auth.users == {
        "alice": Credential(password="secret"),
        "bob": Credential(ha1="0123456789abcdef0123456789abcdef"),
    }
    assert cfg.auth.nonce_secret == "s3cret"
    assert (cfg.auth.nonce_ttl_secs, cfg.auth.algorithms) == (300, ["MD5", "SHA-256"])
    assert cfg.admin is not None and cfg.admin.host_port == ("127.0.0.1", 9091)
    assert (cfg.admin.auth.token, cfg.admin.auth.protect_reads) == (None, False)
    assert (cfg.http.listen, cfg.http.max_body_bytes, cfg.http.token) == (None, 1048576, None)
    srv = cfg.server
    assert srv.instance_id == (os.environ.get("HOSTNAME") or "siphon")
    assert (srv.drain_secs, srv.server_header, srv.max_message_size) == (30, "siphon/0.1", 65535)
    assert (srv.max_headers, srv.tcp_idle_timeout, srv.max_connections) == (256, 600.0, 10000)
    assert (cfg.log.level, cfg.log.format, cfg.log.file) == ("info", "pretty", None)
    assert cfg.nat.fix_contact is False
    assert cfg.warnings == []
    # tcp and ws may share one socket (protocol sniffed).
    assert [t for t, _ in cfg.listen.all()] == ["udp", "tcp", "tcp", "ws"]


def test_minimal_config_generates_nonce_secret_with_warning() -> None:
    cfg = parse(MINIMAL)
    assert cfg.admin is None
    assert cfg.script.path == ""
    assert isinstance(cfg.auth.nonce_secret, str) and len(cfg.auth.nonce_secret) >= 32
    assert any("nonce_secret" in w and "multi-node" in w for w in cfg.warnings)
    assert parse(MINIMAL).auth.nonce_secret != cfg.auth.nonce_secret
    # Empty (null) optional sections mean "all defaults".
    cfg = parse(MINIMAL + "script:\nregistrar:\nserver:\nlog:\nnat:\nadmin:\n")
    assert cfg.registrar.max_expires == 7200 and cfg.admin is None


def test_ipv6_and_mapping_listeners() -> None:
    cfg = parse(
        "listen:\n"
        '  udp: ["[::]:5060", "[fe80::1]:0"]\n'
        '  tls: [{address: "[2001:db8::5]:5061", advertise: "edge.example.com"}]\n'
        '  wss: ["host.example.com:443"]\n'
        "domain: {local: [a]}\n"
    )
    assert cfg.listen.udp == [Listener(host="::", port=5060), Listener(host="fe80::1", port=0)]
    tls = cfg.listen.tls[0]
    assert (tls.host, tls.port, tls.advertise) == ("2001:db8::5", 5061, "edge.example.com")
    assert tls.address == "[2001:db8::5]:5061"
    assert cfg.listen.wss == [Listener(host="host.example.com", port=443)]


def test_parse_hostport() -> None:
    assert parse_hostport("[::1]:5060") == ("::1", 5060)
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    for bad in ("::1:5060", "1.2.3.4", "[::1]5060", "host:abc", "[nothost]:5", ":5060"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_relative_paths_resolved_against_file_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = conf_dir / "siphon.yaml"
    path.write_text(
        MINIMAL
        + "script:\n  path: ../scripts/r.py\n  include_paths: [lib]\n"
        + "registrar:\n  embedded:\n    path: data/log.db\n"
    )
    cfg = load_config(str(path))
    assert cfg.script.path == str(tmp_path / "scripts" / "r.py")
    assert cfg.script.include_paths == [str(conf_dir / "lib")]
    assert cfg.registrar.path == str(conf_dir / "data" / "log.db")
    cfg = parse(MINIMAL + "registrar:\n  path: /abs/log.db\n", base_dir=tmp_path)
    assert cfg.registrar.path == "/abs/log.db"


def test_env_expansion() -> None:
    env = {"SIP_PORT": "5080", "REALM": "corp.example", "EMPTY": ""}
    assert expand_env("${SIP_PORT}/${NOPE}/${NOPE:-dflt}/${EMPTY:-d2}", env) == "5080//dflt/d2"
    text = (
        'listen:\n  udp: ["127.0.0.1:${SIP_PORT}"]\n'
        "domain:\n  local: [example.com]\n"
        "auth:\n  realm: ${REALM}\n  nonce_secret: ${SECRET:-fallback}\n"
        "log:\n  level: ${LEVEL:-debug}\n"
    )
    cfg = parse(text, env=env)
    assert cfg.listen.udp[0].port == 5080
    assert cfg.auth.realm == "corp.example"
    assert cfg.auth.nonce_secret == "fallback"
    assert cfg.log.level == "debug"


def test_env_expansion_uses_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIPHON_TEST_DOMAIN", "env.example")
    path = tmp_path / "s.yaml"
    path.write_text(MINIMAL.replace("example.com", "${SIPHON_TEST_DOMAIN}"))
    assert load_config(path).domain.local == ["env.example"]


def test_kafka_backend() -> None:
    cfg = parse(
        MINIMAL
        + "registrar:\n  backend: kafka\n  kafka:\n"
        + "    bootstrap_servers: 'k1:9092, k2:9092'\n    security_protocol: SSL\n"
        + "    ssl_cafile: ca.pem\n    on_bad_record: stop\n"
    )
    kafka = cfg.registrar.kafka
    assert kafka is not None
    assert kafka.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert (kafka.topic, kafka.partitions, kafka.replication_factor) == ("siphon.events", 6, 1)
    assert (kafka.client_id, kafka.group_id, kafka.append_timeout) == ("siphon", "siphon", 2.0)
    assert kafka.on_bad_record == "stop"
    assert kafka.ssl_cafile == "/etc/siphon/ca.pem"


def test_auth_http_nat_and_log_normalisation() -> None:
    cfg = parse(
        MINIMAL
        + "auth:\n  backend: http\n  algorithms: [md5, sha-512-256]\n"
        + "  http: {url: 'http://creds/{username}', ha1: true}\n"
        + "nat:\n  fix_contact: true\n  keepalive: {enabled: true}\n"
        + "log:\n  level: WARN\n  format: json\n"
    )
    assert cfg.auth.http is not None and cfg.auth.http.ha1 is True
    assert (cfg.auth.http.timeout_ms, cfg.auth.http.cache_ttl_secs) == (2000, 0)
    assert cfg.auth.algorithms == ["MD5", "SHA-512-256"]
    assert cfg.nat.fix_contact is True
    assert any("nat.keepalive" in w for w in cfg.warnings)
    assert (cfg.log.level, cfg.log.format) == ("warning", "json")


def test_dump_effective_redacts_and_round_trips() -> None:
    cfg = parse(EMBEDDED_YAML + "http:\n  listen: '127.0.0.1:8080'\n  token: tok\n")
    dumped = dump_effective(cfg)
    assert dumped["auth"]["users"]["alice"]["password"] == "***"
    assert dumped["auth"]["nonce_secret"] == "***"
    assert dumped["http"]["token"] == "***"
    assert "warnings" not in dumped
    assert dumped["listen"]["tcp"][1] == {"address": "[::1]:5070", "advertise": "sip.example.com"}
    raw = dump_effective(cfg, redact=False)
    again = parse(yaml.safe_dump(raw), base_dir=Path("/elsewhere"))
    assert again == cfg


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "registrar:\n  max_expires: '7200'\n",
            "siphon.yaml: registrar.max_expires: expected int, got str",
        ),
        ("registrar:\n  foo: 1\n", "siphon.yaml: unknown key 'registrar.foo'"),
        ("frobnicate: 1\n", "unknown key 'frobnicate'"),
        ("auth:\n  users:\n    al: {pw: x}\n", "unknown key 'auth.users.al.pw'"),
        (
            "registrar:\n  default_expires: -5\n",
            "registrar.default_expires: expected int >= 1, got -5",
        ),
        ("registrar:\n  max_contacts: 0\n", "registrar.max_contacts: expected int >= 1, got 0"),
        (
            "registrar:\n  backend: cassandra\n",
            "registrar.backend: unknown backend 'cassandra'",
        ),
        ("registrar:\n  backend: kafka\n", "missing required key 'registrar.kafka'"),
        (
            "registrar:\n  backend: kafka\n  kafka: {topic: t}\n",
            "registrar.kafka.bootstrap_servers: required when registrar.backend is kafka",
        ),
        (
            "registrar:\n  kafka: {on_bad_record: maybe}\n",
            "registrar.kafka.on_bad_record: invalid value 'maybe' (expected one of: stop, skip)",
        ),
        (
            "registrar:\n  path: a\n  embedded: {path: b}\n",
            "registrar.embedded.path: conflicts with registrar.path",
        ),
        ("log:\n  level: loud\n", "log.level: invalid value 'loud'"),
        ("log:\n  format: xml\n", "log.format: invalid value 'xml'"),
        ("script:\n  reload: never\n", "script.reload: invalid value 'never'"),
        ("script:\n  reload: auto\n", "missing required key 'script.path'"),
        ("auth:\n  backend: database\n", "auth.backend: 'database' is not supported"),
        ("auth:\n  backend: diameter_cx\n", "auth.backend: 'diameter_cx' is not supported"),
        ("auth:\n  backend: http\n", "missing required key 'auth.http.url'"),
        ("auth:\n  algorithms: [MD5, SHA-1]\n", "auth.algorithms[1]: invalid value 'SHA-1'"),
        ("auth:\n  algorithms: []\n", "auth.algorithms: must list at least one algorithm"),
        ("auth:\n  users:\n    bob: {ha1: zz}\n", "auth.users.bob.ha1: expected 32 hex digits"),
        ("auth:\n  credentials:\n    bob: 5\n", "auth.credentials.bob: expected password str"),
        ("admin:\n  auth: {token: t}\n", "missing required key 'admin.listen'"),
        ("admin:\n  listen: localhost\n", "admin.listen: 'localhost' is not host:port"),
        ("http:\n  listen: 'h:99999'\n", "http.listen: 'h:99999': port 99999 out of range"),
        ("server:\n  drain_secs: -1\n", "server.drain_secs: expected int >= 0, got -1"),
        ("server:\n  max_message_size: big\n", "server.max_message_size: expected int, got str"),
        ("nat: 3\n", "nat: expected mapping, got int"),
        ("warnings: []\n", "unknown key 'warnings'"),
    ],
)
def test_error_names_key(snippet: str, expected: str) -> None:
    assert expected in error_of(MINIMAL + snippet)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ('udp: ["1.2.3.4"]', "listen.udp[0]: '1.2.3.4' is not host:port"),
        (
            'udp: ["1.2.3.4:5060", "1.2.3.4:70000"]',
            "listen.udp[1]: '1.2.3.4:70000': port 70000 out of range (0-65535)",
        ),
        ('tcp: ["::1:5060"]', "listen.tcp[0]: '::1:5060': IPv6 addresses must be bracketed"),
        ("udp: [5060]", "listen.udp[0]: expected 'host:port' str, got int"),
        ('udp: [{address: "1.2.3.4:5", foo: 1}]', "unknown key 'listen.udp[0].foo'"),
        ("udp: [{advertise: x}]", "missing required key 'listen.udp[0].address'"),
        ('udp: [{address: "1.2.3.4"}]', "listen.udp[0].address: '1.2.3.4' is not host:port"),
        ('sctp: ["1.2.3.4:5"]', "unknown key 'listen.sctp'"),
        ("udp: []", "listen: at least one SIP listener"),
        (
            'tcp: ["1.2.3.4:5060"]\n  tls: ["1.2.3.4:5060"]',
            "listen.tls[0]: 1.2.3.4:5060 is already used by listen.tcp[0]",
        ),
        (
            'udp: ["1.2.3.4:5060", "1.2.3.4:5060"]',
            "listen.udp[1]: 1.2.3.4:5060 is already used by listen.udp[0]",
        ),
    ],
)
def test_listener_errors(listen: str, expected: str) -> None:
    assert expected in error_of(f"listen:\n  {listen}\ndomain:\n  local: [a]\n")


def test_required_sections_and_domain() -> None:
    assert "missing required key 'listen'" in error_of("domain: {local: [a]}\n")
    assert "missing required key 'domain'" in error_of('listen: {udp: ["1.1.1.1:1"]}\n')
    base = 'listen: {udp: ["1.1.1.1:1"]}\n'
    assert "missing required key 'domain.local'" in error_of(base + "domain: {}\n")
    assert "domain.local: must list at least one domain" in error_of(base + "domain: {local: []}\n")
    assert "top level must be a mapping, got list" in error_of("- a\n")
    assert "missing required key 'listen'" in error_of("")


def test_cross_field_expires_check() -> None:
    msg = error_of(MINIMAL + "registrar:\n  min_expires: 600\n  default_expires: 300\n")
    assert "min_expires <= default_expires <= max_expires" in msg
    assert "registrar.min_expires=600" in msg and "registrar.default_expires=300" in msg
    msg = error_of(MINIMAL + "registrar:\n  default_expires: 9000\n")
    assert "registrar.default_expires=9000" in msg and "registrar.max_expires=7200" in msg
    cfg = parse(MINIMAL + "registrar:\n  min_expires: 30\n  default_expires: 30\n")
    assert cfg.registrar.min_expires == cfg.registrar.default_expires == 30


def test_yaml_syntax_error_has_position() -> None:
    msg = error_of('listen:\n  udp: ["1.2.3.4:5"\ndomain: {}\n')
    assert msg.startswith("siphon.yaml: YAML syntax error: line 3, column 1:")


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(binary)
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "registrar:\n  max_expires: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}: registrar.max_expires: expected int, got str"
    assert info.value.key == "registrar.max_expires"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(MINIMAL)

    def deny(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(ConfigError, match=r"secret\.yaml: cannot read config file: permission"):
        load_config(path)
