"""classify_reply on every firmware format, and M114 parity with OctoPrint's own parser.

The firmware lines are pinned here (copied from ../shared/spec/firmware-responses.txt) so that the tests run on a
fresh clone; when ../shared is there, every line of the file must also classify as something known.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from zevents.parser import REPLY_KINDS, PyParser, Reply, classify_reply

SHARED = Path(os.environ.get("ZEVENTS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIRMWARE_FILE = SHARED / "spec" / "firmware-responses.txt"

# OctoPrint's M114 parser, as it is (src/octoprint/util/comm.py): the oracle for position parity
_OCTO_FLOAT = r"[-+]?[0-9]*\.?[0-9]+"
_OCTO_POSITION = re.compile(
    r"X:\s*(?P<x>{float})\s*Y:\s*(?P<y>{float})\s*Z:\s*(?P<z>{float})\s*((E:\s*(?P<e>{float}))|"
    r"(?P<es>(E\d+:{float}\s*)+))".format(float=_OCTO_FLOAT))
_OCTO_E_POSITIONS = re.compile(r"E(?P<id>\d+):(?P<value>{float})".format(float=_OCTO_FLOAT))


def octoprint_position(line: str) -> dict | None:
    match = _OCTO_POSITION.search(line)
    if match is None:
        return None
    result = {"x": float(match.group("x")), "y": float(match.group("y")), "z": float(match.group("z"))}
    if match.group("e") is not None:
        result["e"] = float(match.group("e"))
    else:
        for item in _OCTO_E_POSITIONS.finditer(match.group("es")):
            result["e" + item.group("id")] = float(item.group("value"))
    return result


# (line, kind, fields the reply must have)
CASES = [
    # Marlin
    ("X:0.00 Y:127.00 Z:145.00 E:0.00 Count X: 0 Y:10160 Z:116000", "position",
     {"position": {"x": 0.0, "y": 127.0, "z": 145.0, "e": 0.0}, "ok": False}),
    ("X:10.00 Y:20.00 Z:0.20 E:0.00 Count X:800 Y:1600 Z:80", "position",
     {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("X:150.0 Y:150.0 Z:  0.7 E:  0.0", "position", {"position": {"x": 150.0, "y": 150.0, "z": 0.7, "e": 0.0}}),
    ("X:10.00 Y:20.00 Z:0.20 E:0.00 Count A:2400 B:-800 Z:80", "position",
     {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("ok X:62.417 Y:64.781 Z:0.2 E:2.72328 Count: A:6241 B:6478 C:20", "position",
     {"ok": True, "position": {"x": 62.417, "y": 64.781, "z": 0.2, "e": 2.72328}, "temperatures": {}}),
    ("Bed X: 110.00 Y: 110.00 Z: 0.08", "probe", {"probe": {"x": 110.0, "y": 110.0, "z": 0.08}, "position": None}),
    ("ok", "ok", {"ok": True, "line_number": None}),
    ("ok N1042 P15 B3", "ok", {"ok": True, "line_number": 1042, "advanced": {"planner": 15, "buffer": 3}}),
    ("ok T:210.00 /210.00 B:60.00 /60.00 @:127 B@:0", "temperature",
     {"ok": True, "temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0)}}),
    (" T:185.73 /210.00 B:60.00 /60.00 @:127 B@:0 W:?", "temperature",
     {"ok": False, "temperatures": {"T0": (185.73, 210.0), "B": (60.0, 60.0)}}),
    ("ok T:23.0/220.0 T0:23.0/220.0 T1:50.2/210.0 T2:39.4/220.0 B:60.0", "temperature",
     {"temperatures": {"T0": (23.0, 220.0), "T1": (50.2, 210.0), "T2": (39.4, 220.0), "B": (60.0, None)}}),
    (" T:209.81 /210.00 B:60.00 /60.00 @:64 B@:0 W:9", "temperature",
     {"temperatures": {"T0": (209.81, 210.0), "B": (60.0, 60.0)}}),
    ("T:210.04 /210.00 B:52.00 /52.00 @:85 B@:31", "temperature",
     {"temperatures": {"T0": (210.04, 210.0), "B": (52.0, 52.0)}}),
    ("wait", "wait", {}),
    ("echo:busy: paused for input", "busy", {"message": "paused for input"}),
    ("echo:busy: processing", "busy", {"message": "processing"}),
    ("echo:busy: paused for user", "busy", {"message": "paused for user"}),
    ("Error:Line Number is not Last Line Number+1, Last Line: 1041", "error", {"error_kind": "resend"}),
    ("Error:checksum mismatch, Last Line: 1041", "error", {"error_kind": "resend"}),
    ("Error:No Checksum with line number, Last Line: 1041", "error", {"error_kind": "resend"}),
    ("Resend: 1042", "resend", {"resend_line": 1042}),
    ("Error:Printer halted. kill() called!", "error", {"error_kind": "fatal"}),
    ("Error:MINTEMP triggered, system stopped! Heater_ID: 0", "error", {"error_kind": "fatal"}),
    ("Error:Thermal Runaway, system stopped! Heater_ID: bed", "error", {"error_kind": "fatal"}),
    ('echo:Unknown command: "M9999"', "error", {"error_kind": "command", "message": 'Unknown command: "M9999"'}),
    ("start", "start", {}),
    ("FIRMWARE_NAME:Marlin 2.1.3 (Aug  1 2024 12:00:00) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin "
     "PROTOCOL_VERSION:1.0 MACHINE_TYPE:3D Printer KINEMATICS:Cartesian EXTRUDER_COUNT:1 "
     "UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff", "firmware",
     {"firmware": {"FIRMWARE_NAME": "Marlin 2.1.3 (Aug  1 2024 12:00:00)",
                   "SOURCE_CODE_URL": "github.com/MarlinFirmware/Marlin", "PROTOCOL_VERSION": "1.0",
                   "MACHINE_TYPE": "3D Printer", "KINEMATICS": "Cartesian", "EXTRUDER_COUNT": "1",
                   "UUID": "cede2a2f-41a2-4748-9b12-c55c62f367ff"}}),
    ("FIRMWARE_NAME:Marlin 2.0.7.2 (Nov 27 2020 14:30:11) SOURCE_CODE_URL:https://github.com/MarlinFirmware/Marlin "
     "PROTOCOL_VERSION:1.0 MACHINE_TYPE:Ender 5 Pro EXTRUDER_COUNT:1 UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff",
     "firmware", {"firmware": {"FIRMWARE_NAME": "Marlin 2.0.7.2 (Nov 27 2020 14:30:11)",
                               "SOURCE_CODE_URL": "https://github.com/MarlinFirmware/Marlin",
                               "PROTOCOL_VERSION": "1.0", "MACHINE_TYPE": "Ender 5 Pro", "EXTRUDER_COUNT": "1",
                               "UUID": "cede2a2f-41a2-4748-9b12-c55c62f367ff"}}),
    ("Cap:AUTOREPORT_TEMP:1", "capability", {"capability": ("AUTOREPORT_TEMP", True)}),
    ("Cap:AUTOREPORT_POS:0", "capability", {"capability": ("AUTOREPORT_POS", False)}),
    ("Cap:EMERGENCY_PARSER:1", "capability", {"capability": ("EMERGENCY_PARSER", True)}),
    ("Cap:PROMPT_SUPPORT:0", "capability", {"capability": ("PROMPT_SUPPORT", False)}),
    ("Cap:AUTOREPORT_POSITION:1", "capability", {"capability": ("AUTOREPORT_POSITION", True)}),
    ("area:{full:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}},work:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}}}",
     "firmware", {"firmware": {"area": "{full:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}},"
                                       "work:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}}}"}}),
    ("Cap:SERIAL_XON_XOFF:0", "capability", {"capability": ("SERIAL_XON_XOFF", False)}),
    ("area:{full:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}}}", "firmware",
     {"firmware": {"area": "{full:{min:{x:0,y:0,z:0},max:{x:200,y:200,z:200}}}"}}),
    # Prusa
    ("X:10.00 Y:20.00 Z:0.20 E:0.00 Count X: 10.00 Y:20.00 Z:0.20 E:0.00", "position",
     {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("ok T:210.0 /210.0 B:60.0 /60.0 T0:210.0 /210.0 @:64 B@:0 P:35.1 A:28.5", "temperature",
     {"ok": True, "temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0)}}),
    ("FIRMWARE_NAME:Prusa-Firmware 3.8.1 based on Marlin FIRMWARE_URL:https://github.com/prusa3d/Prusa-Firmware "
     "PROTOCOL_VERSION:1.0 MACHINE_TYPE:Prusa i3 MK3S EXTRUDER_COUNT:1 UUID:00000000-0000-0000-0000-000000000000",
     "firmware", {"firmware": {"FIRMWARE_NAME": "Prusa-Firmware 3.8.1 based on Marlin",
                               "FIRMWARE_URL": "https://github.com/prusa3d/Prusa-Firmware", "PROTOCOL_VERSION": "1.0",
                               "MACHINE_TYPE": "Prusa i3 MK3S", "EXTRUDER_COUNT": "1",
                               "UUID": "00000000-0000-0000-0000-000000000000"}}),
    # Klipper
    ("X:10.000 Y:20.000 Z:0.200 E:0.000", "position", {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("ok B:60.0 /60.0 T0:210.0 /210.0", "temperature",
     {"ok": True, "temperatures": {"B": (60.0, 60.0), "T0": (210.0, 210.0)}}),
    ("B:60.0 /60.0 T0:185.3 /210.0", "temperature", {"ok": False, "temperatures": {"B": (60.0, 60.0),
                                                                                  "T0": (185.3, 210.0)}}),
    ("ok T:0", "temperature", {"ok": True, "temperatures": {"T0": (0.0, None)}}),
    ("ok FIRMWARE_NAME:Klipper FIRMWARE_VERSION:v0.12.0-296-g4ba1a3d4", "firmware",
     {"ok": True, "firmware": {"FIRMWARE_NAME": "Klipper", "FIRMWARE_VERSION": "v0.12.0-296-g4ba1a3d4"}}),
    ("!! Must home axis first: 10.000 20.000 0.200 [0.000]", "error", {"error_kind": "command"}),
    ("!! Move out of range: 260.000 20.000 0.200 [0.000]", "error", {"error_kind": "command"}),
    ('// Unknown command:"M9999"', "error", {"error_kind": "command"}),
    ("// Klipper state: Ready", "echo", {"message": "Klipper state: Ready"}),
    ("!! MCU 'mcu' shutdown: Timer too close", "error", {"error_kind": "fatal"}),
    ("ok Printer is not ready", "ok", {"ok": True, "message": "Printer is not ready"}),
    # RepRapFirmware
    ("X:10.000 Y:20.000 Z:0.200 E:0.000 E0:0.0 Count 800 1600 80 Machine 10.000 20.000 0.200 Bed comp 0.000",
     "position", {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0, "e0": 0.0}}),
    ("ok T:210.0 /210.0 T0:210.0 /210.0 B:60.0 /60.0", "temperature",
     {"temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0)}}),
    ("X:96.99 Y:88.31 Z:0.30 E0:0.0 E1:0.0 E2:0.0 E3:0.0 E4:0.0 E5:0.0", "position",
     {"position": {"x": 96.99, "y": 88.31, "z": 0.3, "e": None, "e0": 0.0, "e1": 0.0, "e2": 0.0, "e3": 0.0,
                   "e4": 0.0, "e5": 0.0}}),
    ("FIRMWARE_NAME: RepRapFirmware for Duet 3 MB6HC FIRMWARE_VERSION: 3.5.0 ELECTRONICS: Duet 3 MB6HC v1.01 "
     "FIRMWARE_DATE: 2024-04-19 14:41:25", "firmware",
     {"firmware": {"FIRMWARE_NAME": "RepRapFirmware for Duet 3 MB6HC", "FIRMWARE_VERSION": "3.5.0",
                   "ELECTRONICS": "Duet 3 MB6HC v1.01", "FIRMWARE_DATE": "2024-04-19 14:41:25"}}),
    ("Error: G1: insufficient axes homed", "error", {"error_kind": "command", "message": "G1: insufficient axes homed"}),
    # Smoothieware
    ("ok C: X:10.0000 Y:20.0000 Z:0.2000 E:0.0000 ", "position",
     {"ok": True, "position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("ok WCS: X:10.0000 Y:20.0000 Z:0.2000 E:0.0000 ", "position", {"ok": True}),
    ("ok T:210.0 /210.0 @57 B:60.0 /60.0 @23 ", "temperature",
     {"ok": True, "temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0)}}),
    ("ok T:210.0 /210.0 @57 B:60.0 /60.0 @23 C:45.0 /50.0 @0", "temperature",
     {"temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0), "C": (45.0, 50.0)}}),
    ("rs N1042", "resend", {"resend_line": 1042}),
    ("!!", "error", {"error_kind": "fatal"}),
    ("error:Alarm lock", "error", {"error_kind": "fatal"}),
    ("Smoothie", "start", {}),
    ("FIRMWARE_NAME:Smoothieware, FIRMWARE_URL:http%3A//smoothieware.org, "
     "X-SOURCE_CODE_URL:https://github.com/Smoothieware/Smoothieware, FIRMWARE_VERSION:edge-bb41e99, "
     "PROTOCOL_VERSION:1.0, X-FIRMWARE_BUILD_DATE:Jul 31 2023 15:25:57, X-SYSTEM_CLOCK:100MHz, X-AXES:5, "
     "X-GRBL_MODE:0, X-ARCS:1, X-CNC:0, X-MSD:1", "firmware",
     {"firmware": {"FIRMWARE_NAME": "Smoothieware", "FIRMWARE_URL": "http%3A//smoothieware.org",
                   "X-SOURCE_CODE_URL": "https://github.com/Smoothieware/Smoothieware",
                   "FIRMWARE_VERSION": "edge-bb41e99", "PROTOCOL_VERSION": "1.0",
                   "X-FIRMWARE_BUILD_DATE": "Jul 31 2023 15:25:57", "X-SYSTEM_CLOCK": "100MHz", "X-AXES": "5",
                   "X-GRBL_MODE": "0", "X-ARCS": "1", "X-CNC": "0", "X-MSD": "1"}}),
    # Repetier
    ("X:10.00 Y:20.00 Z:0.200 E:0.0000", "position", {"position": {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}}),
    ("ok 1042", "ok", {"ok": True, "line_number": 1042}),
    ("T:210.00 /210 B:60.00 /60 B@:23 @:57", "temperature",
     {"temperatures": {"T0": (210.0, 210.0), "B": (60.0, 60.0)}}),
    ("Resend:1042", "resend", {"resend_line": 1042}),
    ("skip 1042", "skip", {"line_number": 1042}),
    ("Error:expected line 1042 got 1044", "error", {"error_kind": "resend"}),
    ("busy:processing", "busy", {"message": "processing"}),
    ("busy:heating", "busy", {"message": "heating"}),
    ("busy:paused for user interaction", "busy", {"message": "paused for user interaction"}),
    ("FIRMWARE_NAME:Repetier_1.0.4 COMPILED:Aug  3 2022 FIRMWARE_URL:https://github.com/repetier/Repetier-Firmware/ "
     "PROTOCOL_VERSION:1.0 MACHINE_TYPE:Mendel EXTRUDER_COUNT:1 REPETIER_PROTOCOL:3", "firmware",
     {"firmware": {"FIRMWARE_NAME": "Repetier_1.0.4", "COMPILED": "Aug  3 2022",
                   "FIRMWARE_URL": "https://github.com/repetier/Repetier-Firmware/", "PROTOCOL_VERSION": "1.0",
                   "MACHINE_TYPE": "Mendel", "EXTRUDER_COUNT": "1", "REPETIER_PROTOCOL": "3"}}),
    # Teacup and OctoPrint's other resend forms
    ("rs N23 expected checksum 109", "resend", {"resend_line": 23}),
    ("Resend: N:23", "resend", {"resend_line": 23}),
    ("rs 23", "resend", {"resend_line": 23}),
    # the rest of what a link meets
    ("echo:T1 Invalid extruder", "invalid_tool", {"tool": 1}),
    ("Invalid extruder", "invalid_tool", {"tool": None}),
    ("//action:pause", "action", {"action": "pause", "action_params": ""}),
    ("// action:prompt_begin Filament runout", "action", {"action": "prompt_begin",
                                                          "action_params": "Filament runout"}),
    ("//action:cancel", "action", {"action": "cancel"}),
    ("SD printing byte 100/200", "sd", {"sd": {"printed": 100, "total": 200}}),
    ("Not SD printing", "sd", {"sd": {"printing": False}}),
    ("Done printing file", "sd", {"sd": {"done": True}}),
    ("Begin file list", "sd", {"sd": {"list": "begin"}}),
    ("CUBE~1.GCO 1234 cube.gcode", "sd", {"sd": {"file": "CUBE~1.GCO", "size": 1234, "long_name": "cube.gcode"}}),
    ("/SUB/PART.GCO 99", "sd", {"sd": {"file": "/SUB/PART.GCO", "size": 99, "long_name": None}}),
    ("End file list", "sd", {"sd": {"list": "end"}}),
    ("File opened: CUBE.GCO Size: 4321", "sd", {"sd": {"opened": "CUBE.GCO", "size": 4321}}),
    ("File selected", "sd", {"sd": {"selected": True}}),
    ("echo:SD card ok", "sd", {"sd": {"card": True}}),
    ("echo:  M92 X80.00 Y80.00 Z400.00 E93.00", "echo", {"message": "M92 X80.00 Y80.00 Z400.00 E93.00"}),
    ("something else entirely", "unknown", {"message": "something else entirely"}),
    ("", "unknown", {}),
]


@pytest.mark.parametrize("line,kind,fields", CASES, ids=[f"{i}:{case[0][:40]}" for i, case in enumerate(CASES)])
def test_classify_reply(line, kind, fields):
    reply = classify_reply(line)
    assert isinstance(reply, Reply)
    assert reply.kind == kind
    assert reply.kind in REPLY_KINDS
    for name, value in fields.items():
        assert getattr(reply, name) == value, name
    assert classify_reply(line.encode() + b"\r\n") == reply  # bytes with a terminator: the same reply


def test_ok_means_acknowledged_whatever_the_kind():
    acknowledged = [line for line, _, _ in CASES if line.startswith("ok")]
    assert len(acknowledged) >= 10
    for line in acknowledged:
        assert classify_reply(line).ok, line
    for line in ("wait", "echo:busy: processing", " T:185.73 /210.00 B:60.00 /60.00", "okay", "Resend: 1"):
        assert not classify_reply(line).ok, line


def test_replies_take_invalid_utf8():
    reply = classify_reply(b"echo:caf\xc3 \xff")
    assert reply.kind == "echo" and "\ufffd" in reply.message


@pytest.mark.parametrize("line,kind,fields", [case for case in CASES if case[1] == "position"])
def test_position_parity_with_octoprint(line, kind, fields):
    """Every line OctoPrint's parser accepts gives the same numbers, in the reply and in PositionUpdate."""
    expected = octoprint_position(line)
    position = classify_reply(line).position
    event = PyParser().received(line)[0].payload
    if expected is not None:
        for key, value in expected.items():
            assert position[key] == value and event[key] == value, key
    assert {key: value for key, value in event.items() if key not in ("t", "f")} == position


def firmware_file_lines() -> list:
    if not FIRMWARE_FILE.exists():
        return []
    return [line.rstrip("\n") for line in FIRMWARE_FILE.read_text(encoding="utf-8").splitlines(True)
            if line.strip() and not line.startswith("#")]


def test_every_line_of_the_shared_firmware_file():
    lines = firmware_file_lines()
    if not lines:
        pytest.skip(f"{FIRMWARE_FILE} is not here (../shared is only beside the developers' clone)")
    pinned = {line for line, _, _ in CASES}
    for line in lines:
        reply = classify_reply(line)
        assert reply.kind != "unknown", line
        assert line in pinned or line.strip() in {pin.strip() for pin in pinned}, f"not pinned here: {line!r}"
        expected = octoprint_position(line)
        if expected is not None:
            assert reply.kind == "position", line
            for key, value in expected.items():
                assert reply.position[key] == value, (line, key)
    near_miss = [line for line in lines if line.startswith("Bed X:")]
    assert near_miss and all(PyParser().received(line) == [] for line in near_miss)
