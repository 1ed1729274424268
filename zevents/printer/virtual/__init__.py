"""The built-in virtual printer: a Marlin-like firmware on a pseudo-terminal (``printer``), its reply formats
(``firmware``), its command execution (``machine``) and its simulated parts (``parts``)."""
from zevents.printer.virtual.printer import FIRMWARES, VirtualPrinter, run

__all__ = ["FIRMWARES", "VirtualPrinter", "run"]
