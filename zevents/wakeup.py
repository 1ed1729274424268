"""A wake-up pipe for a service loop that polls ZeroMQ sockets: any thread writes to it to make the loop look at
its queues now (an idle loop sleeps in ``zmq.Poller.poll``; it does not spin)."""
from __future__ import annotations

import os


class Wakeup:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        """The end to register with a ``zmq.Poller`` (POLLIN)."""
        return self._read

    def wake(self, *_) -> None:
        """Any thread, any time (extra arguments are ignored, so it can be a future's done-callback)."""
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means "wake up"; a closed one means the loop is gone

    def drain(self) -> None:
        """The loop, after its poll: forget the wake-ups that brought it here."""
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
