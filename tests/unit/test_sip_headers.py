"""Structured header values: name-addr, Via, CSeq, comma lists."""

import pytest

from siphon.sip.errors import SipSyntaxError
from siphon.sip.headers import canonical_name, parse_cseq, parse_name_addr, parse_via, split_list


def test_compact_forms_expand() -> None:
    assert [canonical_name(n) for n in ("i", "m", "l", "v", "f", "t", "CSEQ")] == [
        "Call-ID", "Contact", "Content-Length", "Via", "From", "To", "CSeq"]


def test_split_list_respects_quotes_and_brackets() -> None:
    value = '"Doe, John" <sip:j@x.com;a=1,2>;q=0.5, <sip:b@y.com>, sip:c@z.com'
    assert split_list(value) == ['"Doe, John" <sip:j@x.com;a=1,2>;q=0.5', "<sip:b@y.com>",
                                 "sip:c@z.com"]


def test_name_addr_forms() -> None:
    na = parse_name_addr('"J Rosenberg \\\\\\""  <sip:jdrosen@example.com> ;  tag = 98asjd8')
    assert na.display == '"J Rosenberg \\\\\\""'
    assert str(na.uri) == "sip:jdrosen@example.com"
    assert na.tag == "98asjd8"
    bare = parse_name_addr("sip:+19725552222@gw1.example.net;unknownparam")
    assert bare.uri.params == [] and bare.params == [("unknownparam", None)]
    assert parse_name_addr("caller<sip:caller@example.com>;tag=323").display == "caller"
    assert parse_name_addr("*", allow_wildcard=True).wildcard


@pytest.mark.parametrize("value", [
    "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",      # non-token display name
    '"Mr. J. User <sip:j.user@example.com>',                   # unbalanced quote
    '"Watson, Thomas" < sip:t.watson@example.org >',           # spaces inside <>
    "sip:user@example.com?Route=%3Csip:sip.example.com%3E",   # ? outside <>
    '"Joe" <sip:joe@example.org>;;;;',                         # empty params
])
def test_bad_name_addrs(value: str) -> None:
    with pytest.raises(SipSyntaxError):
        parse_name_addr(value)


def test_via_with_lws_and_params() -> None:
    via = parse_via("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw;rport")
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "192.0.2.2", None,
                                                              "390skdjuw")
    assert via.param("rport") == ""
    via.set_param("received", "10.0.0.1")
    via.set_param("rport", "5062")
    assert str(via) == "SIP/2.0/UDP 192.0.2.2;branch=390skdjuw;rport=5062;received=10.0.0.1"
    with pytest.raises(SipSyntaxError):
        parse_via("SIP/2.0/UDP 192.0.2.15;;,;,,")


def test_cseq_limits() -> None:
    assert parse_cseq("0009 INVITE") == (9, "INVITE")
    with pytest.raises(SipSyntaxError):
        parse_cseq("36893488147419103232 REGISTER")
