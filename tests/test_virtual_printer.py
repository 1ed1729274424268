"""The virtual printer, driven the way the link drives it: real pseudo-terminal, real pyserial, real files."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Union

import pytest
import serial

from conftest import shared_path
from zevents.printer.virtual import FIRMWARES, VirtualPrinter
from zevents.printer.virtual.parts import Fault, checksum, parse_command, parse_fault

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------------- helpers

def read_until(ser: serial.Serial, predicate: Union[str, Callable[[str], bool]], timeout: float = 5.0) -> List[str]:
    """Reads lines until one matches (a string: equality); returns every line read, the match last."""
    if isinstance(predicate, str):
        wanted = predicate
        predicate = lambda line: line == wanted  # noqa: E731
    lines: List[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = ser.readline()
        if not raw:
            continue
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if predicate(line):
            return lines
    pytest.fail(f"no matching line within {timeout} s; read {lines[-20:]!r}")


def numbered(n: int, command: str) -> bytes:
    body = f"N{n} {command}"
    return f"{body}*{checksum(body.encode())}\n".encode()


def send(ser: serial.Serial, *commands: str) -> None:
    ser.write(b"".join(c.encode() + b"\n" for c in commands))


def command(ser: serial.Serial, text: str, timeout: float = 5.0) -> List[str]:
    """Sends one command and returns its reply lines up to and including the acknowledgement."""
    send(ser, text)
    return read_until(ser, lambda line: line.startswith("ok"), timeout)


def open_port(vp: VirtualPrinter, expect_banner: bool = True, timeout: float = 0.2) -> serial.Serial:
    ser = serial.Serial(vp.port, 115200, timeout=timeout)
    if expect_banner:
        read_until(ser, lambda line: line in ("echo:SD card ok", "echo:No SD card", "ok", "SD card ok"))
    return ser


def open_any(vp: VirtualPrinter) -> serial.Serial:
    """Opens the port of a printer of any firmware; Smoothie's greeting ends in an "ok" that is read here."""
    ser = serial.Serial(vp.port, 115200, timeout=0.2)
    if vp.profile.name == "smoothie":
        read_until(ser, "ok")
    return ser


@pytest.fixture
def printer(virtual_printer):
    """The conftest's virtual printer (instant, Marlin) and an open pyserial port past its banner."""
    ser = open_port(virtual_printer)
    yield virtual_printer, ser
    ser.close()


def make_printer(tmp_path, **kwargs):
    kwargs.setdefault("speed", 0)
    kwargs.setdefault("sd_dir", tmp_path / "sd")
    return VirtualPrinter(**kwargs)


# ---------------------------------------------------------------------------------------------------- connection

def test_banner_on_open_and_again_after_reconnect(tmp_path):
    with make_printer(tmp_path) as vp:
        assert os.path.exists(vp.port) and vp.port.startswith("/dev/pts/")
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        banner = read_until(ser, "echo:SD card ok")
        assert banner[0] == "start"
        assert banner[1].startswith("echo:Marlin ")
        command(ser, "M104 S200")
        ser.close()
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        assert read_until(ser, "echo:SD card ok")[0] == "start"
        # Opening the port reset the board: the target set before is gone.
        assert command(ser, "M105")[-1].startswith("ok T:21.00 /0.00")
        assert vp.stats["boots"] == 2
        ser.close()


def test_m115_reports_firmware_and_capabilities(printer):
    vp, ser = printer
    reply = command(ser, "M115")
    assert reply[0].startswith("FIRMWARE_NAME:Marlin ") and "EXTRUDER_COUNT:1" in reply[0]
    caps = {line for line in reply if line.startswith("Cap:")}
    assert {"Cap:AUTOREPORT_TEMP:1", "Cap:EMERGENCY_PARSER:1", "Cap:SDCARD:1"} <= caps
    assert reply[-1] == "ok"


def test_every_command_is_acknowledged_in_order(printer):
    vp, ser = printer
    commands = ["G28", "G1 X10 Y10 F6000", "M106 S255", "M107", "G1 X20", "M400"]
    send(ser, *commands)
    oks = 0
    for _ in commands:
        read_until(ser, "ok")
        oks += 1
    assert oks == len(commands)
    assert vp.received == commands
    assert vp.stats["commands_executed"] == len(commands)


def test_unknown_command_is_echoed_then_acknowledged(printer):
    vp, ser = printer
    assert command(ser, "M9999 S1") == ['echo:Unknown command: "M9999 S1"', "ok"]
    assert command(ser, "HELLO") == ['echo:Unknown command: "HELLO"', "ok"]


def test_each_profile_accepts_its_own_slicer_commands(tmp_path):
    with make_printer(tmp_path, firmware="prusa") as vp:
        ser = open_port(vp)
        assert command(ser, "M862.3 P \"MK3S\"") == ["ok"]
        ser.close()
    with make_printer(tmp_path, firmware="klipper") as vp:
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        assert command(ser, "SET_VELOCITY_LIMIT ACCEL=5000") == ["ok"]
        assert command(ser, "M862.3 P \"MK3S\"") == ['// Unknown command:"M862.3"', "ok"]
        ser.close()
    with make_printer(tmp_path) as vp:  # Marlin knows neither
        ser = open_port(vp)
        reply = command(ser, "SET_VELOCITY_LIMIT ACCEL=5000")
        assert reply == ['echo:Unknown command: "SET_VELOCITY_LIMIT ACCEL=5000"', "ok"]
        ser.close()


def test_comment_only_and_empty_lines_get_no_answer(printer):
    vp, ser = printer
    ser.write(b"; just a comment\n\n   \nM105 ; with a comment\n")
    lines = read_until(ser, lambda line: line.startswith("ok"))
    assert len(lines) == 1 and vp.received == ["M105"]


# ---------------------------------------------------------------------------------------------------- line numbers

def test_wrong_checksum_asks_for_a_resend(printer):
    vp, ser = printer
    ser.write(numbered(0, "M110 N0"))
    read_until(ser, "ok")
    ser.write(numbered(1, "G28"))
    read_until(ser, "ok")
    ser.write(b"N2 G1 X10*1\n")
    assert read_until(ser, "ok") == ["Error:checksum mismatch, Last Line: 1", "Resend: 2", "ok"]
    ser.write(numbered(2, "G1 X10"))
    read_until(ser, "ok")
    assert vp.received[-2:] == ["G28", "G1 X10"]
    assert vp.stats["resends_requested"] == 1


def test_line_number_gap_missing_checksum_and_stray_checksum(printer):
    vp, ser = printer
    ser.write(numbered(1, "M105"))
    read_until(ser, lambda line: line.startswith("ok"))
    ser.write(numbered(3, "M105"))
    assert read_until(ser, "ok") == ["Error:Line Number is not Last Line Number+1, Last Line: 1", "Resend: 2",
                                     "ok"]
    ser.write(b"N2 M105\n")
    assert read_until(ser, "ok") == ["Error:No Checksum with line number, Last Line: 1", "Resend: 2", "ok"]
    ser.write(b"M105*12\n")
    assert read_until(ser, "ok") == ["Error:No Line Number with checksum, Last Line: 1", "Resend: 2", "ok"]
    assert vp.received == ["M105"]


def test_lines_sent_after_a_refused_line_are_not_executed_before_the_resend(printer):
    vp, ser = printer
    ser.write(numbered(1, "G1 X1"))
    read_until(ser, "ok")
    # Three lines in flight; the first is corrupt.  Marlin empties its buffer: none may run out of order.
    ser.write(b"N2 G1 X2*0\n" + numbered(3, "G1 X3") + numbered(4, "G1 X4"))
    read_until(ser, "Resend: 2")
    ser.write(numbered(2, "G1 X2") + numbered(3, "G1 X3") + numbered(4, "G1 X4"))
    assert vp.wait_received("G1 X4")
    assert vp.received == ["G1 X1", "G1 X2", "G1 X3", "G1 X4"]


def test_m110_sets_the_line_number(printer):
    vp, ser = printer
    body = b"N7 M110 N100"
    ser.write(body + b"*" + str(checksum(body)).encode() + b"\n")
    read_until(ser, "ok")
    ser.write(numbered(101, "M105"))
    assert read_until(ser, lambda line: line.startswith("ok"))[-1].startswith("ok T:")
    send(ser, "M110 N0")
    read_until(ser, "ok")
    ser.write(numbered(1, "G28"))
    read_until(ser, "ok")
    ser.write(numbered(5, "G28"))
    assert read_until(ser, "ok")[0] == "Error:Line Number is not Last Line Number+1, Last Line: 1"


def test_advanced_ok_reports_line_and_buffer_space(tmp_path):
    with make_printer(tmp_path, advanced_ok=True) as vp:
        ser = open_port(vp)
        ser.write(numbered(1, "G28"))
        line = read_until(ser, lambda line: line.startswith("ok"))[-1]
        assert re.fullmatch(r"ok N1 P\d+ B\d+", line), line
        ser.close()


# ---------------------------------------------------------------------------------------------------- position

def _shape(line: str) -> str:
    """A reply's layout: numbers become '#' but keep their number of decimals."""
    line = re.sub(r"-?\d+\.(\d+)", lambda m: "#." + "#" * len(m.group(1)), line)
    return re.sub(r"-?\d+", "#", line)


_SPEC_SECTIONS = {"marlin": "Marlin", "prusa": "Prusa", "klipper": "Klipper", "rrf": "RepRapFirmware",
                  "smoothie": "Smoothieware", "repetier": "Repetier"}


def _spec_lines(firmware: str) -> List[str]:
    text = shared_path("spec", "firmware-responses.txt").read_text()
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("# =="):
            inside = line[5:].startswith(_SPEC_SECTIONS[firmware])
        elif inside and not line.startswith("#"):
            lines.append(line)
    return lines


_MOVES = ["G28", "G90", "G1 X10 Y20 Z0.2 F3000", "G91", "G1 X5", "G90", "M83", "G1 E2", "G1 E1.5", "G92 E0"]

EXPECTED_M114 = {
    "marlin": ["X:15.00 Y:20.00 Z:0.20 E:0.00 Count X:1200 Y:1600 Z:80", "ok"],
    "prusa": ["X:15.00 Y:20.00 Z:0.20 E:0.00 Count X: 15.00 Y:20.00 Z:0.20 E:3.50", "ok"],
    "klipper": ["X:15.000 Y:20.000 Z:0.200 E:0.000", "ok"],
    "rrf": ["X:15.000 Y:20.000 Z:0.200 E:0.000 E0:3.5 Count 1200 1600 80 Machine 15.000 20.000 0.200 Bed comp 0.000",
            "ok"],
    "smoothie": ["ok C: X:15.0000 Y:20.0000 Z:0.2000 E:0.0000 "],
    "repetier": ["X:15.00 Y:20.00 Z:0.200 E:0.0000", "ok"],
}


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_m114_after_absolute_and_relative_moves_in_each_firmware_format(tmp_path, firmware):
    assert set(EXPECTED_M114) == set(FIRMWARES)
    with make_printer(tmp_path, firmware=firmware) as vp:
        ser = open_any(vp)
        for move in _MOVES:
            command(ser, move)
        assert vp.position == pytest.approx({"x": 15.0, "y": 20.0, "z": 0.2, "e": 0.0})
        reply = command(ser, "M114")
        assert reply == EXPECTED_M114[firmware]
        report = reply[0]
        try:
            from zevents.parser import classify_reply  # the firmware parser, once it exists
        except ImportError:
            classify_reply = None
        if classify_reply is not None:
            assert classify_reply(report.encode()).kind == "position"
        ser.close()


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_reply_layouts_match_the_firmware_responses_spec(tmp_path, firmware):
    spec_shapes = {_shape(line) for line in _spec_lines(firmware)}
    with make_printer(tmp_path, firmware=firmware) as vp:
        ser = open_any(vp)
        command(ser, "G1 X10 Y20 Z0.2")
        m114 = command(ser, "M114")
        m105 = command(ser, "M105")
        m115 = command(ser, "M115")
        ser.close()
    assert _shape(m114[0]) in spec_shapes, m114
    temperature_line = next(line for line in m105 if "T" in line and "/" in line)
    assert _shape(temperature_line) in spec_shapes, m105
    assert any(line.startswith(("FIRMWARE_NAME", "ok FIRMWARE_NAME")) and line.split(":")[0] in
               {s.split(":")[0] for s in _spec_lines(firmware)} for line in m115), m115


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_every_reply_is_understood_by_the_firmware_parser(tmp_path, firmware):
    parser = pytest.importorskip("zevents.parser")
    if not hasattr(parser, "classify_reply"):
        pytest.skip("zevents.parser has no classify_reply")
    with make_printer(tmp_path, firmware=firmware, busy_interval=0.01) as vp:
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        banner = read_until(ser, lambda line: line in ("echo:SD card ok", "SD card ok", "ok")) if (
            vp.profile.boot_lines(1, True)) else []
        replies = {}
        for text in ["M115", "G1 X10 Y20 Z0.2", "M114", "M104 S200", "M105", "M9999", "T9", "M28 a.gco", "G28",
                     "M29", "M20", "M23 a.gco", "M24"]:
            replies[text] = command(ser, text)
        replies["M24"] += read_until(ser, "Done printing file")
        replies["M27"] = command(ser, "M27")
        if vp.profile.checksum_policy == "resend":
            ser.write(b"N1 M105*1\n")
            replies["bad checksum"] = read_until(ser, lambda line: line.startswith(("Resend", "rs ")))
        send(ser, "M600")
        replies["M600"] = read_until(ser, "//action:paused")
        vp.wait_received("M600")
        deadline = time.monotonic() + 5
        while not vp.waiting_for_user and time.monotonic() < deadline:
            vp.wait_received("never", timeout=0.01)
        vp.user_continue()
        replies["M600"] += read_until(ser, lambda line: line.startswith("ok"))
        send(ser, "M112")
        replies["M112"] = [ser.readline().decode().rstrip("\r\n")]
        ser.close()

    def kinds(text):
        return [parser.classify_reply(line).kind for line in replies[text]]

    every = banner + [line for lines in replies.values() for line in lines]
    unknown = [line for line in every if parser.classify_reply(line).kind == "unknown"]
    assert set(unknown) <= {"Info:External Reset", "Free RAM:3102"}, unknown  # Repetier's boot chatter
    assert "firmware" in kinds("M115")
    position = parser.classify_reply(replies["M114"][0])
    assert position.kind == "position" and position.position["x"] == 10.0 and position.position["z"] == 0.2
    temperature = next(parser.classify_reply(line) for line in replies["M105"])
    assert temperature.kind == "temperature" and temperature.temperatures["T0"] == (200.0, 200.0)
    assert parser.classify_reply(replies["M9999"][0]).error_kind == "command"
    assert parser.classify_reply(replies["T9"][0]).tool == 9
    assert {"writing", "saved", "opened", "selected", "done", "printing"} <= {
        key for text in ("M28 a.gco", "M29", "M23 a.gco", "M24", "M27") for line in replies[text]
        for key in (parser.classify_reply(line).sd or {})}
    if "bad checksum" in replies:
        assert parser.classify_reply(replies["bad checksum"][-1]).resend_line == 1
    assert [a for a in (parser.classify_reply(line).action for line in replies["M600"]) if a] == ["paused", "resumed"]
    assert ("busy" in kinds("M600")) == vp.profile.keepalive
    assert parser.classify_reply(replies["M112"][0]).error_kind == "fatal"


def test_arcs_inches_and_home_clearing_offsets(printer):
    vp, ser = printer
    for text in ["G28", "G1 X0 Y0", "G2 X10 Y0 I5 J0", "G3 X0 Y0 R5"]:
        command(ser, text)
    assert vp.position["x"] == pytest.approx(0.0) and vp.position["y"] == pytest.approx(0.0)
    assert command(ser, "G2 X10 Y0 I0 J0")[0] == "Error:G2/G3 bad parameters"
    command(ser, "G20")
    command(ser, "G1 X1 Y2")
    command(ser, "G21")
    assert vp.position["x"] == pytest.approx(25.4) and vp.position["y"] == pytest.approx(50.8)
    command(ser, "G92 X0")
    assert command(ser, "M114")[0] == "X:0.00 Y:50.80 Z:0.00 E:0.00 Count X:2032 Y:4064 Z:0"
    command(ser, "G28 X")
    assert command(ser, "M114")[0] == "X:0.00 Y:50.80 Z:0.00 E:0.00 Count X:0 Y:4064 Z:0"


# ---------------------------------------------------------------------------------------------------- heaters

_WAIT_LINE = re.compile(r" T:(\d+\.\d\d) /(\d+\.\d\d) B:\d+\.\d\d /\d+\.\d\d @:\d+ B@:\d+ W:(\?|\d+)")


def test_m109_waits_with_periodic_temperature_lines(tmp_path):
    # 21 -> 200 °C at 3 °C/s is 60 simulated seconds: 0.6 s at speed 100, reported every 0.05 s.
    with make_printer(tmp_path, speed=100, temp_report_interval=0.05) as vp:
        ser = open_port(vp)
        lines = command(ser, "M109 S200")
        waits = [_WAIT_LINE.fullmatch(line) for line in lines[:-1]]
        assert all(waits), lines
        assert lines[-1] == "ok"
        assert len(waits) >= 3
        temps = [float(w.group(1)) for w in waits]
        assert temps == sorted(temps) and temps[0] < 200.0 and temps[-1] == 200.0
        assert waits[0].group(3) == "?" and waits[-1].group(3).isdigit()
        assert command(ser, "M105")[-1].startswith("ok T:200.00 /200.00 B:21.00 /0.00")
        ser.close()


def test_m190_waits_for_the_bed_and_m108_ends_a_wait(tmp_path):
    with make_printer(tmp_path, speed=100, temp_report_interval=0.05) as vp:
        ser = open_port(vp)
        lines = command(ser, "M190 S60")
        assert len(lines) >= 2 and lines[-2].startswith(" T:21.00 /0.00 B:60.00 /60.00")
        ser.close()
    with make_printer(tmp_path, speed=1, temp_report_interval=0.05) as vp:
        ser = open_port(vp)
        send(ser, "M109 S250")  # 76 s of heating at real speed
        read_until(ser, lambda line: line.endswith("W:?"))
        send(ser, "M108")  # the emergency parser ends the wait at once
        read_until(ser, "ok")
        assert vp.temperatures["tools"][0][0] < 250
        assert read_until(ser, lambda line: line.startswith("ok")) == ["ok"]  # M108's own ok
        ser.close()


def test_m155_auto_reports_temperatures(printer):
    vp, ser = printer
    command(ser, "M104 S180")
    command(ser, "M155 S0.1")
    reports = [read_until(ser, lambda line: line.startswith(" T:"))[-1] for _ in range(3)]
    assert all(re.fullmatch(r" T:180\.00 /180\.00 B:21\.00 /0\.00 @:\d+ B@:0", r) for r in reports), reports
    send(ser, "M155 S0")
    read_until(ser, "ok")
    ser.timeout = 0.5
    assert ser.readline() == b""  # auto-reports stopped


def test_invalid_tool_and_tool_changes(tmp_path):
    with make_printer(tmp_path) as vp:
        ser = open_port(vp)
        assert command(ser, "T1") == ["echo:T1 Invalid extruder", "ok"]
        assert command(ser, "M104 T3 S200") == ["echo:M104 Invalid extruder 3", "ok"]
        ser.close()
    with make_printer(tmp_path, tools=2) as vp:
        ser = open_port(vp)
        assert command(ser, "T1") == ["echo:Active Extruder: 1", "ok"]
        command(ser, "M104 T0 S200")
        reply = command(ser, "M105")[-1]
        assert reply.startswith("ok T:21.00 /0.00 B:21.00 /0.00 T0:200.00 /200.00 T1:21.00 /0.00 @:0 B@:0 @0:")
        assert command(ser, "T2") == ["echo:T2 Invalid extruder", "ok"]
        ser.close()


# ---------------------------------------------------------------------------------------------------- time

def test_dwell_honours_the_speed_factor_and_busy_keepalives(tmp_path):
    with make_printer(tmp_path, speed=0) as vp:
        ser = open_port(vp)
        assert command(ser, "G4 S3600", timeout=5) == ["ok"]  # an hour, instantly
        ser.close()
    with make_printer(tmp_path, speed=10, busy_interval=0.05) as vp:
        ser = open_port(vp)
        lines = command(ser, "G4 S5")  # 0.5 s of wall time
        assert lines[-1] == "ok" and lines[:-1] and set(lines[:-1]) == {"echo:busy: processing"}
        ser.close()


def test_planner_acknowledges_moves_before_they_finish(tmp_path):
    with make_printer(tmp_path, speed=1, planner_size=4) as vp:
        ser = open_port(vp)
        for _ in range(3):  # three 2 s moves fit in the planner: each is acknowledged when queued
            assert command(ser, "G1 X100 F3000" if _ % 2 == 0 else "G1 X0 F3000", timeout=1.5) == ["ok"]
        assert vp.wait_received("G1 X100")
        send(ser, "M410")  # quickstop empties the planner, so M400 returns
        read_until(ser, "ok")
        assert command(ser, "M400", timeout=1.5) == ["ok"]
        ser.close()


# ---------------------------------------------------------------------------------------------------- pause, halt

def test_m600_pauses_until_m108_or_the_button(printer):
    vp, ser = printer
    send(ser, "M600")
    lines = read_until(ser, "echo:busy: paused for user")
    assert lines[0] == "//action:paused"
    assert vp.waiting_for_user
    send(ser, "M108")
    assert read_until(ser, "ok")[-2:] == ["//action:resumed", "ok"]
    read_until(ser, "ok")  # M108's own
    send(ser, "M0")
    read_until(ser, "echo:busy: paused for user")
    vp.user_continue()
    assert read_until(ser, "ok")[-1] == "ok"
    assert not vp.waiting_for_user


def test_m112_halts_until_reconnect(tmp_path):
    with make_printer(tmp_path, speed=1) as vp:
        ser = open_port(vp)
        send(ser, "M109 S250")
        read_until(ser, lambda line: line.endswith("W:?"))
        send(ser, "M112")  # acts at once, even in the middle of M109
        assert read_until(ser, "Error:Printer halted. kill() called!")
        assert vp.halted
        send(ser, "M105")
        ser.timeout = 0.5
        assert ser.readline() == b""  # dead: no answer at all
        ser.close()
        ser = open_port(vp)
        assert not vp.halted
        assert command(ser, "M105")[-1].startswith("ok T:")
        ser.close()


def test_reconnects_are_noticed_without_inotify(tmp_path, monkeypatch):
    import zevents.printer.virtual.printer as virtual

    def no_inotify(path):
        raise OSError("inotify unavailable (test)")

    monkeypatch.setattr(virtual, "_OpenWatch", no_inotify)
    with make_printer(tmp_path) as vp:
        ser = open_port(vp)
        command(ser, "M104 S200")
        ser.close()
        deadline = time.monotonic() + 5
        while vp.client_connected and time.monotonic() < deadline:
            vp.wait_received("never", timeout=0.02)
        assert not vp.client_connected
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        assert read_until(ser, "echo:SD card ok")[0] == "start"
        assert command(ser, "M105")[-1].startswith("ok T:21.00 /0.00")
        ser.close()


@pytest.mark.parametrize("virtual_printer", [{"firmware": "prusa", "tools": 2}], indirect=True)
def test_the_fixture_takes_settings(virtual_printer):
    ser = open_port(virtual_printer)
    reply = command(ser, "M115")
    assert reply[0].startswith("FIRMWARE_NAME:Prusa-Firmware") and "EXTRUDER_COUNT:2" in reply[0]
    ser.close()


def _thread_cpu_seconds(thread) -> float:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_halted_printer_with_auto_reports_does_not_spin(printer):
    vp, ser = printer
    command(ser, "M155 S0.05")
    read_until(ser, lambda line: line.startswith(" T:"))
    send(ser, "M112")
    read_until(ser, "Error:Printer halted. kill() called!")
    firmware = next(t for t in vp._threads if t.name == "virtual-printer-firmware")
    before = _thread_cpu_seconds(firmware)
    ser.timeout = 1.0
    assert ser.readline() == b""  # no report from a halted printer...
    assert _thread_cpu_seconds(firmware) - before < 0.3  # ...and no busy loop skipping them


def test_a_printer_starts_once(tmp_path):
    vp = make_printer(tmp_path)
    vp.start()
    vp.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        vp.start()


def test_reset_button_reboots(printer):
    vp, ser = printer
    send(ser, "M112")
    read_until(ser, "Error:Printer halted. kill() called!")
    vp.reset()
    assert read_until(ser, "echo:SD card ok")[0] == "start"
    assert command(ser, "M105")[-1].startswith("ok T:")


# ---------------------------------------------------------------------------------------------------- SD card

def test_sd_upload_list_select_print_done_delete(printer):
    vp, ser = printer
    assert command(ser, "M21") == ["echo:SD card ok", "ok"]
    assert command(ser, "M20") == ["Begin file list", "End file list", "ok"]
    command(ser, "M110 N0")
    ser.write(numbered(1, "M28 cube.gco"))
    assert read_until(ser, "ok") == ["Writing to file: cube.gco", "ok"]
    body = ["G28", "G1 X10 Y10 Z0.3 F3000", "G1 X20 E1", "M104 S0"]
    for n, line in enumerate(body, start=2):
        ser.write(numbered(n, line))
        read_until(ser, "ok")
    ser.write(numbered(len(body) + 2, "M29"))
    assert read_until(ser, "ok") == ["Done saving file.", "ok"]
    stored = vp.sd_dir / "cube.gco"
    assert stored.read_text().splitlines() == body
    size = stored.stat().st_size
    assert command(ser, "M20") == ["Begin file list", f"cube.gco {size}", "End file list", "ok"]
    assert command(ser, "M23 CUBE.GCO") == [f"File opened: cube.gco Size: {size}", "File selected", "ok"]
    send(ser, "M24")
    read_until(ser, "Done printing file")
    assert vp.stats["sd_commands_executed"] == len(body)
    assert vp.position["x"] == pytest.approx(20.0)
    assert command(ser, "M27") == ["Not SD printing", "ok"]
    assert command(ser, "M23 missing.gco") == ["open failed, File: missing.gco.", "ok"]
    assert command(ser, "M30 cube.gco") == ["File deleted:cube.gco", "ok"]
    assert not stored.exists()
    assert command(ser, "M30 cube.gco") == ["Deletion failed, File: cube.gco.", "ok"]
    assert command(ser, "M23 ../escape.gco") == ["open failed, File: ../escape.gco.", "ok"]


def test_sd_print_status_pause_and_resume(tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "job.gco").write_text("G4 S5\nG4 S20\nG1 X10\nG1 X20\n")
    with make_printer(tmp_path, speed=10) as vp:
        ser = open_port(vp)
        command(ser, "M23 job.gco")
        command(ser, "M24")
        # Commands from the host go before the card's next line: M27 runs once the 0.5 s dwell is over.
        assert command(ser, "M27") == ["SD printing byte 6/27", "ok"]
        command(ser, "M25")  # lands before or after the 2 s dwell started, depending on the thread race
        assert not vp.sd_printing
        paused_at = command(ser, "M27")
        assert paused_at[0] in ("SD printing byte 6/27", "SD printing byte 13/27")
        assert command(ser, "M27") == paused_at  # no progress while paused
        command(ser, "M27 S0.05")
        send(ser, "M24")
        lines = read_until(ser, "Done printing file")
        assert vp.position["x"] == pytest.approx(20.0)
        assert all(line in ("ok", "Done printing file") or line.startswith("SD printing byte") for line in lines)
        ser.close()


def test_m22_releases_the_card(printer):
    vp, ser = printer
    command(ser, "M22")
    assert command(ser, "M20") == ["echo:No media", "ok"]
    command(ser, "M21")
    assert command(ser, "M20")[0] == "Begin file list"


# ---------------------------------------------------------------------------------------------------- faults

def test_drop_line_fault_loses_a_line_and_the_gap_is_noticed(printer):
    vp, ser = printer
    command(ser, "M110 N0")
    vp.inject("drop_line")
    ser.write(numbered(1, "G1 X1"))
    ser.write(numbered(2, "G1 X2"))
    assert read_until(ser, "ok") == ["Error:Line Number is not Last Line Number+1, Last Line: 0", "Resend: 1",
                                     "ok"]
    assert vp.stats["lines_dropped"] == 1 and "G1 X1" not in vp.received


def test_drop_line_at_a_line_number_from_the_constructor(tmp_path):
    with make_printer(tmp_path, faults=["drop_line@N2"]) as vp:
        ser = open_port(vp)
        command(ser, "M110 N0")
        ser.write(numbered(1, "G1 X1"))
        read_until(ser, "ok")
        ser.write(numbered(2, "G1 X2"))
        ser.write(numbered(3, "G1 X3"))
        assert read_until(ser, "Resend: 2")[0].endswith("Last Line: 1")
        ser.close()


def test_corrupt_checksum_fault_forces_a_resend(printer):
    vp, ser = printer
    command(ser, "M105")  # an unnumbered line is not affected
    vp.inject("corrupt_checksum")
    ser.write(numbered(1, "G1 X5"))
    assert read_until(ser, "ok") == ["Error:checksum mismatch, Last Line: 0", "Resend: 1", "ok"]
    ser.write(numbered(1, "G1 X5"))
    read_until(ser, "ok")
    assert vp.received == ["M105", "G1 X5"] and vp.stats["checksums_corrupted"] == 1


def test_silent_fault_until_recover(printer):
    vp, ser = printer
    vp.inject("silent")
    assert vp.silent
    send(ser, "M105")
    ser.timeout = 0.5
    assert ser.readline() == b""
    vp.recover()
    ser.timeout = 0.2
    assert read_until(ser, lambda line: line.startswith("ok T:"))


def test_silent_fault_for_some_seconds_triggered_by_a_line(printer):
    vp, ser = printer
    vp.inject("silent", at=2, seconds=0.3)  # on the 2nd line received since start()
    send(ser, "M105")
    read_until(ser, lambda line: line.startswith("ok T:"))
    send(ser, "M114")  # this is received line 2: the printer goes quiet, then answers it
    assert read_until(ser, "ok", timeout=5)[0].startswith("X:")
    assert not vp.silent


def test_disconnect_fault_closes_the_port(printer):
    vp, ser = printer
    port = vp.port
    vp.inject("disconnect")
    with pytest.raises(serial.SerialException):
        for _ in range(10):
            ser.write(b"M105\n")
            ser.read(1)
    assert not os.path.exists(port)
    assert vp.stats["disconnects"] == 1


def test_disconnect_at_a_line_then_a_new_port(tmp_path):
    ports = []
    with make_printer(tmp_path, on_port=ports.append, link=tmp_path / "printer") as vp:
        ser = open_port(vp)
        vp.inject("disconnect", at="N3", reopen_after=0)
        command(ser, "M110 N0")
        for n in (1, 2):
            ser.write(numbered(n, "M105"))
            read_until(ser, lambda line: line.startswith("ok"))
        ser.write(numbered(3, "M105"))
        with pytest.raises(serial.SerialException):
            for _ in range(50):
                ser.read(1)
        ser.close()
        deadline = time.monotonic() + 5
        while len(ports) < 2 and time.monotonic() < deadline:
            vp.wait_received("never", timeout=0.02)
        assert len(ports) == 2
        assert os.readlink(tmp_path / "printer") == ports[1]
        ser = serial.Serial(str(tmp_path / "printer"), 115200, timeout=0.2)
        assert read_until(ser, "echo:SD card ok")[0] == "start"
        ser.close()
    assert not (tmp_path / "printer").exists()


def test_garbage_fault_sends_undecodable_and_huge_lines(printer):
    vp, ser = printer
    vp.inject("garbage")  # random bytes, invalid UTF-8, a 10 KB line
    ser.timeout = 1
    raw_lines = [ser.readline() for _ in range(3)]
    assert all(line.endswith(b"\n") for line in raw_lines)
    assert any(len(line) == 10241 for line in raw_lines)
    assert any(len(line) == 65 for line in raw_lines)
    undecodable = 0
    for line in raw_lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable >= 1
    assert vp.stats["garbage_lines"] == 3
    assert command(ser, "M105")[-1].startswith("ok T:")  # and the printer carries on


def test_firmware_error_fault_halts(printer):
    vp, ser = printer
    vp.inject("firmware_error", message="Thermal Runaway, system stopped! Heater_ID: bed")
    assert read_until(ser, "Error:Printer halted. kill() called!") == [
        "Error:Thermal Runaway, system stopped! Heater_ID: bed", "Error:Printer halted. kill() called!"]
    assert vp.halted


def test_host_garbage_and_overlong_lines_do_not_hurt(printer):
    vp, ser = printer
    ser.write(b"\xff\xfe\x80 M105\n" + b"G1 X1 " * 400 + b"\n")
    assert read_until(ser, "ok")[0].startswith('echo:Unknown command: "')
    assert vp.stats["overlong_lines"] == 1
    assert command(ser, "M105")[-1].startswith("ok T:")


def test_fault_specs_parse_and_bad_ones_say_why():
    assert parse_fault("drop_line@100") == Fault("drop_line", at=100)
    assert parse_fault("silent@N20:seconds=3").params["seconds"] == 3
    assert parse_fault("garbage:kind=utf8").params["kind"] == "utf8"
    assert parse_fault("disconnect:reopen_after=0.5").params["reopen_after"] == 0.5
    message = parse_fault("firmware_error:message=MINTEMP triggered, system stopped! Heater_ID: 0").params["message"]
    assert message == "MINTEMP triggered, system stopped! Heater_ID: 0"
    for bad, why in [("explode", "unknown fault"), ("drop_line@x", "bad fault trigger"),
                     ("silent:minutes=3", "takes seconds"), ("garbage:kind=loud", "garbage kind"),
                     ("drop_line:count=0", "count"), ("silent:seconds", "key=value"), ("drop_line@", "nothing after")]:
        with pytest.raises(ValueError, match=why):
            parse_fault(bad)


def test_bad_constructor_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown firmware"):
        VirtualPrinter(firmware="sailfish")
    with pytest.raises(ValueError, match="speed"):
        VirtualPrinter(speed=-1)
    with pytest.raises(ValueError, match="tools"):
        VirtualPrinter(tools=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a symlink"):
        VirtualPrinter(link=tmp_path / "file")
    with pytest.raises(ValueError, match="not a directory"):
        VirtualPrinter(sd_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="temp_report_interval"):
        VirtualPrinter(temp_report_interval=0)


def test_gcode_words_parse():
    cmd = parse_command("G1X10.5 Y-2 E.3 F1200 Qx")
    assert cmd.word == "G1" and cmd.params == {"X": 10.5, "Y": -2.0, "E": 0.3, "F": 1200.0}
    assert cmd.bad_params == ["Qx"]
    assert parse_command("G28 X Y").params == {"X": None, "Y": None}
    assert parse_command("G1X1E5").params == {"X": 1.0, "E": 5.0}
    assert parse_command("M862.3 P \"MK3S\"").word == "M862.3"
    assert parse_command("M117 Hello: X1").text == "Hello: X1"


# ---------------------------------------------------------------------------------------------------- firmwares

def test_smoothie_resend_and_crlf(tmp_path):
    with make_printer(tmp_path, firmware="smoothie") as vp:
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        assert ser.readline() == b"Smoothie\r\n"
        assert ser.readline() == b"ok\r\n"
        ser.write(numbered(1, "G28"))
        read_until(ser, "ok")
        ser.write(b"N2 G28*0\n")
        assert read_until(ser, "rs N2") == ["rs N2"]
        ser.close()


def test_repetier_acknowledges_with_line_numbers_and_skips_duplicates(tmp_path):
    with make_printer(tmp_path, firmware="repetier") as vp:
        ser = open_port(vp)
        ser.write(numbered(1, "G28"))
        assert read_until(ser, "ok 1") == ["ok 1"]
        ser.write(numbered(3, "G28"))
        assert read_until(ser, "ok") == ["Error:expected line 2 got 3", "Resend:2", "ok"]
        ser.write(numbered(1, "G28"))
        assert read_until(ser, "ok") == ["skip 1", "ok"]
        ser.close()


def test_klipper_ignores_checksums_and_rrf_drops_bad_lines(tmp_path):
    with make_printer(tmp_path, firmware="klipper") as vp:
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        ser.write(b"N9 G1 X7*0\n")
        read_until(ser, "ok")
        assert vp.received == ["G1 X7"]
        assert command(ser, "M115") == ["ok FIRMWARE_NAME:Klipper FIRMWARE_VERSION:v0.12.0-296-g4ba1a3d4"]
        ser.close()
    with make_printer(tmp_path, firmware="rrf") as vp:
        ser = serial.Serial(vp.port, 115200, timeout=0.2)
        ser.write(b"N1 G1 X7*0\n")
        ser.write(numbered(2, "G1 X8"))
        read_until(ser, "ok")
        assert vp.received == ["G1 X8"] and vp.stats["bad_checksum_lines_dropped"] == 1
        ser.close()


def test_crlf_option_and_m118_host_actions(tmp_path):
    with make_printer(tmp_path, crlf=True) as vp:
        ser = open_port(vp)
        send(ser, "M118 A1 action:cancel")
        assert ser.readline() == b"//action:cancel\r\n"
        assert ser.readline() == b"ok\r\n"
        assert command(ser, "M118 E1 hello") == ["echo:hello", "ok"]
        vp.send_action("pause")
        assert read_until(ser, "//action:pause")
        ser.close()


# ---------------------------------------------------------------------------------------------------- command line

@contextlib.contextmanager
def running_cli(zevents_cmd, *args):
    """`zevents virtual-printer ARGS` as a subprocess; yields (process, the device path it printed)."""
    proc = subprocess.Popen([*zevents_cmd, "virtual-printer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = proc.stdout.readline().strip()
        assert port.startswith("/dev/pts/"), (port, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_cli_prints_its_port_answers_and_exits_on_sigterm(tmp_path, zevents_cmd):
    link = tmp_path / "printer"
    with running_cli(zevents_cmd, "--speed", "0", "--link", str(link), "--sd-dir", str(tmp_path / "sd"),
                     "--firmware", "marlin", "--tools", "2") as (proc, port):
        assert os.readlink(link) == port
        ser = serial.Serial(str(link), 115200, timeout=0.2)
        read_until(ser, "echo:SD card ok")
        reply = command(ser, "M115")
        assert reply[0].startswith("FIRMWARE_NAME:Marlin") and "EXTRUDER_COUNT:2" in reply[0]
        ser.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not link.exists()


def test_cli_faults_from_the_command_line(zevents_cmd):
    with running_cli(zevents_cmd, "--speed", "0", "--fault", "drop_line@2",
                     "--fault", "garbage@3:kind=long,size=50") as (proc, port):
        ser = serial.Serial(port, 115200, timeout=0.2)
        read_until(ser, "echo:SD card ok")
        command(ser, "M105")           # line 1
        send(ser, "M114")              # line 2: dropped, never answered
        send(ser, "M115")              # line 3: garbage first, then its reply
        lines = read_until(ser, "ok")
        assert lines[0] == ("garbage-0123456789-" * 3)[:50]
        assert lines[1].startswith("FIRMWARE_NAME:")
        ser.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_cli_bad_options_exit_with_a_reason(tmp_path, zevents_cmd):
    for args, code, why in [(["--firmware", "sailfish"], 2, "unknown firmware"),
                            (["--fault", "explode"], 2, "unknown fault"),
                            (["--link", str(tmp_path / "missing" / "printer")], 1, "cannot make the link")]:
        result = subprocess.run([*zevents_cmd, "virtual-printer", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == code and why in result.stderr, result.stderr
        assert result.stdout == ""


def test_a_bed_clamps_moves_as_software_endstops_do(tmp_path):
    box = {"x_min": 0.0, "x_max": 200.0, "y_min": 0.0, "y_max": 180.0, "z_min": 0.0, "z_max": 150.0}
    with make_printer(tmp_path, bed=box) as vp:
        ser = open_port(vp)
        command(ser, "G28")
        command(ser, "G1 X500 Y-20 Z300 F6000")
        position = " ".join(command(ser, "M114"))
        ser.close()
    assert "X:200.00 Y:0.00 Z:150.00" in position, position


def test_without_a_bed_moves_are_not_clamped(tmp_path):
    with make_printer(tmp_path) as vp:
        ser = open_port(vp)
        command(ser, "G1 X500 F6000")
        position = " ".join(command(ser, "M114"))
        ser.close()
    assert "X:500.00" in position, position
