"""Contact objects handed to scripts by ``registrar.lookup`` and ``on_change``."""

from __future__ import annotations

from events.schema import Binding


class Contact:
    """A live binding as scripts see it. ``str(contact)`` is the Contact URI."""

    __slots__ = ("_now", "aor", "binding", "expires", "is_local")

    def __init__(self, aor: str, binding: Binding, now: float, is_local: bool) -> None:
        self.aor = aor
        self.binding = binding
        self.expires = max(0, int(binding.expires_at - now))
        """Seconds remaining."""
        self.is_local = is_local
        """True when this node accepted the binding and still holds its flow."""
        self._now = now

    @property
    def uri(self) -> str:
        return self.binding.uri

    @property
    def q(self) -> float:
        return self.binding.q

    @property
    def received(self) -> str | None:
        """The REGISTER's packet source as a routable URI."""
        if not self.binding.source:
            return None
        return f"sip:{self.binding.source};transport={self.binding.transport}"

    @property
    def source(self) -> str:
        return self.binding.source

    @property
    def transport(self) -> str:
        return self.binding.transport

    @property
    def instance_id(self) -> str:
        return self.binding.instance

    @property
    def reg_id(self) -> int:
        return self.binding.reg_id

    @property
    def path(self) -> list[str]:
        return list(self.binding.path)

    @property
    def params(self) -> list[tuple[str, str | None]]:
        return list(self.binding.params)

    @property
    def user_agent(self) -> str:
        return self.binding.user_agent

    @property
    def age_secs(self) -> int:
        return max(0, int(self._now - self.binding.registered_at))

    @property
    def age(self) -> int:
        return self.age_secs

    @property
    def kind(self) -> str:
        return "ue"

    def __str__(self) -> str:
        return self.binding.uri

    def __repr__(self) -> str:
        return f"<Contact {self.binding.uri} expires={self.expires} q={self.q}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Contact) and (self.aor, self.binding.key) == (
            other.aor, other.binding.key)

    def __hash__(self) -> int:
        return hash((self.aor, self.binding.key))
