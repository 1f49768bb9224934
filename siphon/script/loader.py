"""Loading the operator's script into a fresh handler registry."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from siphon.script import registry as reg


class ScriptError(Exception):
    """The script could not be loaded; the message says why and where."""


def load_script(path: str, include_paths: list[str] | None = None) -> reg.Registry:
    """Execute ``path`` once with a fresh registry and return what it registered.

    On failure the previous registry stays active and ScriptError is raised.
    """
    file = Path(path)
    if not file.is_file():
        raise ScriptError(f"script {path!r} not found")
    previous = reg.registry
    fresh = reg.Registry()
    reg.registry = fresh
    for extra in [str(file.parent), *(include_paths or [])]:
        if extra not in sys.path:
            sys.path.insert(0, extra)
    try:
        runpy.run_path(str(file), run_name=f"siphon_script_{file.stem}")
    except SyntaxError as exc:
        reg.registry = previous
        raise ScriptError(
            f"script {path!r} has a syntax error at line {exc.lineno}: {exc.msg}") from exc
    except BaseException as exc:
        reg.registry = previous
        raise ScriptError(f"script {path!r} failed to load: {type(exc).__name__}: {exc}") from exc
    return fresh
