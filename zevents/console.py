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


# The fields that say what happened, shown first and never cut; the rest of the payload follows as room allows.
HEADLINES = {
    "PrintProgress": ("progress", "name", "printTimeLeft"),
    "LayerChanged": ("layer", "z"),
    "ZChange": ("new",),
    "PrinterStateChanged": ("state_string", "state_id"),
    "Error": ("error", "reason", "consequence"),
    "PrintStarted": ("name", "origin"),
    "PrintDone": ("name", "time"),
    "PrintFailed": ("name", "reason", "time"),
    "PrintCancelled": ("name", "time"),
    "PrintPaused": ("name",),
    "PrintResumed": ("name",),
    "Connected": ("port", "baudrate"),
    "HookFinished": ("subscription", "returncode", "duration", "stdout"),
    "HookFailed": ("subscription", "returncode", "error", "stderr", "stdout"),
    "HookTimedOut": ("subscription", "duration", "stdout"),
    "ServiceStarted": ("service", "pid"),
    "ServiceRestarted": ("service", "restarts", "returncode"),
}
# Payload keys that hold a moment (seconds or microseconds since the epoch): shown as a time of day.
MOMENTS = {"started", "ts", "now", "timestamp", "date"}
# Durations in seconds.
DURATIONS = {"time", "duration", "printTimeLeft", "estimatedPrintTime", "backoff", "uptime"}
OUTPUT_TAIL = 160             # characters of a hook's stdout/stderr shown: its last line(s)


def _number(value) -> str:
    """12, 12.5, 0.125: never 1.79633e+09."""
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e15 else f"{value:.0f}"
    return str(value)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return str(seconds)
    if seconds < 60:
        return f"{_number(round(seconds, 2))} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _moment(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return str(value)
    seconds = value / 1e6 if value > 1e12 else value          # µs (hook results, headers) or s
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _tail(text: str) -> str:
    text = " ⏎ ".join(line for line in str(text).strip().splitlines() if line.strip())
    return text if len(text) <= OUTPUT_TAIL else "…" + text[-(OUTPUT_TAIL - 1):]


def _value(key: str, value, payload: dict) -> str:
    if key == "progress" and isinstance(value, (int, float)):
        return f"{_number(round(value, 1))} %"
    if key == "layer" and payload.get("total"):
        return f"{value}/{payload['total']}"
    if key in ("stdout", "stderr") and isinstance(value, str):
        return repr(_tail(value))
    if key == "error" and isinstance(value, str):
        return " ⏎ ".join(line.strip() for line in value.strip().splitlines())    # whole: its start says most
    if key in MOMENTS or (isinstance(value, float) and value > 1e9):   # a float that large is a moment, not a size
        return _moment(value)
    if key in DURATIONS:
        return _duration(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_value(k, v, value)}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def _shown(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def summarise(payload: dict, width: int = 100, name: str | None = None) -> str:
    """One line: the event's headline fields first, whole; then the other fields, cut to ``width`` overall."""
    headline_keys = HEADLINES.get(name, ())
    headline = [f"{key}={_value(key, payload[key], payload)}" for key in headline_keys
                if key in payload and _shown(payload[key])]
    rest = [f"{key}={_value(key, value, payload)}" for key, value in payload.items()
            if key not in headline_keys and _shown(value) and not (key == "total" and "layer" in headline_keys)]
    text = " ".join(headline)
    room = width - len(text)
    tail = " ".join(rest)
    if tail and room > 8:
        tail = tail if len(tail) < room else tail[:room - 2] + "…"
        text = f"{text} {tail}" if text else tail
    return text


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
        if envelope.printer:  # a named printer (several on one node): whose event this is
            line.append(f"{envelope.printer} ", style="bold cyan")
        line.append(f"[{envelope.src}] ", style="dim")
        line.append(summarise(envelope.payload, name=envelope.name))
        console.print(line, soft_wrap=True)


def start_viewer(bus_config, demo: bool = False) -> Viewer:
    return Viewer(bus_config).start()
