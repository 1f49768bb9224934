"""Tests for siphon.auth.digest and siphon.auth.credentials."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from siphon.auth.credentials import CredentialEntry, HttpCredentials, StaticCredentials
from siphon.auth.digest import (
    SUPPORTED_ALGORITHMS,
    AuthStatus,
    DigestCredentials,
    DigestParseError,
    NonceManager,
    NonceState,
    base_algorithm,
    challenge,
    compute_ha1,
    compute_response,
    hash_hex,
    parse_authorization,
    verify,
)

SECRET = b"s" * 32
REALM = "siphon.example"
URI = "sip:siphon.example"


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- helpers


def _challenge_params(value: str) -> dict[str, str]:
    assert value.startswith("Digest ")
    return {
        m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', value[7:])
    }


def _answer(
    chal: str,
    *,
    username: str = "alice",
    password: str = "wonderland",
    method: str = "REGISTER",
    uri: str = URI,
    nc: int = 1,
    cnonce: str = "0a4f113b",
) -> str:
    """What a UAC would put in Authorization for challenge value ``chal``."""
    p = _challenge_params(chal)
    alg = p["algorithm"]
    ha1 = compute_ha1(alg, username, p["realm"], password)
    ncs = f"{nc:08x}"
    resp = compute_response(alg, ha1, p["nonce"], ncs, cnonce, "auth", method, uri)
    return (
        f'Digest username="{username}", realm="{p["realm"]}", nonce="{p["nonce"]}", '
        f'uri="{uri}", response="{resp}", algorithm={alg}, cnonce="{cnonce}", '
        f"qop=auth, nc={ncs}" + (f', opaque="{p["opaque"]}"' if "opaque" in p else "")
    )


USERS = StaticCredentials({"alice": "wonderland"})


def _verify(header: str | None, nonces: NonceManager, **kw: object) -> AuthStatus:
    creds = parse_authorization(header) if header is not None else None
    kw.setdefault("ha1_lookup", USERS.ha1)
    return verify(creds, method="REGISTER", realm=REALM, nonces=nonces, **kw).status  # type: ignore[arg-type]


# --------------------------------------------------------------------------- RFC vectors

RFC2617_HEADER = """Digest username="Mufasa",
                 realm="testrealm@host.com",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 uri="/dir/index.html",
                 qop=auth,
                 nc=00000001,
                 cnonce="0a4f113b",
                 response="6629fae49393a05397450978507c4ef1",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41\""""

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


def test_rfc2617_vector() -> None:
    creds = parse_authorization(RFC2617_HEADER)
    assert creds is not None
    assert (creds.username, creds.realm, creds.qop, creds.nc) == (
        "Mufasa",
        "testrealm@host.com",
        "auth",
        "00000001",
    )
    assert creds.opaque == "5ccc069c403ebaf9f0171e9517f40e41"
    ha1 = compute_ha1("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life")
    resp = compute_response(
        "MD5", ha1, creds.nonce, creds.nc, creds.cnonce, creds.qop, "GET", creds.uri
    )
    assert resp == "6629fae49393a05397450978507c4ef1" == creds.response


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_vectors(algorithm: str, expected: str) -> None:
    ha1 = compute_ha1(algorithm, "Mufasa", "http-auth@example.org", "Circle of Life")
    resp = compute_response(
        algorithm, ha1, RFC7616_NONCE, "00000001", RFC7616_CNONCE, "auth", "GET",
        "/dir/index.html",
    )  # fmt: skip
    assert resp == expected
    header = (
        f'Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="{RFC7616_NONCE}", nc=00000001, '
        f'cnonce="{RFC7616_CNONCE}", qop=auth, response="{expected}", '
        'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )
    creds = parse_authorization(header)
    assert creds is not None and creds.algorithm == algorithm and creds.response == expected


def test_rfc2069_form_and_sess() -> None:
    ha1 = compute_ha1("MD5", "u", "r", "p")
    assert compute_response("MD5", ha1, "n", None, None, None, "GET", "/") == hash_hex(
        "MD5", f"{ha1}:n:{hash_hex('MD5', b'GET:/')}".encode()
    )
    sess = hash_hex("MD5", f"{ha1}:n:c".encode())
    assert compute_response("MD5-sess", ha1, "n", "00000001", "c", "auth", "GET", "/") == (
        compute_response("MD5", sess, "n", "00000001", "c", "auth", "GET", "/")
    )
    with pytest.raises(ValueError):
        compute_response("MD5", ha1, "n", "00000001", "c", "auth-int", "GET", "/")
    with pytest.raises(ValueError):
        compute_ha1("SHA-1", "u", "r", "p")


@pytest.mark.skipif("SHA-512-256" not in SUPPORTED_ALGORITHMS, reason="no sha512_256")
def test_sha512_256_is_the_real_one() -> None:
    # FIPS 180-4 / NIST example for SHA-512/256("abc"); not a truncated SHA-512.
    assert hash_hex("SHA-512-256", b"abc") == (
        "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
    )


def test_algorithm_names() -> None:
    assert base_algorithm(None) == "MD5"
    assert base_algorithm("sha-256-SESS") == "SHA-256"
    assert base_algorithm("SHA-1") is None
    assert {"MD5", "MD5-sess", "SHA-256", "SHA-256-sess"} <= set(SUPPORTED_ALGORITHMS)


# --------------------------------------------------------------------------- parsing


def test_parse_case_whitespace_escapes_and_unknown_params() -> None:
    creds = parse_authorization(
        'dIgEsT  UserName = "a\\"l\\\\ice" ,REALM=\r\n "r" ,, nonce="n",uri="sip:x",'
        ' response="ABC", Algorithm=sha-256, qop="auth", NC=0000000a, cnonce=xyz,'
        ' foo=bar, Baz="q u x"'
    )
    assert creds == DigestCredentials(
        username='a"l\\ice', realm="r", nonce="n", uri="sip:x", response="ABC",
        algorithm="sha-256", qop="auth", nc="0000000a", cnonce="xyz",
        params={"foo": "bar", "baz": "q u x"},
    )  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "NoOneKnowsThisScheme foo=bar",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        'Digestusername="a"',  # a different (unknown) scheme token
        '"Digest" username="a"',
    ],
)
def test_non_digest_is_none(value: str) -> None:
    assert parse_authorization(value) is None


@pytest.mark.parametrize(
    "value",
    [
        "Digest",
        'Digest username="a"',  # missing required params
        'Digest username="a, realm="r"',  # unterminated
        'Digest username="a" realm="r"',  # missing comma
        'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="x"',
        "Digest =x",
        "Digest username=",
        'Digest username="a\x00", realm="r", nonce="n", uri="u", response="x"',
    ],
)
def test_malformed_raises(value: str) -> None:
    with pytest.raises(DigestParseError):
        parse_authorization(value)


def test_garbage_never_raises_unexpected() -> None:
    rng = random.Random(1234)
    good = _answer(challenge(REALM, "n" * 43)[0])
    alphabet = 'Digest =,"\\\t\r\n\x00abcXYZ0123-_/+é€\ud800'
    for i in range(5000):
        if i % 2:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:
            chars = list(good)
            for _ in range(rng.randint(1, 6)):
                pos = rng.randrange(len(chars))
                op = rng.randrange(3)
                if op == 0:
                    del chars[pos]
                elif op == 1:
                    chars.insert(pos, rng.choice(alphabet))
                else:
                    chars[pos] = rng.choice(alphabet)
            s = "".join(chars)
        try:
            creds = parse_authorization(s)
        except DigestParseError:
            continue
        assert creds is None or isinstance(creds, DigestCredentials)
        # Verification of whatever parsed must not blow up either.
        verify(creds, method="REGISTER", realm=REALM, ha1_lookup=USERS.ha1,
               nonces=NonceManager(SECRET))  # fmt: skip


# --------------------------------------------------------------------------- challenges


def test_challenge_format() -> None:
    vals = challenge('we"ird', "N", opaque="op", stale=True)
    assert vals == [
        'Digest realm="we\\"ird", nonce="N", algorithm=MD5, qop="auth", opaque="op", stale=true',
        'Digest realm="we\\"ird", nonce="N", algorithm=SHA-256, qop="auth", opaque="op", '
        "stale=true",
    ]
    assert challenge("r", "N", algorithms=("sha-256",)) == [
        'Digest realm="r", nonce="N", algorithm=SHA-256, qop="auth"'
    ]
    with pytest.raises(ValueError):
        challenge("r", "N", algorithms=("SHA-1",))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_round_trip_each_algorithm(algorithm: str) -> None:
    nonces = NonceManager(SECRET)
    [chal] = challenge(REALM, nonces.generate(), algorithms=(algorithm,), opaque="xyz")
    header = _answer(chal)
    creds = parse_authorization(header)
    result = verify(
        creds, method="REGISTER", realm=REALM, ha1_lookup=USERS.ha1, nonces=nonces,
        algorithms=(algorithm,), request_uri=URI, opaque="xyz",
    )  # fmt: skip
    assert result.ok and result.username == "alice"
    # Same request again (same nc) is a replay.
    assert _verify(header, nonces) is AuthStatus.INVALID
    # Next nc with the same nonce is fine.
    assert _verify(_answer(chal, nc=2), nonces) is AuthStatus.OK


def test_no_credentials() -> None:
    assert _verify(None, NonceManager(SECRET)) is AuthStatus.NO_CREDENTIALS


def test_uppercase_response_accepted() -> None:
    nonces = NonceManager(SECRET)
    header = _answer(challenge(REALM, nonces.generate())[0])
    upper = re.sub(r'response="(\w+)"', lambda m: f'response="{m.group(1).upper()}"', header)
    assert _verify(upper, nonces) is AuthStatus.OK


@pytest.mark.parametrize(
    ("mutate", "kw"),
    [
        (lambda h: h, {"ha1_lookup": StaticCredentials({"alice": "other"}).ha1}),  # wrong pw
        (lambda h: h, {"ha1_lookup": StaticCredentials({}).ha1}),  # unknown user
        (lambda h: h.replace(f'realm="{REALM}"', 'realm="evil"'), {}),
        (lambda h: h.replace("algorithm=MD5", "algorithm=SHA-1"), {}),
        (lambda h: h.replace("nc=00000001", "nc=1"), {}),
        (lambda h: h.replace("qop=auth", "qop=auth-int"), {}),
        (lambda h: h.replace("qop=auth", "qop=bogus"), {}),
        (lambda h: h.replace(", qop=auth, nc=00000001", ""), {}),  # RFC 2069 not allowed
        (lambda h: h.replace('cnonce="0a4f113b"', 'cnonce=""'), {}),
        (lambda h: h, {"algorithms": ("SHA-256",)}),  # downgrade to MD5 refused
        (lambda h: h, {"request_uri": "sip:other.example"}),
        (lambda h: h, {"opaque": "expected"}),
        (lambda h: h, {"ha1_lookup": lambda u, r, a: "not-hex"}),
    ],
)
def test_invalid_cases(mutate, kw) -> None:  # type: ignore[no-untyped-def]
    nonces = NonceManager(SECRET)
    header = mutate(_answer(challenge(REALM, nonces.generate(), algorithms=("MD5",))[0]))
    assert _verify(header, nonces, **kw) is AuthStatus.INVALID


def test_rfc2069_when_allowed() -> None:
    nonces = NonceManager(SECRET)
    p = _challenge_params(challenge(REALM, nonces.generate())[0])
    ha1 = compute_ha1("MD5", "alice", REALM, "wonderland")
    resp = compute_response("MD5", ha1, p["nonce"], None, None, None, "REGISTER", URI)
    header = (
        f'Digest username="alice", realm="{REALM}", nonce="{p["nonce"]}", uri="{URI}", '
        f'response="{resp}"'
    )
    assert _verify(header, nonces) is AuthStatus.INVALID
    assert _verify(header, nonces, allow_rfc2069=True) is AuthStatus.OK


def test_auth_int_with_body() -> None:
    nonces = NonceManager(SECRET)
    nonce = nonces.generate()
    body = b"v=0\r\n"
    ha1 = compute_ha1("SHA-256", "alice", REALM, "wonderland")
    resp = compute_response(
        "SHA-256", ha1, nonce, "00000001", "c", "auth-int", "INVITE", URI,
        hash_hex("SHA-256", body),
    )  # fmt: skip
    creds = DigestCredentials(
        username="alice", realm=REALM, nonce=nonce, uri=URI, response=resp,
        algorithm="SHA-256", qop="auth-int", nc="00000001", cnonce="c",
    )  # fmt: skip
    common = {"method": "INVITE", "realm": REALM, "ha1_lookup": USERS.ha1, "nonces": nonces}
    assert verify(creds, **common).status is AuthStatus.INVALID  # no body -> unsupported
    assert verify(creds, body=b"tampered", **common).status is AuthStatus.INVALID
    assert verify(creds, body=body, **common).ok


# --------------------------------------------------------------------------- nonces


def test_stale_nonce_via_clock() -> None:
    clock = FakeClock()
    nonces = NonceManager(SECRET, ttl=300, clock=clock)
    nonce = nonces.generate()
    header = _answer(challenge(REALM, nonce)[0])
    clock.t += 299
    assert nonces.check(nonce) is NonceState.VALID
    clock.t += 2
    assert nonces.check(nonce) is NonceState.STALE
    assert _verify(header, nonces) is AuthStatus.STALE
    # A stale nonce with a wrong password is just INVALID (RFC 2617: stale only if the
    # digest is otherwise correct).
    bad = StaticCredentials({"alice": "nope"}).ha1
    assert _verify(header, nonces, ha1_lookup=bad) is AuthStatus.INVALID
    chal = challenge(REALM, nonces.generate(), stale=True)
    assert all(c.endswith(", stale=true") for c in chal)
    assert _verify(_answer(chal[0]), nonces) is AuthStatus.OK


def test_forged_and_foreign_nonces() -> None:
    clock = FakeClock()
    a = NonceManager(SECRET, clock=clock)
    b = NonceManager(SECRET, clock=clock)
    other = NonceManager(b"x" * 32, clock=clock)
    nonce = a.generate()
    assert a.check(nonce) is NonceState.VALID
    assert b.check(nonce) is NonceState.VALID
    assert other.check(nonce) is NonceState.INVALID
    # Flip one bit of the tag.
    raw = bytearray(base64.urlsafe_b64decode(nonce + "="))
    raw[-1] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert a.check(forged) is NonceState.INVALID
    # Change the timestamp, keep the tag.
    raw = bytearray(base64.urlsafe_b64decode(nonce + "="))
    raw[7] ^= 0x10
    assert a.check(base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()) is (
        NonceState.INVALID
    )
    # Non-canonical spelling of the same bytes (last char's unused bits set).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    idx = alphabet.index(nonce[-1])
    alt = nonce[:-1] + alphabet[idx ^ 1]
    assert a.check(alt) is NonceState.INVALID
    for junk in ["", "abc", nonce + "A", nonce[:-1], "!" * 43, "\u00e9" * 43]:
        assert a.check(junk) is NonceState.INVALID
    # Header carrying a forged nonce.
    header = _answer(challenge(REALM, forged)[0])
    assert _verify(header, a) is AuthStatus.INVALID


def test_nonces_issued_before_the_blake2b_tags_still_verify() -> None:
    """A nonce tagged HMAC-SHA256 (what siphon issued before) answered after an upgrade
    is still valid on a node with the same secret; with another secret it is not."""
    import hmac
    import struct

    clock = FakeClock()
    body = struct.pack(">q", int(clock() * 1000)) + b"\x01" * 8
    tag = hmac.digest(SECRET, b"siphon-digest-nonce-v1\x00" + body, "sha256")[:16]
    old = base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode()
    assert NonceManager(SECRET, clock=clock).check(old) is NonceState.VALID
    assert NonceManager(b"x" * 32, clock=clock).check(old) is NonceState.INVALID
    header = _answer(challenge(REALM, old)[0])
    assert _verify(header, NonceManager(SECRET, clock=clock)) is AuthStatus.OK
    # what is issued now is not an HMAC-SHA256 tag
    new = base64.urlsafe_b64decode(NonceManager(SECRET, clock=clock).generate() + "=")
    assert new[16:] != hmac.digest(SECRET, b"siphon-digest-nonce-v1\x00" + new[:16],
                                   "sha256")[:16]


def test_future_nonce_invalid() -> None:
    clock = FakeClock()
    nonces = NonceManager(SECRET, clock=clock)
    clock.t += 61
    future = nonces.generate()
    clock.t -= 61
    assert nonces.check(future) is NonceState.INVALID
    clock.t += 2  # now only 59 s ahead: tolerated clock skew
    assert nonces.check(future) is NonceState.VALID


def test_nc_replay() -> None:
    nonces = NonceManager(SECRET)
    n = nonces.generate()
    assert nonces.check_nc(n, 1)
    assert not nonces.check_nc(n, 1)
    assert nonces.check_nc(n, 2)
    assert nonces.check_nc(n, 5)
    assert not nonces.check_nc(n, 3)
    assert not nonces.check_nc(n, 0)
    assert not nonces.check_nc("garbage", 1)
    # First sighting on another node accepts any nc >= 1.
    assert NonceManager(SECRET).check_nc(n, 7)


def test_nc_replay_via_verify_does_not_poison_on_bad_digest() -> None:
    nonces = NonceManager(SECRET)
    chal = challenge(REALM, nonces.generate())[0]
    bogus = _answer(chal, password="guess", nc=0xFFFFFFFF)
    assert _verify(bogus, nonces) is AuthStatus.INVALID
    assert _verify(_answer(chal, nc=1), nonces) is AuthStatus.OK


def test_nc_cache_eviction() -> None:
    clock = FakeClock()
    nonces = NonceManager(SECRET, clock=clock, nc_cache_size=2)
    n1 = nonces.generate()
    clock.t += 1
    n2, n3 = nonces.generate(), nonces.generate()
    clock.t += 1
    n4 = nonces.generate()
    assert nonces.check_nc(n1, 1)
    assert nonces.check_nc(n2, 1)
    assert nonces.check_nc(n3, 1)  # evicts n1
    assert not nonces.check_nc(n1, 2)  # evicted: refused even with a higher nc
    assert nonces.check_nc(n4, 1)  # issued after the evicted one: fine
    assert not nonces.check_nc(n2, 1)  # n2 was evicted by n4 and is older than watermark
    # verify() turns an evicted nonce into STALE so the client retries transparently.
    chal = challenge(REALM, n1)[0]
    assert _verify(_answer(chal, nc=9), nonces) is AuthStatus.STALE
    # Expired entries are evicted without raising the watermark.
    clock.t += 1000
    n5, n6, n7 = nonces.generate(), nonces.generate(), nonces.generate()
    assert nonces.check_nc(n5, 1) and nonces.check_nc(n6, 1) and nonces.check_nc(n7, 1)
    assert not nonces.check_nc(n5, 1)  # n5 evicted while valid -> refused


def test_nonce_manager_args() -> None:
    with pytest.raises(ValueError):
        NonceManager(b"")
    with pytest.raises(ValueError):
        NonceManager(SECRET, ttl=0)


# --------------------------------------------------------------------------- static credentials


def test_static_credentials() -> None:
    md5 = compute_ha1("MD5", "bob", REALM, "pw")
    sha = compute_ha1("SHA-256", "bob", REALM, "pw")
    creds = StaticCredentials(
        {"alice": "wonderland", "bob": {"ha1": md5.upper(), "ha1_sha256": sha}}
    )
    alice_md5 = compute_ha1("MD5", "alice", REALM, "wonderland")
    alice_sha = compute_ha1("SHA-256", "alice", REALM, "wonderland")
    assert creds.ha1("alice", REALM, "SHA-256") == alice_sha
    assert creds.ha1("alice", REALM, "md5-sess") == alice_md5
    assert creds.ha1("bob", REALM, "MD5") == md5
    assert creds.ha1("bob", REALM, "SHA-256") == sha
    assert creds.ha1("bob", REALM, "SHA-512-256") is None
    assert creds.ha1("carol", REALM, "MD5") is None
    assert creds.ha1("alice", REALM, "SHA-1") is None
    nonces = NonceManager(SECRET)
    for alg in ("MD5", "SHA-256"):
        [chal] = challenge(REALM, nonces.generate(), algorithms=(alg,))
        assert _verify(_answer(chal, username="bob", password="pw"), nonces,
                       ha1_lookup=creds.ha1) is AuthStatus.OK  # fmt: skip
    for bad in ({"ha1": "xyz"}, {"ha1_md4": md5}, {}, {"ha1_sha256": md5}):
        with pytest.raises(ValueError):
            StaticCredentials({"x": bad})


# --------------------------------------------------------------------------- HTTP credentials


class CredServer:
    def __init__(self) -> None:
        self.hits = 0
        self.requests: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.url = ""

    async def _record(self, request: web.Request) -> None:
        self.hits += 1
        self.requests.append(await request.json())

    async def text(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(text="wonderland\n")

    async def ha1(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(text=compute_ha1("MD5", "alice", REALM, "wonderland"))

    async def json_pw(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"password": "wonderland", "extra": 1})

    async def json_ha1(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({
            "ha1": compute_ha1("MD5", "alice", REALM, "wonderland"),
            "ha1_sha256": compute_ha1("SHA-256", "alice", REALM, "wonderland"),
        })  # fmt: skip

    async def bad_json(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(["nope"])

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        try:
            await asyncio.wait_for(self.release.wait(), 5)
        except TimeoutError:
            pass
        return web.Response(text="late")


@pytest.fixture
async def cred_server() -> AsyncIterator[CredServer]:
    srv = CredServer()
    app = web.Application()
    for name in ("text", "ha1", "json_pw", "json_ha1", "bad_json", "slow"):
        app.router.add_post(f"/{name}", getattr(srv, name))
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.url = f"http://{host}:{port}"
    yield srv
    srv.release.set()
    await runner.cleanup()


async def test_http_plain_text(cred_server: CredServer) -> None:
    async with HttpCredentials(cred_server.url + "/text") as hc:
        entry = await hc.fetch("alice", REALM)
        assert entry == CredentialEntry(password="wonderland")
        assert cred_server.requests == [{"username": "alice", "realm": REALM}]
        nonces = NonceManager(SECRET)
        [chal] = challenge(REALM, nonces.generate(), algorithms=("SHA-256",))
        assert _verify(_answer(chal), nonces, ha1_lookup=hc.ha1) is AuthStatus.OK
        assert hc.ha1("bob", REALM, "MD5") is None  # never fetched


async def test_http_plain_text_ha1(cred_server: CredServer) -> None:
    async with HttpCredentials(cred_server.url + "/ha1", ha1=True) as hc:
        assert await hc.fetch("alice", REALM) is not None
        assert hc.ha1("alice", REALM, "MD5") == compute_ha1("MD5", "alice", REALM, "wonderland")
        assert hc.ha1("alice", REALM, "SHA-256") is None  # HA1 over HTTP is MD5-only


async def test_http_json(cred_server: CredServer) -> None:
    async with HttpCredentials(cred_server.url + "/json_pw") as hc:
        assert await hc.fetch("alice", REALM) == CredentialEntry(password="wonderland")
    async with HttpCredentials(cred_server.url + "/json_ha1") as hc:
        await hc.fetch("alice", REALM)
        for alg in ("MD5", "SHA-256"):
            assert hc.ha1("alice", REALM, alg) == compute_ha1(alg, "alice", REALM, "wonderland")
        assert hc.ha1("alice", REALM, "SHA-512-256") is None
    async with HttpCredentials(cred_server.url + "/bad_json") as hc:
        assert await hc.fetch("alice", REALM) is None


async def test_http_404_forgets_user(
    cred_server: CredServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = cred_server.url + "/missing"
    async with HttpCredentials(url) as hc:
        with caplog.at_level(logging.WARNING, logger="siphon.auth.credentials"):
            assert await hc.fetch("alice", REALM) is None
        assert hc.ha1("alice", REALM, "MD5") is None
    assert any(url in r.getMessage() and "404" in r.getMessage() for r in caplog.records)


async def test_http_timeout(cred_server: CredServer, caplog: pytest.LogCaptureFixture) -> None:
    async with HttpCredentials(cred_server.url + "/slow", timeout=0.2) as hc:
        with caplog.at_level(logging.WARNING, logger="siphon.auth.credentials"):
            assert await hc.fetch("alice", REALM) is None
    assert any("timeout" in r.getMessage() for r in caplog.records)


async def test_http_connection_refused(caplog: pytest.LogCaptureFixture) -> None:
    # Bind and close a port so nothing listens there.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with HttpCredentials(f"http://127.0.0.1:{port}/", timeout=1) as hc:
        with caplog.at_level(logging.WARNING, logger="siphon.auth.credentials"):
            assert await hc.fetch("alice", REALM) is None
    assert any(str(port) in r.getMessage() for r in caplog.records)


async def test_http_cache_ttl(cred_server: CredServer) -> None:
    clock = FakeClock(0.0)
    async with HttpCredentials(cred_server.url + "/text", cache_ttl=10, clock=clock) as hc:
        await hc.fetch("alice", REALM)
        await hc.fetch("alice", REALM)
        assert cred_server.hits == 1
        clock.t += 11
        await hc.fetch("alice", REALM)
        assert cred_server.hits == 2
    async with HttpCredentials(cred_server.url + "/text") as hc:  # no cache by default
        await hc.fetch("alice", REALM)
        await hc.fetch("alice", REALM)
        assert cred_server.hits == 4
