"""siphon: an event-sourced SIP registrar and proxy, scripted in Python.

Scripts use ``from siphon import proxy, registrar, auth, log``.
"""

from siphon.script.namespaces import auth, log, proxy, registrar

__version__ = "0.1.0"
__all__ = ["__version__", "auth", "log", "proxy", "registrar"]
