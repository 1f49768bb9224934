"""siphon: an event-sourced SIP registrar and proxy, scripted in Python.

Scripts use ``from siphon import proxy, registrar, auth, log, http, trunks``.
"""

from siphon.script.http_api import http
from siphon.script.namespaces import auth, log, proxy, registrar, trunks

__version__ = "0.1.0"
__all__ = ["__version__", "auth", "http", "log", "proxy", "registrar", "trunks"]
