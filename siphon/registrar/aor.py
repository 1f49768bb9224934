"""Address-of-record and binding-key normalisation (RFC 3261 §10.3 step 5, §19.1.4)."""

from __future__ import annotations

from siphon.sip.errors import SipSyntaxError
from siphon.sip.uri import SipUri, parse_uri, unescape

_DEFAULT_PORT = {"sip": 5060, "sips": 5061}


def aor_of(uri: SipUri) -> str:
    """Canonical AoR of a SIP URI: ``scheme:user@host[:port]``, parameters and headers
    dropped, escapes undone, host lower-cased, the scheme's default port dropped."""
    if not uri.is_sip:
        raise SipSyntaxError(f"address of record must be a sip: or sips: URI, not {uri.scheme}:")
    user = f"{unescape(uri.user)}@" if uri.user else ""
    port = "" if uri.port in (None, _DEFAULT_PORT[uri.scheme]) else f":{uri.port}"
    return f"{uri.scheme}:{user}{uri.host.lower()}{port}"


def normalize_aor(text: object) -> str:
    """AoR from anything a script passes: a SipUri, ``sip:...``, ``<sip:...>`` or ``user@host``."""
    if isinstance(text, SipUri):
        return aor_of(text)
    raw = str(text).strip()
    if raw.startswith("<") and raw.endswith(">"):
        raw = raw[1:-1]
    if not raw.lower().startswith(("sip:", "sips:")):
        raw = "sip:" + raw
    return aor_of(parse_uri(raw))


def contact_key(uri: SipUri, instance: str = "", reg_id: int = 0) -> str:
    """Identity of a binding within its AoR.

    With ``+sip.instance`` (RFC 5626/5627) the instance (and reg-id) identify the
    device, so a re-registering device replaces its old binding even from a new
    address. Otherwise the Contact URI in a canonical form that makes URIs equal
    under §19.1.4 produce the same key (case of host and parameter names, escapes,
    parameter order).
    """
    if instance:
        return f"instance:{instance}:{reg_id}" if reg_id else f"instance:{instance}"
    user = unescape(uri.user) if uri.user is not None else ""
    port = "" if uri.port is None else f":{uri.port}"
    params = sorted(
        (unescape(k).lower(), None if v is None else unescape(v).lower()) for k, v in uri.params
    )
    ptext = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)
    return f"{uri.scheme}:{user}@{uri.host.lower()}{port}{ptext}"
