# cython: language_level=3
"""Compiled twin of zevents._parser._pyparser (filled in by the parser work)."""
IMPLEMENTATION = "c"
