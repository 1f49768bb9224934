"""Credential backends producing HA1 values for :func:`siphon.auth.digest.verify`.

Both backends expose ``ha1(username, realm, algorithm) -> str | None`` which can be
passed directly as ``ha1_lookup``.  ``algorithm`` may be given with or without
``-sess`` and in any case; the base HA1 ``H(username:realm:password)`` is returned.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import aiohttp
import msgspec

from siphon.auth.digest import base_algorithm, compute_ha1

__all__ = ["CredentialEntry", "HttpCredentials", "StaticCredentials"]

log = logging.getLogger(__name__)

#: Mapping / JSON keys holding a precomputed HA1, by base algorithm.
HA1_KEYS: dict[str, str] = {"ha1": "MD5", "ha1_sha256": "SHA-256", "ha1_sha512_256": "SHA-512-256"}
_HEX_LEN = {"MD5": 32, "SHA-256": 64, "SHA-512-256": 64}
_MAX_BODY = 64 * 1024


def _valid_ha1(algorithm: str, value: object) -> str | None:
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    if len(v) != _HEX_LEN[algorithm] or not all(c in "0123456789abcdef" for c in v):
        return None
    return v


class CredentialEntry(msgspec.Struct, frozen=True):
    """A user's secret: a plaintext password and/or precomputed HA1s by base algorithm.

    ``ha1s`` keys are ``"MD5"``, ``"SHA-256"``, ``"SHA-512-256"``; stored HA1s are only
    correct for the realm they were computed with.
    """

    password: str | None = None
    ha1s: dict[str, str] = msgspec.field(default_factory=dict)

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        """HA1 for ``algorithm`` (password-derived, else stored), or None."""
        base = base_algorithm(algorithm)
        if base is None:
            return None
        if self.password is not None:
            return compute_ha1(base, username, realm, self.password)
        return self.ha1s.get(base)


def _entry_from_mapping(data: Mapping[str, object], where: str) -> CredentialEntry:
    password: str | None = None
    ha1s: dict[str, str] = {}
    for key, value in data.items():
        if key == "password":
            if not isinstance(value, str):
                raise ValueError(f"{where}: password must be a string")
            password = value
        elif key in HA1_KEYS:
            alg = HA1_KEYS[key]
            ha1 = _valid_ha1(alg, value)
            if ha1 is None:
                raise ValueError(f"{where}: {key} must be {_HEX_LEN[alg]} hex digits")
            ha1s[alg] = ha1
        else:
            raise ValueError(f"{where}: unknown key {key!r}")
    if password is None and not ha1s:
        raise ValueError(f"{where}: needs 'password' or one of {', '.join(HA1_KEYS)}")
    return CredentialEntry(password=password, ha1s=ha1s)


class StaticCredentials:
    """In-memory users: ``{"alice": "secret"}`` or ``{"bob": {"ha1": "…", "ha1_sha256": "…"}}``.

    A mapping value may hold ``password`` and/or the HA1 keys ``ha1`` (MD5),
    ``ha1_sha256``, ``ha1_sha512_256``; malformed entries raise ValueError at
    construction.  Stored HA1s are returned whatever realm is asked for, so they must
    have been computed with the realm the server challenges with.
    """

    def __init__(self, users: Mapping[str, str | Mapping[str, str]]) -> None:
        self._users: dict[str, CredentialEntry] = {}
        for name, value in users.items():
            if isinstance(value, str):
                self._users[name] = CredentialEntry(password=value)
            elif isinstance(value, Mapping):
                self._users[name] = _entry_from_mapping(value, f"user {name!r}")
            else:
                raise ValueError(f"user {name!r}: expected a password or a mapping")

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        """Base HA1 for the user and algorithm, or None (unknown user / not available)."""
        entry = self._users.get(username)
        return None if entry is None else entry.ha1(username, realm, algorithm)


class HttpCredentials:
    """Fetch user secrets from an HTTP service.

    ``fetch`` POSTs ``{"username": …, "realm": …}`` as JSON to ``url``.  A 2xx answer is
    accepted when its body is

    * JSON (``application/json`` or ``+json``): an object with ``"password"`` and/or
      ``"ha1"`` (MD5), ``"ha1_sha256"``, ``"ha1_sha512_256"``;
    * anything else: the UTF-8 body text, minus trailing CR/LF, is the plaintext
      password, or the MD5 HA1 hex when ``ha1=True``.

    So an HA1 obtained over HTTP is MD5-only unless the JSON carries ``ha1_sha256`` /
    ``ha1_sha512_256``; a password works for every algorithm.  Non-2xx, timeout,
    connection errors and unusable bodies give None and a warning log (url + reason).

    ``fetch`` results are kept per (username, realm) for the synchronous :meth:`ha1`
    (``await fetch(...)`` before verifying); a failed fetch forgets the user, so ``ha1``
    fails closed.  With ``cache_ttl > 0`` a fetch younger than the TTL is served from
    memory.  At most ``max_entries`` users are remembered (LRU).

    The default aiohttp session is created lazily and closed by :meth:`close`; a
    session from ``session_factory`` (called once, lazily) belongs to the caller.
    """

    def __init__(
        self,
        url: str,
        *,
        ha1: bool = False,
        timeout: float = 2.0,
        cache_ttl: float = 0.0,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.url = url
        self._text_is_ha1 = ha1
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache_ttl = cache_ttl
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, CredentialEntry]] = OrderedDict()

    async def __aenter__(self) -> HttpCredentials:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this object created it."""
        session, self._session = self._session, None
        if session is not None and self._session_factory is None:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._session_factory is not None:
                self._session = self._session_factory()
            else:
                self._session = aiohttp.ClientSession()
        return self._session

    def _remember(self, key: tuple[str, str], entry: CredentialEntry) -> None:
        self._entries[key] = (self._clock(), entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def fetch(self, username: str, realm: str) -> CredentialEntry | None:
        """Fetch (or serve from the TTL cache) the entry for ``username`` in ``realm``."""
        key = (username, realm)
        cached = self._entries.get(key)
        if cached is not None and self._cache_ttl > 0:
            if self._clock() - cached[0] < self._cache_ttl:
                return cached[1]
        entry = await self._fetch(username, realm)
        if entry is None:
            self._entries.pop(key, None)
        else:
            self._remember(key, entry)
        return entry

    async def _fetch(self, username: str, realm: str) -> CredentialEntry | None:
        try:
            session = self._get_session()
            async with session.post(
                self.url, json={"username": username, "realm": realm}, timeout=self._timeout
            ) as resp:
                if not 200 <= resp.status < 300:
                    log.warning("credential lookup %s failed: HTTP %d", self.url, resp.status)
                    return None
                body = await resp.content.read(_MAX_BODY + 1)
                if len(body) > _MAX_BODY:
                    log.warning("credential lookup %s failed: body too large", self.url)
                    return None
                ctype = resp.content_type
        except TimeoutError:
            log.warning("credential lookup %s failed: timeout", self.url)
            return None
        except (aiohttp.ClientError, OSError) as e:
            log.warning("credential lookup %s failed: %s", self.url, e or type(e).__name__)
            return None
        try:
            return self._parse(body, ctype)
        except (ValueError, UnicodeDecodeError, msgspec.DecodeError) as e:
            log.warning("credential lookup %s failed: unusable body (%s)", self.url, e)
            return None

    def _parse(self, body: bytes, ctype: str) -> CredentialEntry | None:
        if ctype == "application/json" or ctype.endswith("+json"):
            data = msgspec.json.decode(body)
            if not isinstance(data, dict):
                raise ValueError("JSON body is not an object")
            known = {k: v for k, v in data.items() if k == "password" or k in HA1_KEYS}
            return _entry_from_mapping(known, "JSON body")
        text = body.decode("utf-8").rstrip("\r\n")
        if not text.strip():
            raise ValueError("empty body")
        if self._text_is_ha1:
            ha1 = _valid_ha1("MD5", text)
            if ha1 is None:
                raise ValueError("text body is not an MD5 HA1")
            return CredentialEntry(ha1s={"MD5": ha1})
        return CredentialEntry(password=text)

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        """HA1 from the last successful :meth:`fetch` for (username, realm), else None."""
        cached = self._entries.get((username, realm))
        return None if cached is None else cached[1].ha1(username, realm, algorithm)
