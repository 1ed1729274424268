"""The printer link against the virtual printer: real pty, real pyserial, the real parser.

Handshake and firmware info, line numbers/checksums, resends (single, storms, loops), lost lines, timeouts, a
vanishing port, garbage, M112, temperatures, invalid tools, auto-detection and the other firmware dialects.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from zevents.printer.link import STATE_STRINGS, LinkError, PrinterLink, checksum, numbered, strip_line
from zevents.printer.virtual import VirtualPrinter

# Commands the link sends on its own (handshake, firmware query, temperature reports, timeout probes).
LINK_OWN = ("M110", "M115", "M155", "M105")


class Recorder:
    """The link's emit callable: keeps (name, payload, src, monotonic time) and lets tests wait for events."""

    def __init__(self):
        self.events: list = []
        self.cond = threading.Condition()

    def __call__(self, name, payload, src):
        with self.cond:
            self.events.append((name, payload, src, time.monotonic()))
            self.cond.notify_all()

    def wait(self, predicate, timeout: float = 15.0, what: str = "an event"):
        """The first recorded event matching predicate(name, payload, src) (waiting for it if needed)."""
        if isinstance(predicate, str):
            wanted = predicate
            predicate = lambda name, payload, src: name == wanted  # noqa: E731
            what = wanted
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for event in self.events:
                    if predicate(*event[:3]):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                                         f"{[e[0] for e in self.events][-30:]}")
                self.cond.wait(remaining)

    def named(self, *names) -> list:
        with self.cond:
            return [e for e in self.events if e[0] in names]

    def names(self) -> list:
        with self.cond:
            return [e[0] for e in self.events]

    def states(self) -> list:
        return [e[1]["state_id"] for e in self.named("PrinterStateChanged")]


def wait_until(predicate, timeout: float = 15.0, what: str = "a condition"):
    """Wait for a condition of the link or the printer, on an Event (no sleeping loop in tests)."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        done.wait(0.01)
    return True


def commands(printer: VirtualPrinter) -> list:
    """What the printer executed, without the link's own housekeeping commands."""
    return [c for c in printer.received if not c.upper().startswith(LINK_OWN)]


def make_link(port, recorder, **options) -> PrinterLink:
    options.setdefault("timeout", 3.0)
    options.setdefault("retries", 2)
    return PrinterLink(port, 115200, emit=recorder, **options)


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def printer(tmp_path):
    vp = VirtualPrinter(firmware="marlin", speed=0, sd_dir=tmp_path / "sd", boot_delay=0.05)
    vp.start()
    yield vp
    vp.stop()


@pytest.fixture
def link(printer, recorder):
    the_link = make_link(printer.port, recorder)
    assert the_link.connect(), the_link.error
    yield the_link
    the_link.disconnect(timeout=1.0)


# --- pure helpers ----------------------------------------------------------------------------------------------

def test_checksum_and_numbering_match_the_reprap_rule():
    assert checksum(b"N0 M110 N0") == 125
    assert numbered("M110 N0", 0) == b"N0 M110 N0*125\n"
    assert numbered("G28", 7) == b"N7 G28*" + str(checksum(b"N7 G28")).encode() + b"\n"


@pytest.mark.parametrize("raw, expected", [
    ("G1 X10 ; move", "G1 X10"),
    ("  ; only a comment", ""),
    ("N12 G28*99", "G28"),
    ("M117 hello", "M117 hello"),
    ("", ""),
])
def test_strip_line_keeps_only_the_command(raw, expected):
    assert strip_line(raw) == expected


# --- connecting ------------------------------------------------------------------------------------------------

def test_connect_publishes_the_connection_events_and_reads_the_firmware(link, recorder, printer):
    names = recorder.names()
    assert names[0] == "Connecting"
    assert recorder.states() == ["OPEN_SERIAL", "CONNECTING", "OPERATIONAL"]
    connected = recorder.wait("Connected")
    assert connected[1] == {"port": printer.port, "baudrate": 115200}
    assert names.index("Connected") > names.index("PrinterStateChanged")
    state = recorder.named("PrinterStateChanged")[-1][1]
    assert state == {"state_id": "OPERATIONAL", "state_string": STATE_STRINGS["OPERATIONAL"]}
    assert "Marlin" in link.firmware.get("FIRMWARE_NAME", "")
    assert link.capabilities.get("AUTOREPORT_TEMP") is True
    # Autoreport capable: temperatures come by themselves, no polling.
    printer.wait_received("M155")


def test_disconnect_publishes_disconnecting_and_disconnected(link, recorder):
    link.disconnect()
    names = recorder.names()
    assert names[-3:] == ["Disconnecting", "PrinterStateChanged", "Disconnected"]
    assert recorder.states()[-1] == "CLOSED"
    with pytest.raises(LinkError, match="not connected"):
        link.send(["G28"])


def test_a_missing_port_is_an_error_event_not_an_exception(recorder, tmp_path):
    the_link = make_link(str(tmp_path / "no-such-tty"), recorder)
    assert the_link.connect() is False
    error = recorder.wait("Error")[1]
    assert error["reason"] == "connection"
    assert "no-such-tty" in error["error"]
    assert recorder.states()[-1] == "CLOSED_WITH_ERROR"


def test_autodetect_finds_the_printer_among_candidates(printer, recorder, tmp_path):
    the_link = PrinterLink("AUTO", 0, emit=recorder, timeout=2.0, hello_timeout=1.0,
                           candidates=[str(tmp_path / "ttyNOPE"), printer.port])
    try:
        assert the_link.connect(), the_link.error
        assert the_link.port == printer.port
        assert recorder.states()[0] == "DETECT_SERIAL"
        assert recorder.wait("Connected")[1]["port"] == printer.port
    finally:
        the_link.disconnect(timeout=1.0)


def test_autodetect_with_no_answering_port_reports_autodetect(recorder, tmp_path):
    the_link = PrinterLink("AUTO", 115200, emit=recorder, timeout=1.0, hello_timeout=0.3,
                           candidates=[str(tmp_path / "ttyNOPE")])
    assert the_link.connect() is False
    assert recorder.wait("Error")[1]["reason"] == "autodetect"


# --- sending -----------------------------------------------------------------------------------------------------

def test_commands_are_numbered_parsed_and_executed_in_order(link, recorder, printer):
    accepted, suppressed = link.send(["G28", "G1 Z5 F600", "G1 X10 Y10"], src="user")
    assert (accepted, suppressed) == (3, [])
    printer.wait_received("G1 X10")
    assert commands(printer)[-3:] == ["G28", "G1 Z5 F600", "G1 X10 Y10"]
    home = recorder.wait("Home")
    assert home[2] == "user"
    zchange = recorder.wait("ZChange")
    assert zchange[1]["new"] == 5 and zchange[2] == "user"


def test_a_suppressed_command_is_never_sent(link, recorder, printer):
    accepted, suppressed = link.send(["M0", "G4 P1"], src="hook")
    assert accepted == 1 and suppressed == ["M0"]
    printer.wait_received("G4")
    assert "M0" not in commands(printer)
    event = recorder.wait("CommandSuppressed")
    assert event[2] == "hook" and event[1]["command"].startswith("M0")


def test_m114_gives_a_position_update_from_the_firmware(link, recorder, printer):
    link.send(["G28", "G1 X12 Y34 Z5 F3000"])
    assert link.send_and_wait("M114", timeout=10) is not None
    update = recorder.wait("PositionUpdate")
    assert update[2] == "firmware"
    assert (update[1]["x"], update[1]["y"], update[1]["z"]) == (12, 34, 5)
    assert update[1]["f"] == 3000
    assert link.position["x"] == 12


def test_an_invalid_tool_is_reported_and_then_suppressed(link, recorder, printer):
    link.send(["T3"])
    event = recorder.wait("InvalidToolReported")
    assert event[1]["tool"] == 3 and event[2] == "firmware"
    accepted, suppressed = link.send(["T3"])
    assert accepted == 0 and suppressed == ["T3"]


def test_temperatures_are_conflated(printer, recorder):
    the_link = make_link(printer.port, recorder, temperature_interval=0.3)
    assert the_link.connect()
    try:
        the_link.send(["M104 S200", "M140 S60"])
        first = recorder.wait(lambda n, p, s: n == "Temperature" and (p["tools"].get("T0") or [0, 0])[1] == 200)
        assert first[1]["bed"] is not None and first[1]["chamber"] is None
        wait_until(lambda: len(recorder.named("Temperature")) >= 3, what="three temperature events")
        stamps = [e[3] for e in recorder.named("Temperature")]
        # Never two within the conflation interval, however many reports the firmware sends.
        assert all(b - a >= 0.3 - 0.01 for a, b in zip(stamps, stamps[1:]))
    finally:
        the_link.disconnect(timeout=1.0)


# --- resends and lost lines ---------------------------------------------------------------------------------------

def stream(count: int) -> list:
    return [f"G1 X{i % 150}.5 Y{(i * 7) % 150}.25 F6000" for i in range(count)]


def test_a_corrupted_line_is_resent_once(link, printer):
    link.send(["G28"])
    printer.wait_received("G28")
    printer.inject("corrupt_checksum")
    lines = stream(20)
    link.send(lines)
    assert link.wait_idle(15)
    assert commands(printer)[-20:] == lines
    assert printer.stats["resends_requested"] >= 1
    assert link.stats["lines_resent"] >= 1


def test_a_resend_storm_loses_and_duplicates_nothing(link, printer):
    lines = stream(400)
    for at in range(30, 400, 37):
        printer.inject("corrupt_checksum", at=at)
    printer.inject("drop_line", at=120)
    printer.inject("drop_line", at=250)
    link.send(lines)
    assert link.wait_idle(30)
    assert commands(printer)[-400:] == lines
    assert link.stats["resend_requests"] >= 10


@pytest.mark.parametrize("window", [4, 16])
def test_a_firmware_that_refuses_every_line_in_flight_and_asks_twice_loses_and_duplicates_nothing(
        printer, recorder, window):
    """OctoPrint's simulator and Repetier keep their receive buffer after a line error: each line still in flight
    is refused in turn ("expected line X got Y" + Resend + ok), some firmwares ask twice for one error.  Taking
    each echo as a new request sent the requested line again and again: "expected 101 got 100" for ever."""
    the_link = make_link(printer.port, recorder, window=window)
    assert the_link.connect(), the_link.error
    try:
        printer.inject("keep_buffer", count=10_000)
        lines = stream(400)
        for at in range(40, 400, 45):
            printer.inject("corrupt_checksum", at=at)
        for at in (100, 300):
            printer.inject("resend_twice", at=at)
            printer.inject("corrupt_checksum", at=at)
        the_link.send(lines)
        assert the_link.wait_idle(60)
        assert commands(printer)[-400:] == lines
        assert the_link.stats["resend_echoes_ignored"] >= 1 and the_link.stats["resend_duplicates"] >= 1
        # One rewind per real error, not one per echo.
        assert the_link.stats["lines_resent"] <= 12 * window
        assert not recorder.named("Error") and the_link.connected
    finally:
        the_link.disconnect(timeout=1.0)


def test_a_printer_that_keeps_asking_for_the_same_line_is_a_resend_loop(link, recorder, printer):
    printer.inject("corrupt_checksum", count=500)
    link.send(stream(5))
    error = recorder.wait("Error", timeout=20)[1]
    assert error["reason"] == "resend_loop" and error["consequence"] == "disconnect"
    recorder.wait("Disconnected")
    assert recorder.states()[-1] == "CLOSED_WITH_ERROR"


def test_a_dropped_last_line_is_recovered_by_the_timeout_probe(printer, recorder):
    the_link = make_link(printer.port, recorder, timeout=0.5, retries=3)
    assert the_link.connect()
    try:
        printer.inject("drop_line")
        the_link.send(["G1 X5 Y5"])
        printer.wait_received("G1 X5 Y5", timeout=10)
        assert the_link.wait_idle(10)
        assert commands(printer).count("G1 X5 Y5") == 1
        assert the_link.connected and not recorder.named("Error")
    finally:
        the_link.disconnect(timeout=1.0)


@pytest.mark.parametrize("firmware", ["marlin", "prusa", "repetier", "smoothie"])
def test_every_form_of_resend_request_is_honoured(firmware, recorder, tmp_path):
    """Marlin/Prusa "Resend: N" + ok, Repetier "Resend:N" + ok (and "skip" for copies), Smoothie "rs N"."""
    vp = VirtualPrinter(firmware=firmware, speed=0, sd_dir=tmp_path / "sd", boot_delay=0.05)
    vp.start()
    the_link = make_link(vp.port, recorder, timeout=1.0, retries=5)
    try:
        assert the_link.connect(), the_link.error
        lines = stream(120)
        for at in (20, 55, 90):
            vp.inject("corrupt_checksum", at=at)
        the_link.send(lines)
        assert the_link.wait_idle(30)
        assert [c for c in commands(vp) if c.startswith("G1")] == lines
        assert the_link.stats["resend_requests"] >= 3 and the_link.connected
    finally:
        the_link.disconnect(timeout=1.0)
        vp.stop()


def test_m110_renumbers_the_lines(link, printer):
    link.send(["M110 N500", "G1 X1", "G1 X2"])
    printer.wait_received("G1 X2")
    assert link.wait_idle(10)
    assert commands(printer)[-2:] == ["G1 X1", "G1 X2"]
    assert "N501 G1 X1" in "\n".join(link.comm_log)


def test_no_more_than_the_window_is_unacknowledged(printer, recorder):
    the_link = make_link(printer.port, recorder, window=3, timeout=30.0)
    assert the_link.connect()
    try:
        printer.inject("silent")
        before = the_link.stats["lines_sent"]
        the_link.send(stream(20))
        wait_until(lambda: the_link.stats["lines_sent"] - before == 3, what="a full window")
        assert the_link.wait_idle(0.5) is False  # nothing answers: the writer must stay at the window
        assert the_link.stats["lines_sent"] - before == 3
        assert the_link.status()["unacknowledged"] == 3
    finally:
        printer.recover()
        the_link.disconnect(timeout=5.0)


def test_busy_keepalives_hold_off_the_timeout(recorder, tmp_path):
    vp = VirtualPrinter(speed=1.0, sd_dir=tmp_path / "sd", boot_delay=0.05, busy_interval=0.2)
    vp.start()
    the_link = make_link(vp.port, recorder, timeout=0.6, retries=1)
    try:
        assert the_link.connect(), the_link.error
        assert the_link.send_and_wait("G4 S2", timeout=20) is not None   # 2 s dwell: 3 timeouts' worth
        assert the_link.connected and not recorder.named("Error")
        assert "echo:busy: processing" in "\n".join(the_link.comm_log)
        assert the_link.stats["timeouts"] == 0
    finally:
        the_link.disconnect(timeout=1.0)
        vp.stop()


# --- failures -----------------------------------------------------------------------------------------------------

def test_a_silent_printer_times_out_with_an_error_and_nothing_hangs(printer, recorder):
    the_link = make_link(printer.port, recorder, timeout=0.4, retries=2)
    assert the_link.connect()
    printer.inject("silent")
    the_link.send(stream(10))
    error = recorder.wait("Error", timeout=15)[1]
    assert error["reason"] == "timeout" and error["consequence"] == "disconnect"
    recorder.wait("Disconnected")
    assert recorder.states()[-2:] == ["ERROR", "CLOSED_WITH_ERROR"]
    assert not the_link.connected
    with pytest.raises(LinkError):
        the_link.send(["G28"])
    printer.recover()


def test_a_vanishing_port_is_a_connection_error(link, recorder, printer):
    link.send(["G28"])
    printer.inject("disconnect")
    error = recorder.wait("Error", timeout=15)[1]
    assert error["reason"] == "connection" and error["consequence"] == "disconnect"
    recorder.wait("Disconnected")
    assert not link.connected


def test_garbage_replies_do_not_disturb_the_stream(link, recorder, printer):
    lines = stream(60)
    link.send(lines[:30])
    printer.inject("garbage")   # random bytes, invalid UTF-8 and a 10 KB line
    printer.send_line("\x00\x01 ok ok resend: 1 \xff")
    link.send(lines[30:])
    assert link.wait_idle(20)
    assert commands(printer)[-60:] == lines
    assert link.connected
    assert not recorder.named("Error")


def test_m112_is_an_emergency_stop(link, recorder, printer):
    link.send(["G28"])
    link.send(["M112"], src="user")
    assert recorder.wait("EStop")[2] == "user"
    error = recorder.wait("Error")[1]
    assert error["reason"] == "firmware" and error["consequence"] == "emergency"
    assert "halted" in error["error"].lower() or "kill" in error["error"].lower()
    assert error["logs"] and any("M112" in line for line in error["logs"])
    recorder.wait("Disconnected")
    assert printer.halted


def test_a_fatal_firmware_error_stops_the_printer_and_disconnects(link, recorder, printer):
    printer.inject("firmware_error", message="Thermal Runaway, system stopped! Heater_ID: bed")
    error = recorder.wait("Error")[1]
    assert error["reason"] == "firmware" and error["consequence"] == "emergency"
    assert "Thermal Runaway" in error["error"]
    recorder.wait("Disconnected")
    assert recorder.states()[-1] == "CLOSED_WITH_ERROR"


# --- other firmware dialects --------------------------------------------------------------------------------------

@pytest.mark.parametrize("firmware", ["prusa", "klipper", "rrf", "smoothie", "repetier"])
def test_the_link_speaks_every_dialect_of_the_virtual_printer(firmware, recorder, tmp_path):
    vp = VirtualPrinter(firmware=firmware, speed=0, sd_dir=tmp_path / "sd", boot_delay=0.05)
    vp.start()
    the_link = make_link(vp.port, recorder)
    try:
        assert the_link.connect(), the_link.error
        the_link.send(["G28", "G1 X20 Y30 Z2 F3000"])
        assert the_link.send_and_wait("M114", timeout=10) is not None
        update = recorder.wait("PositionUpdate")[1]
        assert (update["x"], update["y"], update["z"]) == (20, 30, 2)
        assert [c for c in commands(vp) if c.startswith(("G28", "G1"))] == ["G28", "G1 X20 Y30 Z2 F3000"]
    finally:
        the_link.disconnect(timeout=1.0)
        vp.stop()


# --- reconnecting ------------------------------------------------------------------------------------------------

def test_the_link_reconnects_once_a_vanished_port_is_back(tmp_path, recorder):
    """USB unplugged and plugged in again (a new pty behind the same symlink a second later): Connecting and
    Connected again, with nothing tried while the port is absent."""
    from zevents.printer.reconnect import Reconnector

    device = tmp_path / "ttyV"
    vp = VirtualPrinter(firmware="marlin", speed=0, sd_dir=tmp_path / "sd", boot_delay=0.05, link=device)
    vp.start()
    the_link = make_link(str(device), recorder)
    reconnector = Reconnector(the_link, the_link.connect, min_delay=0.2, max_delay=1.0, poll=0.05)
    try:
        assert the_link.connect(), the_link.error
        reconnector.start()
        vp.inject("disconnect", reopen_after=1.5)
        recorder.wait(lambda n, p, s: n == "Error" and p["reason"] == "connection", what="the lost port")
        recorder.wait(lambda n, p, s: n == "PrinterStateChanged" and p["state_id"] == "CLOSED_WITH_ERROR")
        wait_until(lambda: the_link.connected, timeout=30, what="connected again")
        assert vp.stats["disconnects"] == 1 and the_link.port == str(device)
        names = recorder.names()
        assert names.count("Connected") == 2 and names.count("Connecting") == 1 + reconnector.attempts
        # While the device was absent nothing was tried: one Error for the loss, one per failed attempt (an attempt
        # may come before the new port answers), not one per poll.
        assert names.count("Error") == reconnector.attempts
        the_link.send(["G1 X7"])
        vp.wait_received("G1 X7")
    finally:
        reconnector.stop()
        the_link.disconnect(timeout=1.0)
        vp.stop()


def test_a_port_that_appears_later_is_connected_and_an_unanswering_one_backs_off(tmp_path, recorder):
    from zevents.printer.reconnect import Reconnector

    device = tmp_path / "ttyLate"
    the_link = make_link(str(device), recorder, timeout=0.5, retries=1)
    assert not the_link.connect()
    assert recorder.named("Error")[-1][1]["reason"] == "connection" and the_link.state == "CLOSED_WITH_ERROR"
    reconnector = Reconnector(the_link, the_link.connect, min_delay=0.2, max_delay=0.4, poll=0.05).start()
    vp = None
    master, slave = os.openpty()  # a port that is there but where nothing answers: attempts fail, back off
    try:
        os.symlink(os.ttyname(slave), device)
        wait_until(lambda: reconnector.attempts >= 2, timeout=30, what="two failed attempts")
        assert not the_link.connected and recorder.names().count("Connecting") >= 3
        vp = VirtualPrinter(firmware="marlin", speed=0, sd_dir=tmp_path / "sd", boot_delay=0.05, link=device)
        vp.start()  # the printer behind the same name
        wait_until(lambda: the_link.connected, timeout=30, what="connected")
        assert recorder.names().count("Connected") == 1
    finally:
        reconnector.stop()
        the_link.disconnect(timeout=1.0)
        if vp is not None:
            vp.stop()
        os.close(master)
        os.close(slave)


def test_no_reconnect_after_an_emergency_or_a_requested_disconnect(link, recorder, printer):
    from zevents.printer.reconnect import Reconnector

    reconnector = Reconnector(link, link.connect, min_delay=0.05, max_delay=0.1, poll=0.02)
    assert not reconnector._should_try()
    link.disconnect()
    assert not reconnector._should_try()  # CLOSED, not an error
    link.connect()
    printer.inject("firmware_error")
    recorder.wait(lambda n, p, s: n == "Error" and p["consequence"] == "emergency")
    recorder.wait("Disconnected")
    wait_until(lambda: link.state == "CLOSED_WITH_ERROR", what="closed")
    assert not reconnector._should_try()
