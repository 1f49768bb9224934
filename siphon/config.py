"""siphon.yaml: config model (msgspec Structs) and loader.

Pipeline: read file -> expand ``${VAR}`` / ``${VAR:-default}`` -> YAML -> normalise
(listeners, legacy keys, aliases) -> ``msgspec.convert`` (types, unknown keys) ->
semantic checks -> resolve relative paths against the config file's directory.
Every failure is a :class:`ConfigError` naming the offending key path.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

__all__ = [
    "TRANSPORTS",
    "Admin",
    "AdminAuth",
    "Auth",
    "AuthHttp",
    "Config",
    "ConfigError",
    "Credential",
    "Domain",
    "Http",
    "Kafka",
    "Listen",
    "Listener",
    "Log",
    "Nat",
    "Registrar",
    "Script",
    "Server",
    "dump_effective",
    "expand_env",
    "format_hostport",
    "load_config",
    "parse_config",
    "parse_hostport",
]

TRANSPORTS: tuple[str, ...] = ("udp", "tcp", "tls", "ws", "wss")
_BACKEND_ALIASES: tuple[str, ...] = ("memory", "redis", "postgres", "python")
_LEGACY_REGISTRAR_KEYS: tuple[str, ...] = ("redis", "postgres")
_UNSUPPORTED_AUTH_BACKENDS: tuple[str, ...] = ("database", "diameter_cx")
_HEX_LEN: dict[str, int] = {"ha1": 32, "ha1_sha256": 64, "ha1_sha512_256": 64}
_REDACTED = "***"

PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """Invalid or unreadable configuration; ``str()`` is one human-readable line."""

    def __init__(self, detail: str, *, source: str = "siphon.yaml", key: str | None = None):
        self.detail = detail
        self.source = source
        self.key = key
        super().__init__(f"{source}: {detail}")


class _Invalid(Exception):
    """Internal: a problem at ``key``; turned into ConfigError with the source name."""

    def __init__(
        self,
        key: str | None,
        message: str = "",
        *,
        kind: Literal["value", "unknown", "missing"] = "value",
    ):
        self.key = key
        if kind == "unknown":
            detail = f"unknown key '{key}'"
        elif kind == "missing":
            detail = f"missing required key '{key}'" + (f" ({message})" if message else "")
        elif key:
            detail = f"{key}: {message}"
        else:
            detail = message
        self.detail = detail
        super().__init__(detail)


# --------------------------------------------------------------------------- model


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Common struct options: reject unknown keys, keyword-only construction."""


class Listener(_Base):
    """One SIP socket: bind host/port plus optional host advertised in Via/Record-Route."""

    host: str
    port: int
    advertise: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` with IPv6 hosts bracketed."""
        return format_hostport(self.host, self.port)


class Listen(_Base):
    """Listeners per transport (normalised from strings / mappings)."""

    udp: list[Listener] = []
    tcp: list[Listener] = []
    tls: list[Listener] = []
    ws: list[Listener] = []
    wss: list[Listener] = []

    def all(self) -> Iterator[tuple[str, Listener]]:
        """Yield ``(transport, listener)`` for every configured socket."""
        for transport in TRANSPORTS:
            for listener in getattr(self, transport):
                yield transport, listener


class Domain(_Base):
    """Served domains (``domain.local``)."""

    local: list[str]


class Script(_Base):
    """User routing script; ``path`` is absolute after loading ("" = no script)."""

    path: str
    include_paths: list[str] = []
    reload: Literal["auto", "sighup"] = "sighup"


class Kafka(_Base):
    """Kafka event-log backend settings (``registrar.kafka``)."""

    bootstrap_servers: list[str] = []
    topic: str = "siphon.events"
    partitions: PosInt = 6
    replication_factor: PosInt = 1
    client_id: str = "siphon"
    group_id: str = "siphon"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None
    ) = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    append_timeout: PosFloat = 2.0
    on_bad_record: Literal["stop", "skip"] = "skip"


class Registrar(_Base):
    """Registrar policy and persistence backend."""

    backend: Literal["embedded", "kafka"] = "embedded"
    path: str = "var/siphon-log.db"
    default_expires: PosInt = 3600
    max_expires: PosInt = 7200
    min_expires: PosInt = 60
    max_contacts: PosInt = 10
    enforce_auth_aor_match: bool = False
    group_commit_max: PosInt = 2000
    sweep_interval: PosFloat = 1.0
    snapshot_interval: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Seconds between projection snapshots (0: none are written)."""
    snapshot_path: str = ""
    """Snapshot file ("": ``<path>.snapshot``, or ``<dir of path>/<topic>.snapshot`` for
    Kafka; see replay/snapshot.py)."""
    kafka: Kafka | None = None


class Credential(_Base):
    """Static credentials of one user: plaintext and/or precomputed HA1 hex digests."""

    password: str | None = None
    ha1: str | None = None
    ha1_sha256: str | None = None
    ha1_sha512_256: str | None = None


class AuthHttp(_Base):
    """REST credential lookup (``auth.backend: http``)."""

    url: str | None = None
    timeout_ms: PosInt = 2000
    ha1: bool = False
    cache_ttl_secs: NonNegInt = 0


class Auth(_Base):
    """Digest authentication settings."""

    realm: str = "localhost"
    backend: Literal["static", "http"] = "static"
    users: dict[str, Credential] = {}
    http: AuthHttp | None = None
    nonce_secret: str | None = None
    nonce_ttl_secs: PosInt = 300
    algorithms: list[Literal["MD5", "SHA-256", "SHA-512-256"]] = msgspec.field(
        default_factory=lambda: ["MD5", "SHA-256"]
    )


class AdminAuth(_Base):
    """Bearer-token protection of the admin API."""

    token: str | None = None
    protect_reads: bool = False


class Admin(_Base):
    """Admin HTTP API; present only when the ``admin`` section is."""

    listen: str
    auth: AdminAuth = msgspec.field(default_factory=AdminAuth)

    @property
    def host_port(self) -> tuple[str, int]:
        """``listen`` split into ``(host, port)``."""
        return parse_hostport(self.listen)


class Http(_Base):
    """HTTP addon listener (off when ``listen`` is None)."""

    listen: str | None = None
    max_body_bytes: PosInt = 1048576
    token: str | None = None

    @property
    def host_port(self) -> tuple[str, int] | None:
        """``listen`` split into ``(host, port)``, or None when disabled."""
        return parse_hostport(self.listen) if self.listen is not None else None


class Trunks(_Base):
    """Built-in trunk registry (``siphon.trunks``), served over HTTP, state in the log."""

    enabled: bool = False
    prefix: str = "/trunks"
    heartbeat_seconds: PosInt = 30
    """Interval trunks are asked to heartbeat at (returned in their record)."""
    lease_secs: PosInt = 90
    """A trunk whose last heartbeat is older than this is expired."""
    listen: str | None = None
    """Separate listener for the registry (default: ``http.listen``)."""
    token: str | None = None
    """Bearer token required on every registry request (default: ``http.token``)."""

    @property
    def host_port(self) -> tuple[str, int] | None:
        return parse_hostport(self.listen) if self.listen is not None else None


def _default_instance_id() -> str:
    return os.environ.get("HOSTNAME") or "siphon"


class Server(_Base):
    """Process-level limits and identity."""

    instance_id: str = msgspec.field(default_factory=_default_instance_id)
    drain_secs: NonNegInt = 30
    server_header: str = "siphon/0.1"
    max_message_size: PosInt = 65535
    max_headers: PosInt = 256
    tcp_idle_timeout: PosFloat = 600.0
    max_connections: PosInt = 10000
    udp_receive_buffer: PosInt = 512 * 1024
    """SO_RCVBUF of UDP listeners (bytes; the kernel may double or cap it). It bounds
    how long datagrams queue when the node is overloaded: a larger one absorbs longer
    bursts, but past capacity everything answered is that much older."""


class Log(_Base):
    """Server logging; ``level`` "warn" is normalised to "warning"."""

    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    format: Literal["pretty", "json"] = "pretty"
    file: str | None = None


class Nat(_Base):
    """NAT helpers (only ``fix_contact`` is implemented)."""

    fix_contact: bool = False


class Config(_Base):
    """Whole siphon.yaml. ``warnings`` is filled by the loader, not read from YAML."""

    listen: Listen
    domain: Domain
    advertised_address: str | None = None
    script: Script = msgspec.field(default_factory=lambda: Script(path=""))
    registrar: Registrar = msgspec.field(default_factory=Registrar)
    auth: Auth = msgspec.field(default_factory=Auth)
    admin: Admin | None = None
    http: Http = msgspec.field(default_factory=Http)
    trunks: Trunks = msgspec.field(default_factory=Trunks)
    server: Server = msgspec.field(default_factory=Server)
    log: Log = msgspec.field(default_factory=Log)
    nat: Nat = msgspec.field(default_factory=Nat)
    warnings: list[str] = []


# --------------------------------------------------------------------------- helpers

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_*]([A-Za-z0-9_.\-]*[A-Za-z0-9_])?$")


def expand_env(
    text: str, env: typing.Mapping[str, str] | None = None, warnings: list[str] | None = None
) -> str:
    """Expand ``${VAR}`` (unset -> "") and ``${VAR:-default}`` (unset or empty -> default)."""
    environ = os.environ if env is None else env

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            if warnings is not None:
                warnings.append(f"environment variable {name} is not set; ${{{name}}} -> ''")
            return ""
        return value

    return _ENV_RE.sub(repl, text)


def format_hostport(host: str, port: int) -> str:
    """Format ``host:port``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(value: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port`` (port 0-65535); raise ValueError otherwise."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"{value!r} is not host:port")
        host, port_s = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{value!r}: IPv6 addresses must be bracketed, e.g. '[::1]:5060'")
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{value!r}: invalid host {host!r}")
    if not (port_s.isascii() and port_s.isdigit()):
        raise ValueError(f"{value!r} is not host:port")
    port = int(port_s)
    if port > 65535:
        raise ValueError(f"{value!r}: port {port} out of range (0-65535)")
    return host, port


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _mapping(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(key, f"expected mapping, got {_type_name(value)}")
    for k in value:
        if not isinstance(k, str):
            raise _Invalid(_join(key, k), kind="unknown")
    return value


# --------------------------------------------------------------------------- msgspec errors

_MSG_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TYPE_WORDS = {"object": "mapping", "array": "list", "null": "null"}


def _friendly(msg: str) -> str:
    """Lower-case msgspec's wording and drop backticks (`object` -> mapping)."""
    msg = re.sub(r"`(\w+)`", lambda m: _TYPE_WORDS.get(m.group(1), m.group(1)), msg)
    return msg[:1].lower() + msg[1:]


def _dotted(path: str) -> str:
    """``.registrar.foo`` / ``.listen.udp[0]`` -> ``registrar.foo`` / ``listen.udp[0]``."""
    return path.lstrip(".")


def _literal_choices(root: type, path: str) -> tuple[str, ...]:
    """Allowed values of the Literal field at ``path`` (dotted form), if resolvable."""
    tp: Any = root
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        tp = _unwrap(tp)
        if part.startswith("["):
            args = typing.get_args(tp)
            if not args:
                return ()
            tp = args[-1]
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return ()
            tp = hints[part]
        else:
            return ()
    tp = _unwrap(tp)
    if typing.get_origin(tp) is Literal:
        return tuple(str(a) for a in typing.get_args(tp))
    return ()


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and ``X | None``."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = typing.get_args(tp)
    if args and type(None) in args and typing.get_origin(tp) is not Literal:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _unwrap(rest[0])
    return tp


def _convert(data: object, tp: type, prefix: str = "") -> Any:
    """``msgspec.convert`` with errors rewritten to dotted key paths under ``prefix``."""
    try:
        return msgspec.convert(data, tp)
    except msgspec.ValidationError as exc:
        m = _MSG_RE.match(str(exc))
        assert m is not None
        msg, sub = m.group("msg"), _dotted(m.group("path") or "")
        key = prefix + ("." + sub if sub and not sub.startswith("[") else sub) if prefix else sub
        unknown = re.match(r"Object contains unknown field `(.+)`", msg)
        if unknown:
            raise _Invalid(_join(key, unknown.group(1)), kind="unknown") from None
        missing = re.match(r"Object missing required field `(.+)`", msg)
        if missing:
            raise _Invalid(_join(key, missing.group(1)), kind="missing") from None
        enum = re.match(r"Invalid enum value (.+)", msg)
        if enum:
            choices = _literal_choices(tp, sub)
            hint = f" (expected one of: {', '.join(choices)})" if choices else ""
            raise _Invalid(key or None, f"invalid value {enum.group(1)}{hint}") from None
        text = _friendly(msg)
        if ", got" not in text:
            value = _lookup(data, sub)
            if value is not _MISSING:
                text += f", got {value!r}"
        raise _Invalid(key or None, text) from None


_MISSING = object()


def _lookup(data: object, path: str) -> object:
    """Fetch the raw value at a dotted/indexed path, or ``_MISSING``."""
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        if part.startswith("["):
            index = part[1:-1]
            if not (isinstance(data, list) and index.isascii() and index.isdigit()
                    and int(index) < len(data)):
                return _MISSING
            data = data[int(index)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return _MISSING
    return data


# --------------------------------------------------------------------------- normalise


def _normalise_listen(raw: object) -> dict[str, list[dict[str, Any]]]:
    """Turn ``listen`` strings/mappings into ``{transport: [{host, port, advertise}]}``."""
    listen = _mapping(raw, "listen")
    out: dict[str, list[dict[str, Any]]] = {}
    for transport, items in listen.items():
        tkey = f"listen.{transport}"
        if transport not in TRANSPORTS:
            raise _Invalid(tkey, kind="unknown")
        if items is None:
            items = []
        elif isinstance(items, str | dict):
            items = [items]
        elif not isinstance(items, list):
            raise _Invalid(tkey, f"expected list of host:port, got {_type_name(items)}")
        out[transport] = [_normalise_listener(item, f"{tkey}[{i}]") for i, item in enumerate(items)]
    _check_listener_conflicts(out)
    if not any(out.values()):
        raise _Invalid("listen", "at least one SIP listener (udp, tcp, tls, ws, wss) is required")
    return out


def _normalise_listener(item: object, key: str) -> dict[str, Any]:
    advertise: object = None
    if isinstance(item, dict):
        for k in _mapping(item, key):
            if k not in ("address", "advertise"):
                raise _Invalid(_join(key, k), kind="unknown")
        if "address" not in item:
            raise _Invalid(f"{key}.address", kind="missing")
        address, advertise = item["address"], item.get("advertise")
        if advertise is not None and (not isinstance(advertise, str) or not advertise.strip()):
            raise _Invalid(f"{key}.advertise", "expected non-empty str")
        key = f"{key}.address"
    else:
        address = item
    if not isinstance(address, str):
        raise _Invalid(key, f"expected 'host:port' str, got {_type_name(address)}")
    try:
        host, port = parse_hostport(address)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None
    return {"host": host, "port": port, "advertise": advertise}


def _check_listener_conflicts(listen: dict[str, list[dict[str, Any]]]) -> None:
    """Reject duplicate sockets; tcp+ws and tls+wss may share one (protocol sniffed)."""
    group = {"udp": "udp", "tcp": "tcp", "ws": "tcp", "tls": "tls", "wss": "tls"}
    seen: dict[tuple[str, str, int], str] = {}
    for transport in TRANSPORTS:
        for i, lst in enumerate(listen.get(transport, [])):
            if lst["port"] == 0:
                continue
            proto = "udp" if transport == "udp" else "stream"
            ident = (proto, lst["host"], lst["port"])
            where = f"listen.{transport}[{i}]"
            other = seen.get(ident)
            if other is None:
                seen[ident] = where
                continue
            other_transport = other.split(".")[1].split("[")[0]
            if other_transport == transport or group[other_transport] != group[transport]:
                addr = format_hostport(lst["host"], lst["port"])
                raise _Invalid(where, f"{addr} is already used by {other}")


def _normalise_registrar(raw: object, warnings: list[str]) -> dict[str, Any]:
    reg = dict(_mapping(raw, "registrar"))
    backend = reg.get("backend")
    if isinstance(backend, str):
        if backend in _BACKEND_ALIASES:
            warnings.append(
                f"registrar.backend: '{backend}' is treated as 'embedded' "
                "(durable local event log at registrar.path)"
            )
            reg["backend"] = "embedded"
        elif backend not in ("embedded", "kafka"):
            raise _Invalid(
                "registrar.backend",
                f"unknown backend '{backend}' (expected embedded or kafka)",
            )
    for legacy in _LEGACY_REGISTRAR_KEYS:
        if legacy in reg:
            del reg[legacy]
            warnings.append(f"registrar.{legacy} is ignored (siphon has no {legacy} backend)")
    if "embedded" in reg:
        emb = _mapping(reg.pop("embedded"), "registrar.embedded")
        for k in emb:
            if k != "path":
                raise _Invalid(f"registrar.embedded.{k}", kind="unknown")
        if "path" in emb:
            if "path" in reg and reg["path"] != emb["path"]:
                raise _Invalid(
                    "registrar.embedded.path", "conflicts with registrar.path (set only one)"
                )
            reg["path"] = emb["path"]
    if isinstance(reg.get("kafka"), dict):
        kafka = dict(reg["kafka"])
        servers = kafka.get("bootstrap_servers")
        if isinstance(servers, str):
            kafka["bootstrap_servers"] = [s.strip() for s in servers.split(",") if s.strip()]
        reg["kafka"] = kafka
    return reg


def _normalise_auth(raw: object) -> dict[str, Any]:
    auth = dict(_mapping(raw, "auth"))
    backend = auth.get("backend")
    if isinstance(backend, str) and backend in _UNSUPPORTED_AUTH_BACKENDS:
        raise _Invalid(
            "auth.backend", f"'{backend}' is not supported by siphon (use static or http)"
        )
    users: dict[str, Any] = {}
    for section in ("credentials", "users"):
        if section not in auth or auth[section] is None:
            auth.pop(section, None)
            continue
        for user, value in _mapping(auth.pop(section), f"auth.{section}").items():
            ukey = f"auth.{section}.{user}"
            cred = _convert_credential(value, ukey)
            if user in users and users[user] != cred:
                raise _Invalid(ukey, "defined differently in both auth.credentials and auth.users")
            users[user] = cred
    if users:
        auth["users"] = users
    algorithms = auth.get("algorithms")
    if isinstance(algorithms, list):
        auth["algorithms"] = [a.upper() if isinstance(a, str) else a for a in algorithms]
    return auth


def _convert_credential(value: object, key: str) -> Credential:
    if isinstance(value, str):
        return Credential(password=value)
    if not isinstance(value, dict):
        raise _Invalid(key, f"expected password str or mapping, got {_type_name(value)}")
    cred: Credential = _convert(value, Credential, key)
    if all(getattr(cred, f) is None for f in ("password", *_HEX_LEN)):
        raise _Invalid(key, "needs a password or one of ha1, ha1_sha256, ha1_sha512_256")
    for field, length in _HEX_LEN.items():
        digest = getattr(cred, field)
        if digest is not None and not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", digest):
            raise _Invalid(f"{key}.{field}", f"expected {length} hex digits")
    return cred


def _normalise_nat(raw: object, warnings: list[str]) -> dict[str, Any]:
    nat = dict(_mapping(raw, "nat"))
    for k in list(nat):
        if k != "fix_contact":
            del nat[k]
            warnings.append(f"nat.{k} is not supported by siphon and is ignored")
    return nat


def _normalise(data: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Reshape raw YAML into the Struct layout, checking what msgspec cannot name well."""
    data = dict(data)
    for required in ("listen", "domain"):
        if data.get(required) is None:
            raise _Invalid(required, kind="missing")
    if "warnings" in data:
        raise _Invalid("warnings", kind="unknown")
    data["listen"] = _normalise_listen(data["listen"])
    for key in ("script", "registrar", "auth", "http", "trunks", "server", "log", "nat"):
        if data.get(key) is None:
            data.pop(key, None)
    if "registrar" in data:
        data["registrar"] = _normalise_registrar(data["registrar"], warnings)
    if "auth" in data:
        data["auth"] = _normalise_auth(data["auth"])
    if "nat" in data:
        data["nat"] = _normalise_nat(data["nat"], warnings)
    if "log" in data:
        log = dict(_mapping(data["log"], "log"))
        if isinstance(log.get("level"), str):
            log["level"] = log["level"].lower()
        data["log"] = log
    return data


# --------------------------------------------------------------------------- validate


def _validate(cfg: Config, warnings: list[str]) -> None:
    """Semantic and cross-field checks (types are already right)."""
    if not cfg.domain.local:
        raise _Invalid("domain.local", "must list at least one domain")
    for i, dom in enumerate(cfg.domain.local):
        if not dom.strip():
            raise _Invalid(f"domain.local[{i}]", "must be a non-empty domain")

    reg = cfg.registrar
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        raise _Invalid(
            "registrar",
            "expected min_expires <= default_expires <= max_expires, got "
            f"registrar.min_expires={reg.min_expires}, "
            f"registrar.default_expires={reg.default_expires}, "
            f"registrar.max_expires={reg.max_expires}",
        )
    if reg.backend == "embedded" and not reg.path:
        raise _Invalid("registrar.path", "must not be empty for the embedded backend")
    if reg.backend == "kafka":
        if reg.kafka is None:
            raise _Invalid("registrar.kafka", "backend is kafka", kind="missing")
        if not reg.kafka.bootstrap_servers:
            raise _Invalid(
                "registrar.kafka.bootstrap_servers", "required when registrar.backend is kafka"
            )
    if reg.kafka is not None:
        k = reg.kafka
        if k.security_protocol.startswith("SASL_") and k.sasl_mechanism is None:
            raise _Invalid("registrar.kafka.sasl_mechanism", f"required with {k.security_protocol}")
        if not k.topic:
            raise _Invalid("registrar.kafka.topic", "must not be empty")

    auth = cfg.auth
    if not auth.realm:
        raise _Invalid("auth.realm", "must not be empty")
    if not auth.algorithms:
        raise _Invalid("auth.algorithms", "must list at least one algorithm")
    if auth.backend == "http":
        if auth.http is None or not auth.http.url:
            raise _Invalid("auth.http.url", "auth.backend is http", kind="missing")
        if "{username}" not in auth.http.url:
            warnings.append("auth.http.url has no '{username}' placeholder")
    elif auth.backend == "static" and not auth.users:
        warnings.append("auth.users is empty: static digest authentication will reject every user")

    listens = {"admin.listen": cfg.admin.listen if cfg.admin else None}
    listens["http.listen"] = cfg.http.listen
    listens["trunks.listen"] = cfg.trunks.listen
    for key, value in listens.items():
        if value is not None:
            try:
                parse_hostport(value)
            except ValueError as exc:
                raise _Invalid(key, str(exc)) from None
    if cfg.trunks.enabled and cfg.trunks.listen is None and cfg.http.listen is None:
        raise _Invalid("trunks.listen", "trunks.enabled needs trunks.listen or http.listen")
    if not cfg.trunks.prefix.startswith("/") or cfg.trunks.prefix.endswith("/"):
        raise _Invalid("trunks.prefix", "must start with '/' and not end with '/'")
    if cfg.trunks.lease_secs <= cfg.trunks.heartbeat_seconds:
        raise _Invalid("trunks.lease_secs", "must be longer than trunks.heartbeat_seconds")
    if cfg.advertised_address is not None and not cfg.advertised_address.strip():
        raise _Invalid("advertised_address", "must not be empty")
    if not cfg.server.instance_id:
        raise _Invalid("server.instance_id", "must not be empty")


def _resolve_paths(cfg: Config, base_dir: Path) -> None:
    """Make relative file paths absolute against the config file's directory."""

    def res(p: str) -> str:
        path = Path(p).expanduser()
        return os.path.normpath(path if path.is_absolute() else base_dir / path)

    if cfg.script.path:
        cfg.script.path = res(cfg.script.path)
    cfg.script.include_paths = [res(p) for p in cfg.script.include_paths]
    if cfg.registrar.path:
        cfg.registrar.path = res(cfg.registrar.path)
    if cfg.registrar.snapshot_path:
        cfg.registrar.snapshot_path = res(cfg.registrar.snapshot_path)
    if cfg.log.file:
        cfg.log.file = res(cfg.log.file)
    if cfg.registrar.kafka is not None:
        k = cfg.registrar.kafka
        for attr in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(k, attr)
            if value:
                setattr(k, attr, res(value))


# --------------------------------------------------------------------------- public API


def parse_config(
    text: str,
    *,
    base_dir: Path,
    source: str = "siphon.yaml",
    env: typing.Mapping[str, str] | None = None,
) -> Config:
    """Parse siphon.yaml text; relative paths resolve against ``base_dir``."""
    warnings: list[str] = []
    expanded = expand_env(text, env, warnings)
    try:
        data = yaml.safe_load(expanded)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {where}{problem}", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", source=source) from None
    if data is None:
        data = {}
    try:
        if not isinstance(data, dict):
            raise _Invalid(None, f"top level must be a mapping, got {_type_name(data)}")
        cfg: Config = _convert(_normalise(data, warnings), Config)
        _validate(cfg, warnings)
    except _Invalid as exc:
        raise ConfigError(exc.detail, source=source, key=exc.key) from None
    if cfg.log.level == "warn":
        cfg.log.level = "warning"
    _resolve_paths(cfg, Path(base_dir).absolute())
    if cfg.auth.nonce_secret is None:
        cfg.auth.nonce_secret = secrets.token_hex(32)
        warnings.append(
            "auth.nonce_secret is not set: using a random per-process secret "
            "(multi-node deployments need a shared auth.nonce_secret)"
        )
    cfg.warnings = warnings
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a siphon.yaml file."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", source=source) from None
    except PermissionError:
        raise ConfigError("cannot read config file: permission denied", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte {exc.start})", source=source) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", source=source
        ) from None
    return parse_config(text, base_dir=Path(source).absolute().parent, source=source)


def dump_effective(config: Config, *, redact: bool = True) -> dict[str, Any]:
    """Effective config as plain data (for ``siphon check-config``); secrets masked.

    With ``redact=False`` the result can be fed back to :func:`parse_config`.
    """
    out: dict[str, Any] = msgspec.to_builtins(config)
    out.pop("warnings", None)
    out["listen"] = {
        transport: [
            lst.address
            if lst.advertise is None
            else {"address": lst.address, "advertise": lst.advertise}
            for lst in getattr(config.listen, transport)
        ]
        for transport in TRANSPORTS
    }
    if redact:
        for cred in out["auth"]["users"].values():
            for field in ("password", *_HEX_LEN):
                if cred.get(field) is not None:
                    cred[field] = _REDACTED
        secret_keys = [
            (out["auth"], "nonce_secret"),
            (out["http"], "token"),
            (out["admin"]["auth"] if out.get("admin") else {}, "token"),
            (out["registrar"]["kafka"] or {}, "sasl_password"),
        ]
        for section, key in secret_keys:
            if section.get(key) is not None:
                section[key] = _REDACTED
    return out
