# The registrar + proxy recipe siphon was specified from (registrar-recipe.txt), unchanged.
from siphon import proxy, registrar, auth, log

DOMAIN = "example.com"

@proxy.on_request
def route(request):
    # In-dialog requests follow the established route set.
    if request.in_dialog:
        if request.loose_route():
            request.relay()
        else:
            request.reply(404, "Not Here")
        return

    # REGISTER: challenge, then store the contact. registrar.save() also sends
    # the 200 OK with the granted Expires.
    if request.method == "REGISTER":
        if not auth.require_digest(request, realm=DOMAIN):
            return                      # 401 challenge already sent
        request.fix_nated_register()    # rewrite Contact with the observed source
        registrar.save(request)
        return

    # Anything else (INVITE, MESSAGE, …): look up the AoR and route to it.
    contacts = registrar.lookup(request.ruri)
    if not contacts:
        request.reply(404, "Not Found")
        return
    request.record_route()
    request.fork(contacts)              # ring all bindings; first 2xx wins


@registrar.on_change
def on_reg_change(aor, event_type, contacts):
    # event_type: "registered" | "refreshed" | "deregistered" | "expired"
    log.info(f"{aor} {event_type}: {len(contacts)} contact(s)")
