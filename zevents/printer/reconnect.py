"""Keeping a printer link connected (``printer.reconnect``): after a link error, a port that vanished (USB
unplugged, printer power-cycled) or a port that was not there at start, connect again, with backoff, once the
port is there; every attempt publishes Connecting, and Connected when it works.

Not after an emergency stop (the firmware halted: M112, a thermal error): that printer needs a person, and a
reconnect would reset the board.  Not after a requested disconnect (``zevents disconnect``) until the next
``zevents connect``.  While a port device is absent nothing is tried and nothing is published: the loop only
looks for it, every ``poll`` seconds.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from zevents.printer.link import AUTO

log = logging.getLogger("zevents.printer.reconnect")


def port_present(port: str) -> bool:
    """Whether a connection attempt on ``port`` can work now: a device path exists (a dangling symlink does not
    count); AUTO and pyserial URLs are always worth a try."""
    port = str(port)
    if port.upper() == AUTO or "://" in port or not port.startswith("/"):
        return True
    return os.path.exists(port)


class Reconnector:
    """The reconnect loop for one link, on a thread of its own.  ``connect()`` makes one attempt (True once
    connected); it runs on this thread (the service hands it to its jobs worker)."""

    def __init__(self, link, connect: Callable[[], bool], min_delay: float = 1.0, max_delay: float = 30.0,
                 poll: float = 0.5):
        self.link = link
        self.connect = connect
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.poll = poll
        self.wanted = True
        self.attempts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Reconnector":
        self._thread = threading.Thread(target=self._loop, name="link-reconnect", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        self._thread = None

    def want(self, connected: bool):
        """A requested connect (True) or disconnect (False): reconnect only while a connection is wanted."""
        self.wanted = connected

    def _should_try(self) -> bool:
        link = self.link
        return (self.wanted and link.state == "CLOSED_WITH_ERROR" and link.error_consequence != "emergency"
                and port_present(link.port))

    def _loop(self):
        delay = self.min_delay
        next_try = 0.0
        while not self._stop.wait(self.poll):
            if self.link.connected:
                delay, next_try = self.min_delay, 0.0
                continue
            if not self._should_try() or time.monotonic() < next_try:
                continue
            self.attempts += 1
            log.info("reconnect: connecting to %s (attempt %d)", self.link.port, self.attempts)
            try:
                connected = self.connect()
            except Exception as exc:  # a refused request (already connected, ...) is just a failed attempt
                log.info("reconnect: %s", exc)
                connected = False
            if connected:
                delay, next_try = self.min_delay, 0.0
            else:
                next_try = time.monotonic() + delay
                delay = min(delay * 2, self.max_delay)
