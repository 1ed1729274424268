"""Picks the parser implementation: the compiled one unless ZEVENTS_PUREPYTHON=1 or it is not built.

``PyParser`` (the pure twin, always there) and ``CParser`` (None when the extension did not load, with the
reason in ``C_LOAD_ERROR``) are exported so that tests can run both side by side.
"""
from __future__ import annotations

import os

from zevents._parser._pyparser import Parser as PyParser

FORCED_PURE = os.environ.get("ZEVENTS_PUREPYTHON", "").strip().lower() in ("1", "true", "yes", "on")

try:
    from zevents._parser._cparser import Parser as CParser
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    CParser = None
    C_LOAD_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    C_LOAD_ERROR = None

if CParser is not None and not FORCED_PURE:
    Parser = CParser
    IMPLEMENTATION = "c"
else:
    Parser = PyParser
    IMPLEMENTATION = "py"

__all__ = ["Parser", "PyParser", "CParser", "IMPLEMENTATION", "FORCED_PURE", "C_LOAD_ERROR"]
