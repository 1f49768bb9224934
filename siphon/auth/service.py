"""Digest authentication of SIP requests, wired to the configured credential backend."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from siphon.auth.credentials import HttpCredentials, StaticCredentials
from siphon.auth.digest import (
    AuthResult,
    AuthStatus,
    DigestCredentials,
    DigestParseError,
    NonceManager,
    challenge,
    compute_ha1,
    parse_authorization,
    verify,
)
from siphon.config import Auth
from siphon.sip.message import Request

log = logging.getLogger("siphon.auth")


class AuthService:
    """Verifies credentials and produces challenges (401 / 407)."""

    def __init__(self, cfg: Auth, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.nonces = NonceManager(
            (cfg.nonce_secret or "").encode(), ttl=cfg.nonce_ttl_secs, clock=clock
        )
        self.http: HttpCredentials | None = None
        self.static: StaticCredentials | None = None
        if cfg.backend == "http" and cfg.http is not None and cfg.http.url:
            self.http = HttpCredentials(
                cfg.http.url, ha1=cfg.http.ha1, timeout=cfg.http.timeout_ms / 1000,
                cache_ttl=float(cfg.http.cache_ttl_secs),
            )
        else:
            users = {
                name: {k: v for k, v in (("password", c.password), ("ha1", c.ha1),
                                          ("ha1_sha256", c.ha1_sha256),
                                          ("ha1_sha512_256", c.ha1_sha512_256)) if v}
                for name, c in cfg.users.items()
            }
            self.static = StaticCredentials(users)

    @staticmethod
    def credentials(request: Request, proxy: bool = False) -> DigestCredentials | None:
        """The Digest credentials of a request (None when absent, foreign or malformed)."""
        names = ("Proxy-Authorization", "Authorization") if proxy else (
            "Authorization", "Proxy-Authorization")
        for name in names:
            value = request.headers.get(name)
            if value:
                try:
                    return parse_authorization(value)
                except DigestParseError:
                    return None
        return None

    async def prefetch(self, request: Request) -> None:
        """Fetch the credential of the request's user from the HTTP backend (if any),
        so that scripts can verify synchronously."""
        if self.http is None:
            return
        creds = self.credentials(request)
        if creds is not None:
            await self.http.fetch(creds.username, creds.realm)

    def _ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        backend = self.http if self.http is not None else self.static
        return backend.ha1(username, realm, algorithm) if backend is not None else None

    def check(self, request: Request, realm: str, proxy: bool = False,
              ha1: str | None = None, password: str | None = None) -> AuthResult:
        """Verify the request's credentials for ``realm``."""
        creds = self.credentials(request, proxy)
        if creds is None:
            return AuthResult(AuthStatus.NO_CREDENTIALS, reason="no credentials")
        lookup = self._ha1
        if ha1 is not None or password is not None:
            def lookup(user: str, rlm: str, alg: str) -> str | None:
                return ha1 if ha1 is not None else compute_ha1(alg, user, rlm, password or "")

        try:
            return verify(creds, method=request.method, realm=realm, ha1_lookup=lookup,
                          nonces=self.nonces, algorithms=self.cfg.algorithms)
        except Exception as exc:  # a backend failing must not crash the request
            log.warning("credential check failed for %r: %s", creds.username, exc)
            return AuthResult(AuthStatus.INVALID, reason=str(exc))

    def challenge_headers(self, realm: str, stale: bool, proxy: bool = False) -> list[
            tuple[str, str]]:
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self.nonces.generate()
        return [(name, v) for v in challenge(realm, nonce, stale=stale,
                                             algorithms=self.cfg.algorithms)]
