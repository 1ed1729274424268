"""Picks the parser implementation: the compiled one unless ZEVENTS_PUREPYTHON=1 or it is not built."""
