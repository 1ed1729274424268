"""The machine half of the virtual printer: what its firmware thread does with each buffered command.

Owns the simulated machine state (position and modes, heaters, planner, SD card, auto-reports) and the command
handlers (G0-G4, G20/G21, G28, G90-G92, M0/M1, M20-M30, M82/M83, M104-M115, M118, M140, M155, M190, M220, M400,
M600, T<n>, ...).  Replies are formatted by the firmware profile; everything else a command needs (output, the lock
shared with the serial thread, halting) comes from ``VirtualPrinter`` in ``virtual.py``, which mixes this class in.

A command is acknowledged once it has run; a move has run once it sits in the planner (as in Marlin), so moves
are acknowledged at once until the planner is full.  Waits inside a command (planner full, G4, M109/M190, M0/M600)
send keep-alives and auto-reports and end early on M108, M410, a halt or a reboot.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from zevents.printer.virtual import firmware as fw
from zevents.printer.virtual.parts import GcodeCommand, Heater, Planner, SdError, parse_command

log = logging.getLogger("zevents.printer.virtual")

# Marlin's defaults: TEMP_WINDOW / TEMP_BED_WINDOW (°C), TEMP_RESIDENCY_TIME / TEMP_BED_RESIDENCY_TIME (s).
TEMP_WINDOW = 1.0
TEMP_RESIDENCY = 10.0
DEFAULT_FEEDRATE = 1500.0          # mm/min
MAX_FEED_XY, MAX_FEED_Z, MAX_FEED_E = 300.0, 5.0, 25.0   # mm/s
HOMING_FEED_XY, HOMING_FEED_Z = 50.0, 4.0                   # mm/s

#: Commands a Marlin build accepts and that change nothing the simulator models.
_ACCEPTED = frozenset(
    "G10 G11 G17 G18 G19 G29 G53 G54 G55 G56 G57 G58 G59 G80 G90.1 G91.1 M3 M4 M5 M7 M8 M9 M17 M18 M31 M42 M73 "
    "M75 M76 M77 M78 M80 M81 M84 M85 M92 M106 M107 M117 M119 M120 M121 M149 M150 M163 M164 M200 M201 M203 M204 "
    "M205 M206 M207 M208 M209 M211 M221 M226 M280 M290 M300 M301 M302 M303 M304 M350 M351 M355 M380 M381 M401 "
    "M402 M404 M405 M406 M407 M420 M421 M428 M486 M500 M501 M502 M503 M504 M540 M569 M575 M851 M900 M906 M907 "
    "M908 M909 M910 M911 M912 M913 M914 M915 M993 M994 M995 M997 M999 M108 M110 M808 M876".split())


class Stopping(Exception):
    """The printer is being stopped: the firmware thread unwinds."""


class Aborted(Exception):
    """The running command is cut short (halt, reboot): no acknowledgement is sent."""


@dataclass(frozen=True)
class Queued:
    """A command in the firmware's buffer: text without line number and checksum, its number, its board life."""
    text: str
    line_number: Optional[int]
    generation: int


#: What the firmware thread gets instead of a command when the next line comes from the SD card.
SD_STEP = object()


class FirmwareMachine:
    """Mixed into VirtualPrinter, which provides: ``profile``, ``clock``, ``tools``, ``buffer_size``,
    ``advanced_ok``, ``temp_report_interval``, ``default_busy_interval``, ``_planner_size``; the shared state under
    ``_lock``/``_cond`` (``_stopping``, ``_generation``, ``_booted``, ``_halted``, ``_silent_until``,
    ``_user_continue``, ``_quickstop``, ``_waiting_for_user``, ``_ring``, ``_received``, ``_stats``); and
    ``_emit``, ``_halt``, ``_is_silent``, ``_wake``, ``silent``, ``_pending``, ``_sd``."""

    def _reset_machine(self) -> None:
        """Power-on state of the simulated machine."""
        self._logical = [0.0, 0.0, 0.0, 0.0]
        self._offset = [0.0, 0.0, 0.0, 0.0]
        self._relative = False
        self._e_relative: Optional[bool] = None
        self._inches = False
        self._feedrate = DEFAULT_FEEDRATE
        self._feed_percent = 100.0
        self._active_tool = 0
        self._hotends = [Heater(self.clock, heat_rate=3.0, cool_rate=1.5, max_target=285.0)
                         for _ in range(self.tools)]
        self._bed = Heater(self.clock, heat_rate=1.0, cool_rate=0.3, max_target=125.0)
        self._planner = Planner(self._planner_size)
        self._temp_autoreport = 0.0
        self._next_temp_report = math.inf
        self._sd_autoreport = 0.0
        self._next_sd_report = math.inf
        self._busy_interval = self.default_busy_interval
        self._next_keepalive = math.inf
        self._in_temperature_wait = False
        if self._sd is not None:
            self._sd.close()
            self._sd.selected = None
            self._sd.mounted = True

    def _firmware_main(self) -> None:
        while True:
            try:
                work = self._next_work()
            except Stopping:
                return
            except Exception:
                log.exception("virtual printer: firmware thread error while idle")
                continue
            try:
                if work is SD_STEP:
                    self._sd_step()
                else:
                    self._execute(work)
            except Stopping:
                return
            except Aborted:
                continue
            except Exception:
                log.exception("virtual printer: error executing %r", getattr(work, "text", work))
                if work is not SD_STEP:
                    self._emit([self._ack(work)], work.generation)  # the host must not wait forever

    def _next_work(self):
        while True:
            now = time.monotonic()
            with self._lock:
                if self._stopping:
                    raise Stopping
                generation = self._generation
            if generation != self._exec_generation:
                self._reset_machine()
                self._exec_generation = generation
            with self._lock:
                silent = self._is_silent(now)
                runnable = self._booted and not self._halted and not silent
                if runnable and self._ring:
                    item = self._ring.popleft()
                    if self._pending:
                        self._wake()
                    return item
                sd_ready = runnable and self._sd is not None and self._sd.printing
            if sd_ready:
                return SD_STEP
            next_due = self._autoreports(now, generation, runnable)
            with self._lock:
                if self._stopping or (runnable and self._ring) or generation != self._generation:
                    continue
                wake_at = next_due
                if self._silent_until is not None:
                    wake_at = min(wake_at, self._silent_until)
                timeout = None if math.isinf(wake_at) else max(0.0, wake_at - time.monotonic())
                self._cond.wait(timeout)

    def _autoreports(self, now: float, generation: int, runnable: bool) -> float:
        """Sends M155/M27 auto-reports that are due; returns when the next one is.  A report that falls due
        while the firmware cannot talk (halted, silent) is skipped, not kept for later."""
        if self._temp_autoreport > 0 and now >= self._next_temp_report:
            if runnable and not self._in_temperature_wait:
                self._emit([self.profile.temperature_autoreport(self._temperature_snapshot())], generation)
            self._next_temp_report = now + self._temp_autoreport
        if self._sd_autoreport > 0 and self._sd is not None and self._sd.printing and now >= self._next_sd_report:
            if runnable:
                self._emit([f"SD printing byte {self._sd.position}/{self._sd.size}"], generation)
            self._next_sd_report = now + self._sd_autoreport
        due = math.inf
        if self._temp_autoreport > 0:
            due = min(due, self._next_temp_report)
        if self._sd_autoreport > 0 and self._sd is not None and self._sd.printing:
            due = min(due, self._next_sd_report)
        return due

    def _check_alive(self, generation: int) -> None:
        """Raises when the running command must end without an acknowledgement.  Call with the lock held."""
        if self._stopping:
            raise Stopping
        if self._halted or generation != self._generation:
            raise Aborted

    def _sleep_until(self, deadline: float, generation: int, busy: bool = False, paused: bool = False,
                     wake_on_user: bool = False) -> str:
        """Lets simulated time pass inside a command, sending keep-alives and auto-reports meanwhile.

        Returns "deadline", "user" (M108 or the button, when ``wake_on_user``) or "quickstop" (M410)."""
        while True:
            now = time.monotonic()
            with self._lock:
                self._check_alive(generation)
                silent = self._is_silent(now)
                if wake_on_user and self._user_continue:
                    self._user_continue = False
                    return "user"
                if self._quickstop:
                    self._quickstop = False
                    self._planner.clear()
                    return "quickstop"
            if now >= deadline:
                return "deadline"
            wake_at = deadline
            if (busy or paused) and self._busy_interval > 0 and self.profile.keepalive:
                if now >= self._next_keepalive:
                    if not silent:
                        self._emit([self.profile.busy(paused_for_user=paused)], generation)
                    self._next_keepalive = now + self._busy_interval
                wake_at = min(wake_at, self._next_keepalive)
            wake_at = min(wake_at, self._autoreports(now, generation, not silent))
            with self._lock:
                self._check_alive(generation)
                if (wake_on_user and self._user_continue) or self._quickstop:
                    continue
                timeout = None if math.isinf(wake_at) else max(0.0, wake_at - time.monotonic())
                self._cond.wait(timeout)

    def _ack(self, item: Queued) -> str:
        if self.advanced_ok:
            with self._lock:
                buffer_free = self.buffer_size - len(self._ring)
            return self.profile.ok(item.line_number, self._planner.free(time.monotonic()), buffer_free)
        return self.profile.ok(item.line_number)

    def _execute(self, item: Queued) -> None:
        with self._lock:
            self._received.append(item.text)
            self._received_total += 1
            self._stats["commands_executed"] += 1
            self._cond.notify_all()
        sd = self._sd
        if sd is not None and sd.writing is not None:
            if parse_command(item.text).word == "M29":
                name = sd.close_writer()
                log.info("virtual printer: SD upload of %s done", name)
                self._emit(["Done saving file.", self._ack(item)], item.generation)
            else:
                sd.write_line(item.text)
                self._emit([self._ack(item)], item.generation)
            return
        self._next_keepalive = time.monotonic() + self._busy_interval
        replies = self._run_command(parse_command(item.text), item.generation)
        if replies is None:
            replies = [self._ack(item)]
        elif replies and replies[-1] == "ok":
            replies = list(replies[:-1]) + [self._ack(item)]
        self._emit(replies, item.generation)

    def _sd_step(self) -> None:
        generation = self._exec_generation
        sd = self._sd
        raw = sd.read_line()
        if raw is None:
            self._synchronize(generation)
            name = sd.selected
            sd.close_reader()
            log.info("virtual printer: SD print of %s done", name)
            self._emit(["Done printing file"], generation)
            return
        text = raw.split(b";", 1)[0].decode("utf-8", "replace").strip()
        if not text:
            return
        with self._lock:
            self._stats["sd_commands_executed"] += 1
        self._next_keepalive = time.monotonic() + self._busy_interval
        replies = self._run_command(parse_command(text), generation)
        if replies:
            if replies[-1] == "ok":
                replies = replies[:-1]  # commands from the card are not acknowledged
            self._emit(replies, generation)

    def _run_command(self, cmd: GcodeCommand, generation: int) -> Optional[List[str]]:
        """Executes one command; returns the reply lines (ending in "ok") or None for a plain "ok"."""
        if cmd.bad_params:
            log.debug("virtual printer: unparseable words %s in %r ignored", cmd.bad_params, cmd.line)
        word = cmd.word
        if cmd.letter == "T":
            return self._tool_change(cmd.number)
        handler = self._HANDLERS.get(word)
        if handler is not None:
            return handler(self, cmd, generation)
        command_word = word or cmd.line.split(" ", 1)[0]
        if word in _ACCEPTED or command_word.upper() in self.profile.extra_commands:
            return None
        return self.profile.unknown_command(cmd.line, command_word)

    # ---- motion

    def _e_is_relative(self) -> bool:
        return self._relative if self._e_relative is None else self._e_relative

    def _plan_move(self, sim_seconds: float, generation: int) -> None:
        """Queues a move of that simulated duration, waiting (busy) while the planner is full."""
        wall = self.clock.to_wall(sim_seconds * 100.0 / self._feed_percent)
        if wall <= 0:
            return
        while True:
            now = time.monotonic()
            free_at = self._planner.next_free_at(now)
            if free_at is None:
                break
            self._sleep_until(free_at, generation, busy=True)
        self._planner.add(time.monotonic(), wall)

    def _synchronize(self, generation: int) -> None:
        """M400: waits until every planned move has finished."""
        while True:
            now = time.monotonic()
            idle_at = self._planner.idle_at(now)
            if idle_at <= now:
                return
            self._sleep_until(idle_at, generation, busy=True)

    def _target(self, cmd: GcodeCommand) -> List[float]:
        scale = 25.4 if self._inches else 1.0
        target = list(self._logical)
        for index, axis in enumerate("XYZE"):
            value = cmd.value(axis)
            if value is None:
                continue
            relative = self._e_is_relative() if axis == "E" else self._relative
            target[index] = target[index] + value * scale if relative else value * scale
        feed = cmd.value("F")
        if feed is not None and feed > 0:
            self._feedrate = feed * scale
        return target

    def _move_to(self, target: List[float], path_length: Optional[float], generation: int) -> None:
        if self.bed is not None:  # software endstops, as Marlin's min/max_software_endstops
            for index, axis in enumerate("xyz"):
                target[index] = min(max(target[index], self.bed[f"{axis}_min"]), self.bed[f"{axis}_max"])
        deltas = [t - c for t, c in zip(target, self._logical)]
        dx, dy, dz, de = (abs(d) for d in deltas)
        length = math.sqrt(dx * dx + dy * dy + dz * dz) if path_length is None else path_length
        feed = self._feedrate / 60.0
        seconds = (length if length > 0 else de) / feed if feed > 0 else 0.0
        seconds = max(seconds, dx / MAX_FEED_XY, dy / MAX_FEED_XY, dz / MAX_FEED_Z, de / MAX_FEED_E)
        self._logical = target
        self._plan_move(seconds, generation)

    def _g_move(self, cmd, generation):
        self._move_to(self._target(cmd), None, generation)

    def _g_arc(self, cmd, generation):
        start = list(self._logical)
        target = self._target(cmd)
        scale = 25.4 if self._inches else 1.0
        chord = math.hypot(target[0] - start[0], target[1] - start[1])
        clockwise = cmd.word == "G2"
        radius_word = cmd.value("R")
        if radius_word is not None and radius_word != 0:
            radius = abs(radius_word * scale)
            if chord > 2 * radius:
                return ["Error:G2/G3 bad parameters", "ok"]  # Marlin's STR_ERR_ARC_ARGS
            angle = 2 * math.asin(chord / (2 * radius)) if radius > 0 else 0.0
            if radius_word < 0:
                angle = 2 * math.pi - angle
        else:
            i, j = (cmd.value("I", 0.0) or 0.0) * scale, (cmd.value("J", 0.0) or 0.0) * scale
            if i == 0 and j == 0:
                return ["Error:G2/G3 bad parameters", "ok"]
            cx, cy = start[0] + i, start[1] + j
            radius = math.hypot(i, j)
            a0 = math.atan2(start[1] - cy, start[0] - cx)
            a1 = math.atan2(target[1] - cy, target[0] - cx)
            angle = (a0 - a1) if clockwise else (a1 - a0)
            if angle <= 1e-9:
                angle += 2 * math.pi
        length = math.hypot(radius * angle, target[2] - start[2])
        self._move_to(target, length, generation)
        return None

    def _g_dwell(self, cmd, generation):
        self._synchronize(generation)
        seconds = (cmd.value("P", 0.0) or 0.0) / 1000.0
        if cmd.value("S") is not None:
            seconds = cmd.value("S")
        self._sleep_until(time.monotonic() + self.clock.to_wall(max(0.0, seconds)), generation, busy=True)
        return None

    def _g_home(self, cmd, generation):
        self._synchronize(generation)
        axes = [a for a in "XYZ" if cmd.has(a)] or ["X", "Y", "Z"]
        seconds = 0.0
        for axis in axes:
            index = "XYZ".index(axis)
            machine = self._logical[index] - self._offset[index]
            seconds += abs(machine) / (HOMING_FEED_Z if axis == "Z" else HOMING_FEED_XY) + 1.0
            self._logical[index] = 0.0
            self._offset[index] = 0.0  # homing clears G92 shifts, as Marlin's set_axis_is_at_home does
        self._plan_move(seconds, generation)
        self._synchronize(generation)
        return None

    def _g_set_position(self, cmd, generation):
        scale = 25.4 if self._inches else 1.0
        for index, axis in enumerate("XYZE"):
            value = cmd.value(axis)
            if value is not None:
                value *= scale
                self._offset[index] += value - self._logical[index]
                self._logical[index] = value
        return None

    #: Modal settings a command word sets: attribute -> value.
    _MODES = {
        "G90": {"_relative": False, "_e_relative": None}, "G91": {"_relative": True, "_e_relative": None},
        "G20": {"_inches": True}, "G21": {"_inches": False},
        "M82": {"_e_relative": False}, "M83": {"_e_relative": True},
    }

    def _set_mode(self, cmd, generation):
        for attribute, value in self._MODES[cmd.word].items():
            setattr(self, attribute, value)
        return None

    def _m_feed_percent(self, cmd, generation):
        percent = cmd.value("S")
        if percent is not None and percent > 0:
            self._feed_percent = percent
        return None

    def _m_sync(self, cmd, generation):
        self._synchronize(generation)
        return None

    def _position_snapshot(self) -> fw.PositionSnapshot:
        x, y, z, e = self._logical
        mx, my, mz, me = (v - o for v, o in zip(self._logical, self._offset))
        return fw.PositionSnapshot(x, y, z, e, mx, my, mz, me, self.tools, self._active_tool)

    def _m_position(self, cmd, generation):
        return self.profile.position_report(self._position_snapshot())

    def _tool_change(self, tool: Optional[int]):
        if tool is None:
            return None
        if tool >= self.tools:
            return self.profile.invalid_tool(tool)
        self._active_tool = tool
        return [f"echo:Active Extruder: {tool}", "ok"] if self.tools > 1 else None

    # ---- temperatures

    def _temperature_snapshot(self) -> fw.TemperatureSnapshot:
        tools = tuple(fw.HeaterState(round(h.actual(), 2), h.target, h.power()) for h in self._hotends)
        bed = fw.HeaterState(round(self._bed.actual(), 2), self._bed.target, self._bed.power())
        return fw.TemperatureSnapshot(tools, bed, min(self._active_tool, len(tools) - 1), self._bed.ambient)

    def _hotend_for(self, cmd: GcodeCommand):
        """The hotend a command's T parameter names (or the active one); a reply when the index is invalid."""
        tool = cmd.value("T")
        if tool is None:
            return self._hotends[self._active_tool], None
        index = int(tool)
        if not 0 <= index < self.tools:
            return None, self.profile.invalid_tool_parameter(cmd.word, index)
        return self._hotends[index], None

    def _m_set_hotend(self, cmd, generation):
        heater, refusal = self._hotend_for(cmd)
        if refusal:
            return refusal
        target = cmd.value("S")
        if target is not None:
            heater.set_target(target)
        return None

    def _m_set_bed(self, cmd, generation):
        target = cmd.value("S")
        if target is not None:
            self._bed.set_target(target)
        return None

    def _m_wait_hotend(self, cmd, generation):
        heater, refusal = self._hotend_for(cmd)
        if refusal:
            return refusal
        return self._wait_heater(heater, cmd, generation)

    def _m_wait_bed(self, cmd, generation):
        return self._wait_heater(self._bed, cmd, generation)

    def _wait_heater(self, heater: Heater, cmd: GcodeCommand, generation: int):
        """M109/M190: S waits for heating only, R also for cooling; a temperature line every report interval."""
        wait_for_cooling = cmd.value("R") is not None
        target = cmd.value("R") if wait_for_cooling else cmd.value("S")
        if target is not None:
            heater.set_target(target)
        if heater.target <= 0:
            return None
        if heater.actual() > heater.target + TEMP_WINDOW and not wait_for_cooling:
            return None
        with self._lock:
            self._user_continue = False  # an M108 sent before the wait began does not end it (Marlin alike)
        self._in_temperature_wait = True
        try:
            residency_start: Optional[float] = None
            next_report = time.monotonic()
            while True:
                now = time.monotonic()
                within = abs(heater.actual(now) - heater.target) <= TEMP_WINDOW
                if within and residency_start is None:
                    residency_start = now
                left = None
                if residency_start is not None:
                    left = max(0.0, TEMP_RESIDENCY - self.clock.sim_since(residency_start, now))
                if now >= next_report:
                    shown = None if left is None else int(left)
                    if not self.silent:
                        self._emit([self.profile.temperature_wait(self._temperature_snapshot(), shown)], generation)
                    next_report = now + self.temp_report_interval
                if left is not None and left <= 0:
                    return None
                if residency_start is None:
                    event_at = now + heater.wall_seconds_until_within(TEMP_WINDOW)
                else:
                    event_at = residency_start + self.clock.to_wall(TEMP_RESIDENCY)
                if self._sleep_until(min(next_report, event_at), generation, wake_on_user=True) == "user":
                    return None
        finally:
            self._in_temperature_wait = False

    def _m_report_temperatures(self, cmd, generation):
        return self.profile.temperature_reply(self._temperature_snapshot())

    def _m_autoreport_temperatures(self, cmd, generation):
        interval = cmd.value("S")
        if interval is not None:
            self._temp_autoreport = max(0.0, min(float(interval), 60.0))
            self._next_temp_report = time.monotonic() + self._temp_autoreport
        return None

    def _m_keepalive_interval(self, cmd, generation):
        interval = cmd.value("S")
        if interval is not None:
            self._busy_interval = max(0.0, min(float(interval), 60.0))
        return None

    # ---- host interaction

    def _wait_for_user(self, generation: int, seconds: Optional[float] = None) -> None:
        deadline = math.inf if seconds is None else time.monotonic() + self.clock.to_wall(seconds)
        with self._lock:
            self._user_continue = False
        self._waiting_for_user = True
        try:
            self._next_keepalive = time.monotonic()  # the first "paused for user" goes out at once
            self._sleep_until(deadline, generation, paused=True, wake_on_user=True)
        finally:
            self._waiting_for_user = False

    def _m_user_stop(self, cmd, generation):
        self._synchronize(generation)
        seconds = None
        if cmd.value("S") is not None:
            seconds = cmd.value("S")
        elif cmd.value("P") is not None:
            seconds = cmd.value("P") / 1000.0
        self._wait_for_user(generation, seconds)
        return None

    def _m_filament_change(self, cmd, generation):
        self._synchronize(generation)
        self._emit(["//action:paused"], generation)
        self._wait_for_user(generation)
        self._emit(["//action:resumed"], generation)
        return None

    def _m_emergency_stop(self, cmd, generation):
        # Only reached when the profile has no emergency parser (or M112 came from the SD card).
        self._halt(self.profile.halted(), "M112")
        raise Aborted

    def _m_echo(self, cmd, generation):
        """M118 [E1] [A1] [Pn] text: E1 prefixes "echo:", A1 prefixes "//"."""
        text = cmd.text
        prefix = ""
        while True:
            flag = re.match(r"([EAP])(\d)\s*", text)
            if not flag:
                break
            if flag.group(1) == "E" and flag.group(2) == "1":
                prefix = "echo:" + prefix
            elif flag.group(1) == "A" and flag.group(2) == "1":
                prefix = "//" + prefix
            text = text[flag.end():]
        return [prefix + text, "ok"]

    def _m_firmware_info(self, cmd, generation):
        return self.profile.firmware_info(self.tools)

    # ---- SD card

    def _sd_ready(self) -> Optional[List[str]]:
        if self._sd is None or not self._sd.mounted:
            return ["echo:No media", "ok"]
        return None

    def _m_sd_list(self, cmd, generation):
        refusal = self._sd_ready()
        if refusal:
            return refusal
        return ["Begin file list"] + [f"{name} {size}" for name, size in self._sd.listing()] + ["End file list", "ok"]

    def _m_sd_init(self, cmd, generation):
        self._sd.mounted = True
        return ["echo:SD card ok", "ok"]

    def _m_sd_release(self, cmd, generation):
        self._sd.release()
        return None

    def _sd_operation(self, action: Callable[[], Any], success: Callable[[Any], List[str]],
                      failure: str) -> List[str]:
        """Runs an SD card operation: its reply lines, the failure line (``{}`` = the name) or "No media"."""
        refusal = self._sd_ready()
        if refusal:
            return refusal
        try:
            result = action()
        except SdError as exc:
            return [failure.format(exc), "ok"]
        return success(result) + ["ok"]

    def _m_sd_select(self, cmd, generation):
        return self._sd_operation(lambda: self._sd.select(cmd.text),
                                  lambda found: [f"File opened: {found[0]} Size: {found[1]}", "File selected"],
                                  "open failed, File: {}.")

    def _m_sd_start(self, cmd, generation):
        if self._sd is not None and self._sd.selected is not None and self._sd.is_open:
            self._sd.printing = True
            self._next_sd_report = time.monotonic() + self._sd_autoreport
        return None

    def _m_sd_pause(self, cmd, generation):
        if self._sd is not None:
            self._sd.printing = False
        return None

    def _m_sd_seek(self, cmd, generation):
        position = cmd.value("S")
        if position is not None and self._sd is not None:
            self._sd.seek(int(position))
        return None

    def _m_sd_status(self, cmd, generation):
        interval = cmd.value("S")
        if interval is not None:
            self._sd_autoreport = max(0.0, float(interval))
            self._next_sd_report = time.monotonic() + self._sd_autoreport
            return None
        sd = self._sd
        if sd is not None and sd.is_open:
            return [f"SD printing byte {sd.position}/{sd.size}", "ok"]
        return ["Not SD printing", "ok"]

    def _m_sd_write(self, cmd, generation):
        return self._sd_operation(lambda: self._sd.open_write(cmd.text), lambda name: [f"Writing to file: {name}"],
                                  "open failed, File: {}.")

    def _m_sd_delete(self, cmd, generation):
        return self._sd_operation(lambda: self._sd.delete(cmd.text), lambda name: [f"File deleted:{name}"],
                                  "Deletion failed, File: {}.")

    def _m_sd_abort(self, cmd, generation):
        if self._sd is not None:
            self._sd.close_reader()
        return None

    def _m_noop(self, cmd, generation):
        return None

    _HANDLERS: Dict[str, Callable[["FirmwareMachine", GcodeCommand, int], Optional[List[str]]]] = {
        "G0": _g_move, "G1": _g_move, "G2": _g_arc, "G3": _g_arc, "G4": _g_dwell, "G20": _set_mode,
        "G21": _set_mode, "G28": _g_home, "G90": _set_mode, "G91": _set_mode, "G92": _g_set_position,
        "M0": _m_user_stop, "M1": _m_user_stop, "M20": _m_sd_list, "M21": _m_sd_init, "M22": _m_sd_release,
        "M23": _m_sd_select, "M24": _m_sd_start, "M25": _m_sd_pause, "M26": _m_sd_seek, "M27": _m_sd_status,
        "M28": _m_sd_write, "M29": _m_noop, "M30": _m_sd_delete, "M82": _set_mode, "M83": _set_mode,
        "M104": _m_set_hotend, "M105": _m_report_temperatures, "M109": _m_wait_hotend, "M112": _m_emergency_stop,
        "M113": _m_keepalive_interval, "M114": _m_position, "M115": _m_firmware_info, "M118": _m_echo,
        "M140": _m_set_bed, "M155": _m_autoreport_temperatures, "M190": _m_wait_bed, "M220": _m_feed_percent,
        "M400": _m_sync, "M410": _m_noop, "M524": _m_sd_abort, "M600": _m_filament_change,
    }
