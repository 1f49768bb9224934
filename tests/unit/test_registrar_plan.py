"""The registrar's pure decision (RFC 3261 §10.3) and the projection it feeds."""

from events.schema import BindingAdded, BindingExpired, BindingRefreshed, BindingRemoved
from projections.registrar import RegistrarState, apply, expired, lookup
from siphon.registrar.aor import contact_key, normalize_aor
from siphon.registrar.plan import Limits, RegisterInput, plan_register
from siphon.sip.headers import parse_name_addr
from siphon.sip.uri import parse_uri

AOR = "sip:alice@example.com"
NOW = 1_000_000.0
LIMITS = Limits(default_expires=3600, min_expires=60, max_expires=7200, max_contacts=3)


def _req(*contacts: str, expires: int | None = None, call_id: str = "c1",
         cseq: int = 1) -> RegisterInput:
    return RegisterInput(AOR, [parse_name_addr(c, allow_wildcard=True) for c in contacts],
                         expires, call_id, cseq, source="10.0.0.1:5062")


def _run(state: RegistrarState, req: RegisterInput, now: float = NOW):
    plan = plan_register(req, state.aors.get(AOR, {}), now, LIMITS, "n1")
    changes = [apply(state, e) for e in plan.events]
    return plan, changes


def test_aor_normalisation() -> None:
    assert normalize_aor("<sip:alice@Example.COM:5060;transport=tcp>") == AOR
    assert normalize_aor("alice@example.com") == AOR
    assert normalize_aor("sip:%61lice@example.com") == AOR
    assert normalize_aor("sips:alice@example.com:5061") == "sips:alice@example.com"
    assert normalize_aor("sip:alice@example.com:5070") == "sip:alice@example.com:5070"


def test_contact_key_follows_uri_equality() -> None:
    a = contact_key(parse_uri("sip:%61lice@HOST;Transport=TCP;lr"))
    b = contact_key(parse_uri("sip:alice@host;lr;transport=tcp"))
    assert a == b
    assert contact_key(parse_uri("sip:a@h"), '"<urn:uuid:1>"', 1) != contact_key(
        parse_uri("sip:a@h"))


def test_register_refresh_and_remove() -> None:
    state = RegistrarState()
    plan, changes = _run(state, _req("<sip:alice@10.0.0.1>;expires=300", "<sip:alice@10.0.0.2>"))
    assert plan.status == 200 and changes == ["registered", "registered"]
    live = lookup(state, AOR, NOW)
    assert [b.uri for b in live] == ["sip:alice@10.0.0.2", "sip:alice@10.0.0.1"]
    assert {b.expires_at - NOW for b in live} == {300, 3600}
    plan, changes = _run(state, _req("<sip:alice@10.0.0.1>", cseq=2), NOW + 10)
    assert changes == ["refreshed"]
    plan, changes = _run(state, _req("<sip:alice@10.0.0.1>;expires=0", cseq=3), NOW + 20)
    assert changes == ["deregistered"]
    assert [b.uri for b in lookup(state, AOR, NOW + 20)] == ["sip:alice@10.0.0.2"]


def test_expires_rules() -> None:
    state = RegistrarState()
    plan, _ = _run(state, _req("<sip:alice@h1>", expires=30))
    assert plan.status == 423 and plan.headers == [("Min-Expires", "60")] and not state.aors
    plan, _ = _run(state, _req("<sip:alice@h1>", expires=999999))
    assert plan.status == 200
    assert lookup(state, AOR, NOW)[0].expires_at == NOW + 7200  # clamped
    plan, _ = _run(state, _req("<sip:alice@h2>;expires=120", expires=30, cseq=2))
    assert plan.status == 200  # the contact parameter wins over the header


def test_wildcard_rules() -> None:
    state = RegistrarState()
    _run(state, _req("<sip:alice@h1>", "<sip:alice@h2>"))
    plan, _ = _run(state, _req("*", cseq=2))
    assert plan.status == 400
    plan, _ = _run(state, _req("*", "<sip:alice@h3>", expires=0, cseq=2))
    assert plan.status == 400
    plan, changes = _run(state, _req("*", expires=0, call_id="other"))
    assert plan.status == 200 and changes == ["deregistered", "deregistered"]
    assert not state.aors


def test_out_of_order_cseq_is_refused_and_changes_nothing() -> None:
    state = RegistrarState()
    _run(state, _req("<sip:alice@h1>", cseq=5))
    before = dict(state.aors[AOR])
    plan, changes = _run(state, _req("<sip:alice@h1>;expires=0", cseq=5))
    assert plan.status == 500 and changes == [] and state.aors[AOR] == before
    plan, _ = _run(state, _req("<sip:alice@h1>", cseq=4))
    assert plan.status == 500
    plan, _ = _run(state, _req("<sip:alice@h1>", call_id="new-call", cseq=1))
    assert plan.status == 200  # another Call-ID may update the binding


def test_max_contacts_and_instance_replacement() -> None:
    state = RegistrarState()
    _run(state, _req("<sip:alice@h1>", "<sip:alice@h2>", "<sip:alice@h3>"))
    plan, _ = _run(state, _req("<sip:alice@h4>", cseq=2))
    assert plan.status == 403
    state = RegistrarState()
    inst = '<sip:alice@10.0.0.1>;+sip.instance="<urn:uuid:abc>";reg-id=1'
    _run(state, _req(inst))
    moved = '<sip:alice@192.0.2.7:6000>;+sip.instance="<urn:uuid:abc>";reg-id=1'
    plan, changes = _run(state, _req(moved, call_id="c2"))
    assert changes == ["refreshed"]
    assert [b.uri for b in lookup(state, AOR, NOW)] == ["sip:alice@192.0.2.7:6000"]
    assert lookup(state, AOR, NOW)[0].instance == "<urn:uuid:abc>"


def test_fetch_without_contacts_changes_nothing() -> None:
    state = RegistrarState()
    plan, _ = _run(state, _req())
    assert plan.status == 200 and plan.events == []


def test_lookup_orders_by_q_then_recency_and_hides_expired() -> None:
    state = RegistrarState()
    _run(state, _req("<sip:alice@h1>;q=0.5"))
    _run(state, _req("<sip:alice@h2>;expires=100", cseq=2), NOW + 1)
    _run(state, _req("<sip:alice@h3>;q=0.9", cseq=3), NOW + 2)
    assert [b.uri for b in lookup(state, AOR, NOW + 3)] == [
        "sip:alice@h2", "sip:alice@h3", "sip:alice@h1"]
    assert [b.uri for b in lookup(state, AOR, NOW + 200)] == ["sip:alice@h3", "sip:alice@h1"]
    lapsed = expired(state, NOW + 200)
    assert [(a, b.uri) for a, b in lapsed] == [(AOR, "sip:alice@h2")]


def test_expiry_event_does_not_remove_a_renewed_binding() -> None:
    state = RegistrarState()
    _run(state, _req("<sip:alice@h1>;expires=60"))
    old = lookup(state, AOR, NOW)[0]
    # the binding lapses, the sweeper sees it, but a re-REGISTER lands first
    _run(state, _req("<sip:alice@h1>;expires=60", cseq=2), NOW + 61)
    stale = BindingExpired(ts=NOW + 61, node="n1", aor=AOR, key=old.key,
                           expires_at=old.expires_at)
    assert apply(state, stale) is None
    assert len(lookup(state, AOR, NOW + 62)) == 1


def test_apply_is_deterministic_across_replicas() -> None:
    events = []
    state = RegistrarState()
    for i, req in enumerate([_req("<sip:alice@h1>"), _req("<sip:alice@h2>", cseq=2),
                             _req("<sip:alice@h1>;expires=0", cseq=3)]):
        plan = plan_register(req, state.aors.get(AOR, {}), NOW + i, LIMITS, "n1")
        for e in plan.events:
            apply(state, e)
        events += plan.events
    replica = RegistrarState()
    for e in events:
        apply(replica, e)
    assert replica.aors == state.aors
    kinds = [type(e) for e in events]
    assert kinds == [BindingAdded, BindingAdded, BindingRemoved]
    assert BindingRefreshed not in kinds
