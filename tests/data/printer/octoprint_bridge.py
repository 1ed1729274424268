"""Puts OctoPrint's own virtual printer (a firmware simulator that is not ours) behind a pseudo-terminal.

Run with an interpreter that has OctoPrint installed (``pip install octoprint`` in a venv): it prints the pty's
path on stdout, then shuttles bytes between the pty and OctoPrint's ``VirtualPrinter`` until stdin closes or it
gets SIGTERM.  OctoPrint's plugin normally gets its settings and plugin manager from a running OctoPrint; here the
plugin's own defaults are served by a small stand-in, everything else is OctoPrint's code unchanged.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import tty

from octoprint.plugins import virtual_printer as plugin
from octoprint.plugins.virtual_printer import virtual
from serial import SerialTimeoutException


class Settings:
    """The plugin's settings API over its defaults (what OctoPrint would give a fresh install)."""

    def __init__(self, defaults: dict, base: str):
        self.defaults = defaults
        self.base = base

    def get(self, path, merged=False, **kwargs):
        value = self.defaults
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def get_int(self, path, **kwargs):
        value = self.get(path)
        return None if value is None else int(value)

    def get_float(self, path, **kwargs):
        value = self.get(path)
        return None if value is None else float(value)

    def get_boolean(self, path, **kwargs):
        return bool(self.get(path))

    def global_get_basefolder(self, name, **kwargs):
        folder = os.path.join(self.base, name)
        os.makedirs(folder, exist_ok=True)
        return folder


class _NoPlugins:
    def get_hooks(self, *args, **kwargs):
        return {}


def main() -> int:
    base = tempfile.mkdtemp(prefix="octoprint-vp-")
    defaults = plugin.VirtualPrinterPlugin().get_settings_defaults()
    defaults["enabled"] = True
    virtual.plugin_manager = lambda: _NoPlugins()
    printer = virtual.VirtualPrinter(Settings(defaults, base), None, data_folder=base, read_timeout=0.1)
    printer.write_timeout = 0.001

    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    print(os.ttyname(slave), flush=True)
    stop = threading.Event()

    def to_host():
        while not stop.is_set():
            try:
                line = printer.readline()
            except Exception:
                break
            if line:
                if not line.endswith(b"\n"):
                    line += b"\n"  # its readline() hands out single lines, some without their terminator
                try:
                    os.write(master, line)
                except OSError:
                    break

    threading.Thread(target=to_host, daemon=True).start()
    # OctoPrint's simulator runs non-daemon threads: leave with os._exit when told to (or when stdin closes).
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    buffer = b""
    while not stop.is_set():
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            pending = line + b"\n"
            # Its receive buffer is small (rxBuffer): it takes what fits, like a UART would, so feed the rest.
            # Its write() holds a lock its own firmware thread needs while it waits for room: never wait there.
            while pending and not stop.is_set():
                try:
                    pending = pending[printer.write(pending) or 0:]
                except SerialTimeoutException:
                    stop.wait(0.005)
    return 0


if __name__ == "__main__":
    sys.exit(main())
