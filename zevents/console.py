"""The live view of `zevents run`: every event as one readable, coloured line (rich), on a thread of its own."""
from __future__ import annotations

import threading
import time

from zevents import bus

GROUP_STYLES = {"server": "bold magenta", "comm": "cyan", "file": "blue", "print": "bold green", "gcode": "yellow",
                "timelapse": "magenta", "slicing": "blue", "settings": "white", "profile": "white",
                "sys": "dim", "hook": "bold cyan", "custom": "white"}
# High-rate topics that would drown the view; they are counted instead and summarised once a second.
QUIET = {"sys/Heartbeat", "comm/Temperature"}


def summarise(payload: dict, width: int = 100) -> str:
    parts = []
    for key, value in payload.items():
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, dict):
            value = "{" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in value.items() if v is not None) + "}"
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= width else text[:width - 1] + "…"


class Viewer:
    def __init__(self, bus_config, show_gcode: bool = True):
        self.bus_config = bus_config
        self.show_gcode = show_gcode
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="zevents-viewer", daemon=True)
        self.counts: dict = {}
        self._drain = False

    def start(self):
        # Subscribe here, not in the thread: events published right after start() returns (Startup) are ours.
        # The socket moves to the viewer thread once, before it is used there.
        self.subscriber = bus.Subscriber(self.bus_config)
        self.thread.start()
        return self

    def stop(self, drain: bool = False):
        """Stop showing events; with ``drain``, first show what is already on its way (e.g. Shutdown)."""
        self._drain = drain
        self._stop.set()
        self.thread.join(3)

    def _run(self):
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        subscriber = self.subscriber
        last_summary = time.monotonic()
        try:
            while True:
                envelope = subscriber.recv(timeout=0.2)
                if envelope is None:
                    if self._stop.is_set():
                        break
                    continue
                if self._stop.is_set() and not self._drain:
                    break
                if envelope.topic in QUIET:
                    self.counts[envelope.topic] = self.counts.get(envelope.topic, 0) + 1
                    if envelope.topic == "comm/Temperature" and time.monotonic() - last_summary > 5:
                        last_summary = time.monotonic()
                        self._line(console, Text, envelope)
                    continue
                self._line(console, Text, envelope)
        finally:
            subscriber.close()

    def _line(self, console, Text, envelope):
        stamp = time.strftime("%H:%M:%S", time.localtime(envelope.ts / 1e6))
        line = Text()
        line.append(f"{stamp} ", style="dim")
        line.append(f"{envelope.group:>9} ", style=GROUP_STYLES.get(envelope.group, "white"))
        line.append(f"{envelope.name:<22}", style="bold " + GROUP_STYLES.get(envelope.group, "white"))
        line.append(f" #{envelope.seq:<6}", style="dim")
        line.append(f"[{envelope.src}] ", style="dim")
        line.append(summarise(envelope.payload))
        console.print(line, soft_wrap=True)


def start_viewer(bus_config, demo: bool = False) -> Viewer:
    return Viewer(bus_config).start()
