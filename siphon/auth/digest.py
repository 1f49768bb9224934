"""Sans-IO HTTP Digest authentication for SIP.

Implements the server side of Digest as used by SIP: RFC 3261 §22 (as updated by
RFC 8760), RFC 2617 and RFC 7616 (algorithms ``MD5``, ``SHA-256``, ``SHA-512-256`` and
their ``-sess`` variants).  Nothing here touches sockets or the event loop:

* :func:`parse_authorization` turns an ``Authorization`` / ``Proxy-Authorization``
  header value into :class:`DigestCredentials`;
* :class:`NonceManager` issues stateless keyed-MAC-signed nonces that every node
  sharing the secret can verify, and keeps a bounded per-node nonce-count (``nc``) replay cache;
* :func:`challenge` builds ``WWW-Authenticate`` / ``Proxy-Authenticate`` values;
* :func:`verify` checks credentials against an HA1 lookup callback.

HA1 convention: every HA1 in this module is the *base* ``H(username:realm:password)``
hex digest, also for ``-sess`` algorithms; the session key
``H(HA1:nonce:cnonce)`` is derived inside :func:`compute_response`.  Consequently
``ha1_lookup`` callbacks are always asked for the base algorithm name
(``"MD5"``, ``"SHA-256"`` or ``"SHA-512-256"``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import msgspec

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "AuthResult",
    "AuthStatus",
    "DigestCredentials",
    "DigestParseError",
    "NonceManager",
    "NonceState",
    "base_algorithm",
    "canonical_algorithm",
    "challenge",
    "compute_ha1",
    "compute_response",
    "hash_hex",
    "parse_authorization",
    "verify",
]


# --------------------------------------------------------------------------- algorithms


def _hashlib_factory(name: str) -> Callable[[bytes], str] | None:
    try:
        hashlib.new(name, b"")
    except (ValueError, TypeError):  # not provided by this OpenSSL build
        return None

    def digest(data: bytes) -> str:
        return hashlib.new(name, data).hexdigest()

    return digest


_BASE_HASHES: dict[str, Callable[[bytes], str]] = {
    name: fn
    for name, fn in (
        ("MD5", _hashlib_factory("md5")),
        ("SHA-256", _hashlib_factory("sha256")),
        # SHA-512/256 (FIPS 180-4 truncated SHA-512 with its own IV), not SHA-512[:64].
        ("SHA-512-256", _hashlib_factory("sha512_256")),
    )
    if fn is not None
}

#: Canonical names of every algorithm this build can verify (depends on OpenSSL).
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(
    n for base in _BASE_HASHES for n in (base, f"{base}-sess")
)
_BY_UPPER: dict[str, str] = {n.upper(): n for n in SUPPORTED_ALGORITHMS}

_HEX_LEN = {"MD5": 32, "SHA-256": 64, "SHA-512-256": 64}


def canonical_algorithm(algorithm: str | None) -> str | None:
    """Canonical spelling of a supported algorithm (case-insensitive); absent means MD5.

    Returns None for an algorithm that is unknown or unavailable in this build.
    """
    if algorithm is None:
        return "MD5" if "MD5" in _BASE_HASHES else None
    return _BY_UPPER.get(algorithm.strip().upper())


def base_algorithm(algorithm: str | None) -> str | None:
    """The HA1 algorithm for ``algorithm``: canonical name without ``-sess``, or None."""
    canon = canonical_algorithm(algorithm)
    if canon is None:
        return None
    return canon.removesuffix("-sess")


def _enc(s: str) -> bytes:
    # surrogatepass: never raise on odd str input coming from a (garbage) header.
    return s.encode("utf-8", "surrogatepass")


def _hasher(algorithm: str) -> Callable[[bytes], str]:
    base = base_algorithm(algorithm)
    if base is None:
        raise ValueError(f"unsupported digest algorithm: {algorithm!r}")
    return _BASE_HASHES[base]


def hash_hex(algorithm: str, data: bytes) -> str:
    """Lowercase hex ``H(data)`` for the hash underlying ``algorithm`` (e.g. a body hash)."""
    return _hasher(algorithm)(data)


def compute_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """Base ``HA1 = H(username:realm:password)`` (also for ``-sess`` algorithms).

    Raises ValueError for an unsupported algorithm.
    """
    return _hasher(algorithm)(_enc(f"{username}:{realm}:{password}"))


def compute_response(
    algorithm: str,
    ha1: str,
    nonce: str,
    nc: str | None,
    cnonce: str | None,
    qop: str | None,
    method: str,
    uri: str,
    body_hash: str | None = None,
) -> str:
    """Expected ``response`` value (lowercase hex).

    ``ha1`` is the base HA1; for ``-sess`` algorithms the session HA1
    ``H(HA1:nonce:cnonce)`` is derived here.  ``qop`` None gives the RFC 2069 form
    ``H(HA1:nonce:HA2)``; ``"auth"`` and ``"auth-int"`` the RFC 2617/7616 form.  For
    ``auth-int``, ``body_hash`` is ``hash_hex(algorithm, body)``.  Raises ValueError for an
    unsupported algorithm/qop or missing nc/cnonce/body_hash.
    """
    h = _hasher(algorithm)
    ha1 = ha1.lower()
    if algorithm.upper().endswith("-SESS"):
        if cnonce is None:
            raise ValueError("-sess algorithms require a cnonce")
        ha1 = h(_enc(f"{ha1}:{nonce}:{cnonce}"))
    if qop is None or qop == "auth":
        ha2 = h(_enc(f"{method}:{uri}"))
    elif qop == "auth-int":
        if body_hash is None:
            raise ValueError("qop=auth-int requires body_hash")
        ha2 = h(_enc(f"{method}:{uri}:{body_hash.lower()}"))
    else:
        raise ValueError(f"unsupported qop: {qop!r}")
    if qop is None:
        return h(_enc(f"{ha1}:{nonce}:{ha2}"))
    if nc is None or cnonce is None:
        raise ValueError("qop requires nc and cnonce")
    return h(_enc(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))


# --------------------------------------------------------------------------- parsing


class DigestParseError(ValueError):
    """A Digest credentials header that is syntactically malformed."""


class DigestCredentials(msgspec.Struct, kw_only=True):
    """Parsed Digest credentials. Values are unquoted/unescaped; absent ones are None."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    qop: str | None = None
    nc: str | None = None
    #: Any other parameters (lowercased names), e.g. ``userhash``.
    params: dict[str, str] = msgspec.field(default_factory=dict)


_KNOWN = ("username", "realm", "nonce", "uri", "response",
          "algorithm", "cnonce", "opaque", "qop", "nc")  # fmt: skip
_REQUIRED = ("username", "realm", "nonce", "uri", "response")
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = " \t\r\n"
_BARE_STOP = frozenset(_WS + ',"\\')


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _token(s: str, i: int) -> tuple[str, int]:
    j = i
    n = len(s)
    while j < n and s[j] in _TCHAR:
        j += 1
    return s[i:j], j


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Parse a quoted-string starting at ``s[i] == '"'``; return (value, index after)."""
    out: list[str] = []
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            out.append(s[i + 1])
            i += 2
            continue
        if c in "\r\n":
            # Folded whitespace (CRLF + WS) inside a quoted string counts as one space.
            j = _skip_ws(s, i)
            out.append(" ")
            i = j
            continue
        if (c < " " and c != "\t") or c == "\x7f":
            raise DigestParseError("control character in quoted-string")
        out.append(c)
        i += 1
    raise DigestParseError("unterminated quoted-string")


_FAST_SCHEME = re.compile(r"[ \t]*[Dd][Ii][Gg][Ee][Ss][Tt][ \t]+")
_FAST_PARAM = re.compile(
    r"[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*=[ \t]*"
    r"(?:\"([^\"\\\x00-\x08\x0a-\x1f\x7f]*)\"|([^\s,\"\\\x00-\x1f\x7f]+))[ \t]*(?:,|$)"
)


def _parse_fast(value: str) -> DigestCredentials | None:
    """The common well-formed case with regexes; None when anything is unusual (the
    careful parser then decides, with the same results for what this accepts)."""
    m = _FAST_SCHEME.match(value)
    if m is None:
        return None
    params: dict[str, str] = {}
    pos = m.end()
    n = len(value)
    while pos < n:
        m = _FAST_PARAM.match(value, pos)
        if m is None:
            return None
        key = m.group(1).lower()
        if key in params:
            return None
        quoted = m.group(2)
        params[key] = quoted if quoted is not None else m.group(3)
        pos = m.end()
    if any(k not in params for k in _REQUIRED):
        return None
    known = {k: params.pop(k) for k in _KNOWN if k in params}
    return DigestCredentials(**known, params=params)


def parse_authorization(value: str) -> DigestCredentials | None:
    """Parse an ``Authorization``/``Proxy-Authorization`` header value.

    Returns None when the value is empty or uses another scheme (treat as "no
    credentials" and challenge).  Raises :class:`DigestParseError` (a ValueError) when
    it is a Digest header that is malformed, has duplicate parameters or lacks one of
    username, realm, nonce, uri, response (the caller may answer 400 or re-challenge).
    Scheme and parameter names are case-insensitive; values may be tokens or quoted
    strings with backslash escapes; LWS (including folded lines) is allowed around
    ``=`` and ``,``.
    """
    if not isinstance(value, str):
        raise DigestParseError("header value must be str")
    fast = _parse_fast(value)
    if fast is not None:
        return fast
    s = value
    i = _skip_ws(s, 0)
    scheme, i = _token(s, i)
    if not scheme or scheme.lower() != "digest":
        return None
    n = len(s)
    if i < n and s[i] not in _WS:
        raise DigestParseError("expected whitespace after scheme")
    params: dict[str, str] = {}
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            break
        if s[i] == ",":  # empty list elements are allowed
            i += 1
            continue
        name, i = _token(s, i)
        if not name:
            raise DigestParseError(f"expected parameter name at offset {i}")
        i = _skip_ws(s, i)
        if i >= n or s[i] != "=":
            raise DigestParseError(f"expected '=' after {name!r}")
        i = _skip_ws(s, i + 1)
        if i < n and s[i] == '"':
            val, i = _quoted(s, i)
        else:
            j = i
            while j < n and s[j] not in _BARE_STOP and s[j] >= " " and s[j] != "\x7f":
                j += 1
            if j == i:
                raise DigestParseError(f"missing value for {name!r}")
            val, i = s[i:j], j
        key = name.lower()
        if key in params:
            raise DigestParseError(f"duplicate parameter {key!r}")
        params[key] = val
        i = _skip_ws(s, i)
        if i < n:
            if s[i] != ",":
                raise DigestParseError(f"expected ',' at offset {i}")
            i += 1
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise DigestParseError(f"missing parameter(s): {', '.join(missing)}")
    known = {k: params.pop(k) for k in _KNOWN if k in params}
    return DigestCredentials(**known, params=params)


# --------------------------------------------------------------------------- nonces


class NonceState(enum.Enum):
    VALID = "valid"
    #: Authentic but older than the TTL: re-challenge with ``stale=true``.
    STALE = "stale"
    #: Forged, garbled, or issued too far in the future.
    INVALID = "invalid"


class _Nc(enum.Enum):
    OK = 0
    REPLAY = 1
    EVICTED = 2


_NONCE_MAGIC = b"siphon-digest-nonce-v1\x00"  # v1 tags: HMAC-SHA256 (still accepted)
_NONCE_PERSON = b"siphon-nonce-v2"  # v2 tags: keyed BLAKE2b (issued)
_TS = struct.Struct(">q")  # issue time, milliseconds since the clock's epoch
_SALT_LEN = 8
_TAG_LEN = 16  # 128-bit MAC
_RAW_LEN = _TS.size + _SALT_LEN + _TAG_LEN  # 32 bytes -> 43 base64url chars
_B64_LEN = 43
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_MAX_FUTURE_MS = 60_000


class NonceManager:
    """Stateless, MAC-authenticated nonces plus a per-node ``nc`` replay cache.

    A nonce is ``base64url(ts_ms[8] || salt[8] || tag[16])`` (43 chars, no padding),
    ``tag`` a keyed BLAKE2b-128 of ``ts || salt`` under a key derived from ``secret``
    (one C call: HMAC-SHA256 through OpenSSL 3 cost several times more per nonce).
    Nonces tagged with ``HMAC-SHA256(secret, ts||salt)[:16]`` (issued before) are still
    accepted.  Any node configured with the same ``secret`` (and roughly synchronised
    clocks) can :meth:`check` it.

    Replay protection (:meth:`check_nc`) is *per node*: the highest ``nc`` seen for
    each nonce is kept in an LRU of ``nc_cache_size`` entries.  A nonce first seen here
    is accepted with any ``nc >= 1`` (it may have been used on another node).  When an
    entry is evicted while its nonce is still within the TTL, the issue time of that
    nonce raises a watermark, and any not-cached nonce issued at or before the
    watermark is refused from then on (it might have been seen before); :func:`verify`
    reports that case as STALE so the client silently retries with a fresh nonce.
    Entries for already-expired nonces are evicted without raising the watermark.

    Not thread-safe; use from one event loop.  ``clock`` returns seconds (float).
    """

    def __init__(
        self,
        secret: bytes,
        ttl: float = 300,
        clock: Callable[[], float] = time.time,
        nc_cache_size: int = 100_000,
    ) -> None:
        if not isinstance(secret, bytes | bytearray) or not secret:
            raise ValueError("secret must be non-empty bytes (32 random bytes recommended)")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if nc_cache_size < 1:
            raise ValueError("nc_cache_size must be >= 1")
        self._secret = bytes(secret)
        self._key = hashlib.sha256(_NONCE_MAGIC + self._secret).digest()
        self.ttl = float(ttl)
        self._clock = clock
        self._nc_cache_size = nc_cache_size
        self._nc: OrderedDict[str, tuple[int, int]] = OrderedDict()  # nonce -> (ts_ms, nc)
        self._watermark_ms: int | None = None
        self._last: tuple[object, int | None] = ("", None)
        """The last nonce decoded and its result (verify checks a nonce twice)."""

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, digest_size=_TAG_LEN, key=self._key,
                               person=_NONCE_PERSON).digest()

    def _tag_v1(self, body: bytes) -> bytes:
        return hmac.digest(self._secret, _NONCE_MAGIC + body, "sha256")[:_TAG_LEN]

    def generate(self) -> str:
        """A fresh nonce, timestamped with the injected clock."""
        body = _TS.pack(self._now_ms()) + secrets.token_bytes(_SALT_LEN)
        raw = body + self._tag(body)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def _decode(self, nonce: object) -> int | None:
        """Issue time (ms) of an authentic nonce, or None."""
        last = self._last
        if last[0] is nonce:
            return last[1]
        ts = self._decode_uncached(nonce)
        self._last = (nonce, ts)
        return ts

    def _decode_uncached(self, nonce: object) -> int | None:
        if not isinstance(nonce, str) or len(nonce) != _B64_LEN:
            return None
        if not _B64_CHARS.issuperset(nonce):
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=")
        except (binascii.Error, ValueError):
            return None
        # Reject non-canonical encodings (unused trailing bits set) so that one nonce has
        # exactly one spelling; the replay cache is keyed by the string.
        if len(raw) != _RAW_LEN or base64.urlsafe_b64encode(raw).rstrip(b"=") != nonce.encode():
            return None
        body, tag = raw[:-_TAG_LEN], raw[-_TAG_LEN:]
        if not (hmac.compare_digest(tag, self._tag(body))
                or hmac.compare_digest(tag, self._tag_v1(body))):
            return None
        return _TS.unpack(body[: _TS.size])[0]

    def _state(self, ts_ms: int | None, now_ms: int) -> NonceState:
        if ts_ms is None or ts_ms - now_ms > _MAX_FUTURE_MS:
            return NonceState.INVALID
        if now_ms - ts_ms > self.ttl * 1000:
            return NonceState.STALE
        return NonceState.VALID

    def check(self, nonce: str) -> NonceState:
        """Classify ``nonce`` as VALID, STALE (authentic but expired) or INVALID."""
        return self._state(self._decode(nonce), self._now_ms())

    def _check_nc(self, nonce: str, nc: int) -> _Nc:
        ts_ms = self._decode(nonce)
        if ts_ms is None or not isinstance(nc, int) or nc < 1:
            return _Nc.REPLAY
        entry = self._nc.get(nonce)
        if entry is not None:
            if nc <= entry[1]:
                return _Nc.REPLAY
            self._nc[nonce] = (ts_ms, nc)
            self._nc.move_to_end(nonce)
            return _Nc.OK
        if self._watermark_ms is not None and ts_ms <= self._watermark_ms:
            return _Nc.EVICTED
        self._nc[nonce] = (ts_ms, nc)
        now_ms = self._now_ms()
        while len(self._nc) > self._nc_cache_size:
            _, (old_ts, _old_nc) = self._nc.popitem(last=False)
            if self._state(old_ts, now_ms) is NonceState.VALID:
                wm = self._watermark_ms
                self._watermark_ms = old_ts if wm is None else max(wm, old_ts)
        return _Nc.OK

    def check_nc(self, nonce: str, nc: int) -> bool:
        """Record ``nc`` for ``nonce``; False for a repeated/lower nc or a refused nonce.

        Call this only after the response digest has been verified, otherwise anyone
        could burn a client's nonce by sending a huge ``nc`` with a bogus response.
        """
        return self._check_nc(nonce, nc) is _Nc.OK


# --------------------------------------------------------------------------- challenges


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(
    realm: str,
    nonce: str,
    *,
    stale: bool = False,
    algorithms: Sequence[str] = ("MD5", "SHA-256"),
    opaque: str | None = None,
    qop: str = "auth",
) -> list[str]:
    """``WWW-Authenticate``/``Proxy-Authenticate`` values, one per algorithm, in order.

    Each is ``Digest realm="…", nonce="…", algorithm=…, qop="auth"`` plus ``opaque``
    and ``stale=true`` when given.  Add them as separate header fields in list order.

    RFC 7616/8760 say the client uses the *first* challenge it supports, so the order
    is the server's preference.  The default puts MD5 first for interoperability: many
    SIP clients (sipsak, SIPp, older phones) only implement MD5 and some simply take
    the first challenge; with SHA-256 first they may fail to authenticate at all.  Pass
    ``algorithms=("SHA-256", "MD5")`` (or SHA-256 only) when the client population
    follows RFC 8760.  Raises ValueError for an algorithm unsupported by this build.
    """
    if not algorithms:
        raise ValueError("at least one algorithm is required")
    out: list[str] = []
    for alg in algorithms:
        canon = canonical_algorithm(alg)
        if canon is None:
            raise ValueError(f"unsupported digest algorithm: {alg!r}")
        parts = [
            f"realm={_quote(realm)}",
            f"nonce={_quote(nonce)}",
            f"algorithm={canon}",
            f"qop={_quote(qop)}",
        ]
        if opaque is not None:
            parts.append(f"opaque={_quote(opaque)}")
        if stale:
            parts.append("stale=true")
        out.append("Digest " + ", ".join(parts))
    return out


# --------------------------------------------------------------------------- verification


class AuthStatus(enum.Enum):
    OK = "ok"
    #: No (Digest) credentials: challenge.
    NO_CREDENTIALS = "no_credentials"
    #: Correct password but expired/unusable nonce: challenge with ``stale=true``.
    STALE = "stale"
    #: Anything else: challenge (``stale=false``) or reject.
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of :func:`verify`. ``reason`` is for logs only; never send it to clients."""

    status: AuthStatus
    username: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


def _invalid(reason: str, username: str | None = None) -> AuthResult:
    return AuthResult(AuthStatus.INVALID, username, reason)


_NC_RE = re.compile(r"[0-9a-fA-F]{8}")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")


def _is_nc(nc: str) -> bool:
    return _NC_RE.fullmatch(nc) is not None


def verify(
    creds: DigestCredentials | None,
    *,
    method: str,
    realm: str,
    ha1_lookup: Callable[[str, str, str], str | None],
    nonces: NonceManager,
    algorithms: Collection[str] | None = None,
    body: bytes | None = None,
    request_uri: str | None = None,
    opaque: str | None = None,
    allow_rfc2069: bool = False,
) -> AuthResult:
    """Verify Digest credentials for a request.

    ``ha1_lookup(username, realm, base_algorithm)`` returns the base HA1 hex for
    ``"MD5"``, ``"SHA-256"`` or ``"SHA-512-256"`` (never a ``-sess`` name), or None for
    an unknown user / unavailable algorithm; its exceptions propagate.

    Checks, in order: realm equals ``realm``; algorithm supported (and in
    ``algorithms`` if given, to refuse downgrades); qop is ``auth`` with an 8-hex-digit
    ``nc`` and a ``cnonce`` (``auth-int`` only when ``body`` is given; no qop only with
    ``allow_rfc2069``); ``uri`` equals ``request_uri`` and ``opaque`` matches if those
    are given; nonce authentic; response digest (constant-time, case-insensitive).
    Only after a correct digest: expired nonce -> STALE, nc replay -> INVALID, nonce
    evicted from the replay cache -> STALE, else OK.
    """
    if creds is None:
        return AuthResult(AuthStatus.NO_CREDENTIALS, reason="no credentials")
    user = creds.username
    if creds.realm != realm:
        return _invalid("realm mismatch", user)
    alg = canonical_algorithm(creds.algorithm)
    if alg is None:
        return _invalid(f"unsupported algorithm {creds.algorithm!r}", user)
    if algorithms is not None and alg not in {canonical_algorithm(a) for a in algorithms}:
        return _invalid(f"algorithm {alg} not offered", user)
    qop = creds.qop
    nc_value: int | None = None
    if qop is None:
        if not allow_rfc2069:
            return _invalid("qop missing", user)
        if alg.endswith("-sess") and creds.cnonce is None:
            return _invalid("cnonce missing", user)
    elif qop in ("auth", "auth-int"):
        if qop == "auth-int" and body is None:
            return _invalid("qop=auth-int not supported here", user)
        if creds.nc is None or not _is_nc(creds.nc):
            return _invalid("bad or missing nc", user)
        if not creds.cnonce:
            return _invalid("cnonce missing", user)
        nc_value = int(creds.nc, 16)
    else:
        return _invalid(f"unsupported qop {qop!r}", user)
    if request_uri is not None and creds.uri != request_uri:
        return _invalid("digest uri does not match request uri", user)
    if opaque is not None and creds.opaque != opaque:
        return _invalid("opaque mismatch", user)

    state = nonces.check(creds.nonce)
    if state is NonceState.INVALID:
        return _invalid("invalid nonce", user)

    base = alg.removesuffix("-sess")
    ha1 = ha1_lookup(user, realm, base)
    if ha1 is None:
        return _invalid("unknown user or no HA1 for algorithm", user)
    ha1 = ha1.strip().lower()
    if len(ha1) != _HEX_LEN[base] or _LOWER_HEX_RE.fullmatch(ha1) is None:
        return _invalid("malformed HA1 from lookup", user)
    body_hash = hash_hex(alg, body) if qop == "auth-int" and body is not None else None
    expected = compute_response(
        alg, ha1, creds.nonce, creds.nc, creds.cnonce, qop, method, creds.uri, body_hash
    )
    if not hmac.compare_digest(_enc(creds.response.lower()), expected.encode("ascii")):
        return _invalid("wrong response digest", user)

    if state is NonceState.STALE:
        return AuthResult(AuthStatus.STALE, user, "nonce expired")
    if nc_value is not None:
        nc_state = nonces._check_nc(creds.nonce, nc_value)
        if nc_state is _Nc.REPLAY:
            return _invalid("nonce count replayed", user)
        if nc_state is _Nc.EVICTED:
            return AuthResult(AuthStatus.STALE, user, "nonce evicted from replay cache")
    return AuthResult(AuthStatus.OK, user)
