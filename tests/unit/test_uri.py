"""URI parsing and RFC 3261 §19.1.4 comparison."""

import pytest

from siphon.sip.errors import SipSyntaxError
from siphon.sip.uri import parse_uri, uri_equal


def test_full_sip_uri_parts() -> None:
    uri = parse_uri("sips:alice:pw@Atlanta.COM:5061;transport=tcp;lr?subject=hi&x=1")
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sips", "alice", "pw", "Atlanta.COM", 5061)
    assert uri.param("transport") == "tcp"
    assert uri.param("lr") == ""
    assert uri.param("maddr") is None
    assert uri.headers == "subject=hi&x=1"
    assert str(uri) == "sips:alice:pw@Atlanta.COM:5061;transport=tcp;lr?subject=hi&x=1"


def test_ipv6_and_tel_and_opaque() -> None:
    assert parse_uri("sip:[2001:db8::1]:5070").host == "[2001:db8::1]"
    assert parse_uri("sip:[2001:db8::1]:5070").port == 5070
    tel = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert tel.is_tel and tel.user == "+1-201-555-0123"
    other = parse_uri("soap.beep://192.0.2.103:3002")
    assert other.scheme == "soap.beep" and other.opaque == "//192.0.2.103:3002"


def test_user_part_may_hold_semicolons_and_question_marks() -> None:
    uri = parse_uri("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"


@pytest.mark.parametrize("text", [
    "sip:user@example.com; lr", "<sip:user@example.com>", "sip:", "sip:@host",
    "sip:user@exa mple.com", "sip:user@host:99999", "sip:user@host:port", "nocolon",
])
def test_malformed_uris_are_rejected(text: str) -> None:
    with pytest.raises(SipSyntaxError):
        parse_uri(text)


# The equal / not-equal examples of RFC 3261 §19.1.4.
@pytest.mark.parametrize(("a", "b"), [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
     "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
    ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
     "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
])
def test_equal_uris(a: str, b: str) -> None:
    assert uri_equal(parse_uri(a), parse_uri(b))


@pytest.mark.parametrize(("a", "b"), [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
])
def test_unequal_uris(a: str, b: str) -> None:
    assert not uri_equal(parse_uri(a), parse_uri(b))
