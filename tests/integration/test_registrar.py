"""Registrar behaviour (RFC 3261 §10.3) observed over the wire and through the admin API."""

from __future__ import annotations

import re
import time

import pytest
from conftest import SiphonProcess
from sipclient import UdpClient, authorization, build_request, md5_challenge, new_branch, new_tag

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

AOR = "sip:alice@example.com"


def contact_expires(resp) -> dict[str, int]:
    """Contact URI -> expires parameter of a 200 to REGISTER."""
    out = {}
    for value in resp.get_all("Contact"):
        m = re.fullmatch(r"<([^>]+)>(.*)", value)
        assert m, value
        e = re.search(r";expires=(\d+)", m.group(2))
        assert e, f"Contact without expires in a 200: {value}"
        out[m.group(1)] = int(e.group(1))
    return out


def test_interval_too_brief_gets_423_with_min_expires(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        resp, _ = ua.register("alice", "secret", expires=30)
        assert resp.status == 423, resp
        assert resp.get("Min-Expires") == "60", resp.raw
        resp, _ = ua.register("alice", "secret",
                              contact="<sip:alice@192.0.2.1:5060>;expires=59")
        assert resp.status == 423 and resp.get("Min-Expires") == "60", resp.raw
    assert siphon.contacts(AOR) is None


def test_expires_above_max_is_clamped(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                              expires=100_000)
    assert resp.status == 200, resp
    granted = contact_expires(resp)
    assert list(granted) == ["sip:alice@192.0.2.1:5060"], resp.raw
    assert 7190 <= granted["sip:alice@192.0.2.1:5060"] <= 7200, resp.raw
    [binding] = siphon.contacts(AOR) or [None]
    assert binding is not None and 7190 <= binding["expires_remaining"] <= 7200, binding


def test_wildcard_contact(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        for port in (5061, 5062):
            resp, _ = ua.register("alice", "secret", contact=f"<sip:alice@192.0.2.1:{port}>")
            assert resp.status == 200, resp
        assert len(siphon.contacts(AOR) or []) == 2

        resp, _ = ua.register("alice", "secret", contact="*")
        assert resp.status == 400, f"Contact: * without Expires: 0 accepted: {resp.raw!r}"
        resp, _ = ua.register("alice", "secret", contact="*", expires=3600)
        assert resp.status == 400, resp
        resp, _ = ua.register("alice", "secret", contact=["*", "<sip:alice@192.0.2.1:5063>"],
                              expires=0)
        assert resp.status == 400, resp
        assert len(siphon.contacts(AOR) or []) == 2, "a rejected wildcard changed bindings"

        resp, _ = ua.register("alice", "secret", contact="*", expires=0)
        assert resp.status == 200, resp
        assert resp.get_all("Contact") == [], resp.raw
    assert siphon.contacts(AOR) is None
    # One deregistered event per removed binding (contacts are as of the callback).
    deadline = time.monotonic() + 5
    while siphon.output().count(f"on_change {AOR} deregistered") < 2:
        assert time.monotonic() < deadline, siphon.tail()
        time.sleep(0.05)


def test_same_call_id_lower_cseq_gets_500_and_changes_nothing(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        resp, cseq = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                                 expires=1800, call_id="ordered@it", cseq=10)
        assert resp.status == 200 and cseq == 11, resp
        [before] = siphon.contacts(AOR) or [None]
        assert before is not None and before["cseq"] == 11, before

        # Older CSeq on the same Call-ID for the same contact: out of order.
        resp, cseq = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                                 expires=600, call_id="ordered@it", cseq=3)
        assert cseq == 4
        assert resp.status == 500, f"out-of-order REGISTER got {resp.status}: {resp.raw!r}"
        [after] = siphon.contacts(AOR) or [None]
        assert after is not None
        for key in ("uri", "cseq", "call_id", "expires_at", "registered_at"):
            assert after[key] == before[key], (key, before, after)

        # Equal CSeq (a replay that is not a retransmission) is out of order too.
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                              expires=600, call_id="ordered@it", cseq=10)
        assert resp.status == 500, resp

        # A higher CSeq updates the binding.
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                              expires=600, call_id="ordered@it", cseq=20)
        assert resp.status == 200, resp
        [updated] = siphon.contacts(AOR) or [None]
        assert updated is not None and updated["cseq"] == 21, updated
        assert updated["expires_remaining"] <= 600


def test_max_contacts_is_enforced_with_403(siphon: SiphonProcess) -> None:
    siphon.start({"registrar": {"max_contacts": 3}})
    with UdpClient(siphon.sip_port) as ua:
        resp, _ = ua.register("alice", "secret", contact=[
            f"<sip:alice@192.0.2.1:{p}>" for p in (5001, 5002, 5003, 5004)])
        assert resp.status == 403, resp
        assert siphon.contacts(AOR) is None

        resp, _ = ua.register("alice", "secret", contact=[
            f"<sip:alice@192.0.2.1:{p}>" for p in (5001, 5002)])
        assert resp.status == 200, resp
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5003>")
        assert resp.status == 200, resp
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5004>")
        assert resp.status == 403, resp
        uris = sorted(c["uri"] for c in siphon.contacts(AOR) or [])
        assert uris == [f"sip:alice@192.0.2.1:{p}" for p in (5001, 5002, 5003)]

        # Refreshing an existing contact is not a new one.
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5003>")
        assert resp.status == 200, resp
        assert len(siphon.contacts(AOR) or []) == 3


def test_sip_instance_reregistration_replaces_the_old_binding(siphon: SiphonProcess) -> None:
    siphon.start()
    instance = '"<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>"'
    with UdpClient(siphon.sip_port) as ua:
        resp, _ = ua.register(
            "alice", "secret",
            contact=f"<sip:alice@192.0.2.1:5060;transport=udp>;+sip.instance={instance};reg-id=1")
        assert resp.status == 200, resp
        resp, _ = ua.register(
            "alice", "secret",
            contact=f"<sip:alice@198.51.100.7:40000;transport=udp>;+sip.instance={instance}"
                    ";reg-id=1")
        assert resp.status == 200, resp
        assert list(contact_expires(resp)) == ["sip:alice@198.51.100.7:40000;transport=udp"], \
            resp.raw
    contacts = siphon.contacts(AOR) or []
    assert [c["uri"] for c in contacts] == ["sip:alice@198.51.100.7:40000;transport=udp"], \
        contacts
    assert contacts[0]["instance"] == "<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>"
    assert contacts[0]["reg_id"] == 1


def test_binding_expires_and_on_change_reports_it(siphon: SiphonProcess) -> None:
    siphon.start({"registrar": {"min_expires": 1, "sweep_interval": 0.2}})
    with UdpClient(siphon.sip_port) as ua:
        resp, _ = ua.register("alice", "secret", contact="<sip:alice@192.0.2.1:5060>",
                              expires=2)
        assert resp.status == 200, resp
        assert 1 <= contact_expires(resp)["sip:alice@192.0.2.1:5060"] <= 2, resp.raw
        resp, _ = ua.register("bob", "secret", contact="<sip:bob@192.0.2.2:5060>", expires=600)
        assert resp.status == 200, resp
    assert siphon.contacts(AOR) is not None

    deadline = time.monotonic() + 8
    while AOR in siphon.aors():
        assert time.monotonic() < deadline, f"binding still listed\n{siphon.tail()}"
        time.sleep(0.1)
    assert siphon.contacts(AOR) is None
    siphon.wait_output(f"on_change {AOR} expired 0", timeout=5)
    assert siphon.contacts("sip:bob@example.com") is not None, "the live binding went too"
    assert "on_change sip:bob@example.com expired" not in siphon.output()

    siphon.restart()
    assert siphon.contacts(AOR) is None
    assert siphon.contacts("sip:bob@example.com") is not None


def _authenticated_register(ua: UdpClient, call_id: str) -> tuple[bytes, bytes]:
    """The unauthenticated and the authenticated REGISTER of one registration, as bytes
    (the second answers the challenge the server gave the first)."""
    tag = new_tag()

    def build(cseq: int, auth: str | None) -> bytes:
        return build_request(
            "REGISTER", "sip:example.com", to=f"<{AOR}>", from_=f"<{AOR}>;tag={tag}",
            call_id=call_id, cseq=cseq, via=f"SIP/2.0/UDP {ua.via_host};branch={new_branch()}",
            contact="<sip:alice@192.0.2.1:5060>", expires=1800,
            extra=[("Authorization", auth)] if auth else None)

    first = build(1, None)
    challenge = ua.request(first, call_id=call_id)
    assert challenge is not None and challenge.status == 401, challenge
    auth = authorization(md5_challenge(challenge), method="REGISTER", uri="sip:example.com",
                         username="alice", password="secret")
    return first, build(2, auth)


def test_retransmitted_register_gets_the_same_response_and_one_event(
        siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        first, second = _authenticated_register(ua, "retrans-1@it")
        resp1 = ua.request(second, call_id="retrans-1@it")
        assert resp1 is not None and resp1.status == 200, resp1
        stats1 = siphon.admin_get("/admin/stats")
        [binding1] = siphon.contacts(AOR) or [None]

        resp2 = ua.request(second, call_id="retrans-1@it")
        assert resp2 is not None, "retransmission not answered"
        assert resp2.raw == resp1.raw, f"different answer:\n{resp1.raw!r}\n{resp2.raw!r}"
        # The challenge is replayed as well (same nonce), not re-issued.
        again = ua.request(first, call_id="retrans-1@it")
        assert again is not None and again.status == 401, again

        stats2 = siphon.admin_get("/admin/stats")
        [binding2] = siphon.contacts(AOR) or [None]
        assert stats2["log_position"] == stats1["log_position"], (stats1, stats2)
        assert binding2 == binding1

        # Back to back (the copy arrives while the original may still be in progress):
        # whatever comes back is the same single answer, and one event is appended.
        first, second = _authenticated_register(ua, "retrans-2@it")
        before = siphon.admin_get("/admin/stats")["log_position"]
        ua.send(second)
        ua.send(second)
        answers = []
        while (r := ua.recv(1.0, call_id="retrans-2@it")) is not None:
            answers.append(r)
        assert answers, "no answer to a REGISTER sent twice"
        assert all(a.raw == answers[0].raw for a in answers), answers
        assert answers[0].status == 200, answers[0]
        after = siphon.admin_get("/admin/stats")["log_position"]
        assert after["0"] == before["0"] + 1, (before, after)

    assert siphon.output().count(f"on_change {AOR} registered") == 1, siphon.tail()
    assert siphon.output().count(f"on_change {AOR} refreshed") == 1, siphon.tail()
