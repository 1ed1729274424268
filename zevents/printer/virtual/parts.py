"""The simulated hardware behind the virtual printer: clock, heaters, planner, G-code words, SD card, fault specs.

Nothing here touches the pseudo-terminal or threads; ``virtual.py`` drives these parts from its firmware thread.
Simulated time runs ``speed`` times faster than the wall clock; ``speed == 0`` means every delay is instant.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Deque, Dict, List, Optional, Tuple, Union


class SimClock:
    """Converts simulated durations to wall-clock durations and back."""

    def __init__(self, speed: float):
        if not isinstance(speed, (int, float)) or math.isnan(speed) or speed < 0 or math.isinf(speed):
            raise ValueError(f"speed must be a finite number >= 0 (0 = instant), got {speed!r}")
        self.speed = float(speed)

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def to_wall(self, sim_seconds: float) -> float:
        if self.speed == 0 or sim_seconds <= 0:
            return 0.0
        return sim_seconds / self.speed

    def sim_since(self, wall_start: float, wall_now: Optional[float] = None) -> float:
        """Simulated seconds elapsed since a wall-clock instant (infinite when instant)."""
        if self.speed == 0:
            return math.inf
        return max(0.0, ((self.now() if wall_now is None else wall_now) - wall_start) * self.speed)


class Heater:
    """A heater that ramps linearly towards its target (or ambient when off), in simulated time."""

    def __init__(self, clock: SimClock, heat_rate: float, cool_rate: float, max_target: float, ambient: float = 21.0):
        self._clock = clock
        self.heat_rate = heat_rate    # °C per simulated second
        self.cool_rate = cool_rate
        self.max_target = max_target
        self.ambient = ambient
        self.target = 0.0
        self._from = ambient
        self._since = clock.now()

    def _goal(self) -> float:
        return self.target if self.target > 0 else self.ambient

    def actual(self, wall_now: Optional[float] = None) -> float:
        goal = self._goal()
        elapsed = self._clock.sim_since(self._since, wall_now)
        if goal >= self._from:
            return goal if math.isinf(elapsed) else min(goal, self._from + self.heat_rate * elapsed)
        return goal if math.isinf(elapsed) else max(goal, self._from - self.cool_rate * elapsed)

    def set_target(self, target: float) -> float:
        """Sets the target, clamped like Marlin does to [0, max]; returns what was set."""
        now = self._clock.now()
        self._from = self.actual(now)
        self._since = now
        self.target = min(max(0.0, float(target)), self.max_target)
        return self.target

    def power(self) -> int:
        """Heater PWM on Marlin's 0..127 scale: full while heating, half while holding, 0 when off."""
        if self.target <= 0:
            return 0
        actual = self.actual()
        if actual < self.target - 0.5:
            return 127
        return 64 if actual <= self.target + 0.5 else 0

    def wall_seconds_until_within(self, window: float) -> float:
        """Wall seconds until |actual - target| <= window (0 when already there)."""
        distance = abs(self._goal() - self.actual()) - window
        if distance <= 0:
            return 0.0
        rate = self.heat_rate if self._goal() >= self.actual() else self.cool_rate
        return self._clock.to_wall(distance / rate)


class Planner:
    """Marlin's block buffer, reduced to the wall-clock instants at which queued moves finish."""

    def __init__(self, size: int):
        self.size = size
        self._done: Deque[float] = deque()

    def _retire(self, now: float) -> None:
        while self._done and self._done[0] <= now:
            self._done.popleft()

    def free(self, now: float) -> int:
        self._retire(now)
        return self.size - len(self._done)

    def next_free_at(self, now: float) -> Optional[float]:
        """When a block frees up if the buffer is full now, else None."""
        self._retire(now)
        return self._done[0] if len(self._done) >= self.size else None

    def add(self, now: float, wall_duration: float) -> None:
        self._retire(now)
        start = max(now, self._done[-1]) if self._done else now
        self._done.append(start + wall_duration)

    def idle_at(self, now: float) -> float:
        self._retire(now)
        return self._done[-1] if self._done else now

    def clear(self) -> None:
        self._done.clear()


# ---- G-code words ----

# No exponents: in compact G-code "X1E5" is X1 then E5.
_WORD = re.compile(r"([A-Za-z])\s*([-+]?(?:\d+\.?\d*|\.\d+))?")
_COMMAND = re.compile(r"^([GMTgmt])\s*(\d+)(?:\.(\d+))?")
#: Commands whose argument is free text rather than letter/number words.
TEXT_COMMANDS = {"M23", "M28", "M30", "M32", "M117", "M118", "M928", "M33"}


@dataclass
class GcodeCommand:
    """One command line as the firmware parses it (line number, checksum and comment already removed)."""
    line: str
    word: str = ""                   # "G1", "M104", "T0", "M862.3"; "" when the line has no G/M/T command
    letter: str = ""
    number: Optional[int] = None
    text: str = ""                   # everything after the command word, for text commands
    params: Dict[str, Optional[float]] = field(default_factory=dict)
    bad_params: List[str] = field(default_factory=list)

    def has(self, letter: str) -> bool:
        return letter in self.params

    def value(self, letter: str, default: Optional[float] = None) -> Optional[float]:
        value = self.params.get(letter)
        return default if value is None else value


def parse_command(line: str) -> GcodeCommand:
    """Splits a command line into its command word and parameters; unparseable words are listed, not fatal."""
    line = line.strip()
    cmd = GcodeCommand(line=line)
    match = _COMMAND.match(line)
    if not match:
        return cmd
    cmd.letter = match.group(1).upper()
    cmd.number = int(match.group(2))
    cmd.word = f"{cmd.letter}{cmd.number}" + (f".{match.group(3)}" if match.group(3) is not None else "")
    rest = line[match.end():]
    cmd.text = rest.strip()
    if cmd.word in TEXT_COMMANDS:
        return cmd
    position = 0
    while position < len(rest):
        if rest[position].isspace():
            position += 1
            continue
        word = _WORD.match(rest, position)
        if word and word.group(2) is None and rest[position + 1:position + 2].isalpha():
            word = None  # "Qx", "Hello": text, not a flag followed by another word
        if not word:
            end = rest.find(" ", position)
            end = len(rest) if end < 0 else end
            cmd.bad_params.append(rest[position:end])
            position = end
            continue
        letter, number = word.group(1).upper(), word.group(2)
        cmd.params[letter] = float(number) if number is not None else None
        position = word.end()
    return cmd


def checksum(data: bytes) -> int:
    """The RepRap line checksum: XOR of every byte before '*'."""
    value = 0
    for byte in data:
        value ^= byte
    return value


# ---- SD card ----

class SdError(Exception):
    """A refused SD operation; the message is the name the firmware prints back."""


class SdCard:
    """An SD card backed by a directory.  Names are paths relative to the root, matched case-insensitively."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mounted = True
        self.selected: Optional[str] = None
        self.size = 0
        self.position = 0
        self.printing = False
        self._reader: Optional[BinaryIO] = None
        self._writer: Optional[BinaryIO] = None
        self.writing: Optional[str] = None

    # names
    def _resolve(self, name: str, must_exist: bool) -> Tuple[str, Path]:
        name = name.strip().lstrip("/")
        if not name or "\x00" in name or any(part in ("..", "") for part in name.split("/")):
            raise SdError(name)
        wanted = name.lower()
        for existing, _ in self.listing():
            if existing.lower() == wanted:
                return existing, self.root / existing
        if must_exist:
            raise SdError(name)
        return name, self.root / name

    def listing(self) -> List[Tuple[str, int]]:
        if not self.mounted or not self.root.is_dir():
            return []
        files = []
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                files.append((path.relative_to(self.root).as_posix(), path.stat().st_size))
        return files

    # reading
    @property
    def is_open(self) -> bool:
        return self._reader is not None

    def select(self, name: str) -> Tuple[str, int]:
        self.close_reader()
        real, path = self._resolve(name, must_exist=True)
        try:
            self._reader = open(path, "rb")
        except OSError:
            raise SdError(name) from None
        self.selected, self.size, self.position, self.printing = real, path.stat().st_size, 0, False
        return real, self.size

    def seek(self, position: int) -> None:
        if self._reader is not None:
            self.position = max(0, min(int(position), self.size))
            self._reader.seek(self.position)

    def read_line(self) -> Optional[bytes]:
        """The next line of the selected file, or None at its end."""
        if self._reader is None:
            return None
        line = self._reader.readline()
        if not line:
            return None
        self.position += len(line)
        return line

    def close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        self.printing = False

    # writing
    def open_write(self, name: str) -> str:
        self.close_writer()
        real, path = self._resolve(name, must_exist=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = open(path, "wb")
        except OSError:
            raise SdError(name) from None
        self.writing = real
        return real

    def write_line(self, line: str) -> None:
        if self._writer is not None:
            self._writer.write(line.encode("utf-8", "replace") + b"\n")

    def close_writer(self) -> Optional[str]:
        name = self.writing
        if self._writer is not None:
            self._writer.close()
        self._writer, self.writing = None, None
        return name

    def delete(self, name: str) -> str:
        real, path = self._resolve(name, must_exist=True)
        if self.selected == real:
            self.close_reader()
            self.selected = None
        try:
            os.unlink(path)
        except OSError:
            raise SdError(name) from None
        return real

    def release(self) -> None:
        self.close_reader()
        self.close_writer()
        self.selected = None
        self.mounted = False

    def close(self) -> None:
        self.close_reader()
        self.close_writer()


# ---- faults ----

FAULT_KINDS = {
    # kind: {param: default}
    "drop_line": {"count": 1},
    "corrupt_checksum": {"count": 1},
    # OctoPrint's simulator and others: a line error does not empty the receive buffer, every line still in it is
    # refused in turn ("expected line X got Y"), for the next ``count`` line errors.
    "keep_buffer": {"count": 50},
    # Some firmwares ask twice for one error ("Resend: N" twice, one ok), for the next ``count`` line errors.
    "resend_twice": {"count": 1},
    "silent": {"seconds": None},
    "disconnect": {"reopen_after": None},
    "garbage": {"kind": "mixed", "size": 10240},
    "firmware_error": {"message": "MINTEMP triggered, system stopped! Heater_ID: 0"},
}
GARBAGE_KINDS = ("random", "utf8", "long", "mixed")
#: Faults that act on the line that triggers them (or the next line when injected without a trigger).
LINE_FAULTS = ("drop_line", "corrupt_checksum")


@dataclass
class Fault:
    """A fault to inject: what, when (``at`` = n-th received line, ``at_line_number`` = line ``N<n>``), how."""
    kind: str
    at: Optional[int] = None
    at_line_number: Optional[int] = None
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; choose one of: {', '.join(FAULT_KINDS)}")
        unknown = set(self.params) - set(FAULT_KINDS[self.kind])
        if unknown:
            raise ValueError(f"fault {self.kind!r} takes {', '.join(FAULT_KINDS[self.kind]) or 'no parameters'}; "
                             f"got {', '.join(sorted(unknown))}")
        self.params = {**FAULT_KINDS[self.kind], **self.params}
        for name in ("count",):
            if name in self.params and (not isinstance(self.params[name], int) or self.params[name] < 1):
                raise ValueError(f"fault {self.kind!r}: {name} must be an integer >= 1")
        for name in ("seconds", "reopen_after"):
            value = self.params.get(name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0 or math.isnan(value)):
                raise ValueError(f"fault {self.kind!r}: {name} must be a number of seconds >= 0 (or omitted)")
        if self.kind == "garbage":
            if self.params["kind"] not in GARBAGE_KINDS:
                raise ValueError(f"garbage kind must be one of {', '.join(GARBAGE_KINDS)}")
            if not isinstance(self.params["size"], int) or self.params["size"] < 1:
                raise ValueError("garbage size must be an integer >= 1")
        if self.at is not None and (not isinstance(self.at, int) or self.at < 1):
            raise ValueError("a fault's trigger line must be an integer >= 1")

    @property
    def triggered_by_line(self) -> bool:
        return self.at is not None or self.at_line_number is not None

    def matches(self, ordinal: int, line_number: Optional[int]) -> bool:
        if self.at is not None:
            return ordinal == self.at
        return self.at_line_number is not None and line_number == self.at_line_number

    def __str__(self) -> str:
        trigger = f"@{self.at}" if self.at is not None else (
            f"@N{self.at_line_number}" if self.at_line_number is not None else "")
        params = ",".join(f"{k}={v}" for k, v in self.params.items() if v != FAULT_KINDS[self.kind].get(k))
        return f"{self.kind}{trigger}" + (f":{params}" if params else "")


def _convert(value: str) -> Any:
    lowered = value.strip().lower()
    if lowered in ("", "none", "forever", "never"):
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value.strip()


def parse_trigger(at: Union[int, str, None]) -> Tuple[Optional[int], Optional[int]]:
    """``100`` or ``"100"`` → 100th received line; ``"N100"`` → the line numbered 100."""
    if at is None:
        return None, None
    if isinstance(at, bool):
        raise ValueError(f"bad fault trigger {at!r}")
    if isinstance(at, int):
        return at, None
    text = str(at).strip()
    if text[:1] in ("N", "n") and text[1:].isdigit():
        return None, int(text[1:])
    if text.isdigit():
        return int(text), None
    raise ValueError(f"bad fault trigger {at!r}: use a line count (100) or a line number (N100)")


def parse_fault(spec: str) -> Fault:
    """Parses ``KIND[@N|@N<n>][:key=value,...]``, e.g. ``drop_line@100``, ``silent@N20:seconds=3``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty fault spec")
    head, _, tail = spec.strip().partition(":")
    kind, _, trigger = head.partition("@")
    params: Dict[str, Any] = {}
    if tail:
        items: List[str] = []
        for segment in tail.split(","):
            # A segment without '=' continues the previous value (messages may contain commas).
            if items and "=" not in segment:
                items[-1] += "," + segment
            else:
                items.append(segment)
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad fault parameter {item!r} in {spec!r}: use key=value")
            params[key.strip()] = value if key.strip() == "message" else _convert(value)
    if trigger == "" and "@" in head:
        raise ValueError(f"bad fault spec {spec!r}: nothing after '@'")
    at, at_line_number = parse_trigger(trigger or None)
    return Fault(kind.strip().lower(), at, at_line_number, params)
