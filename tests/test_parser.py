"""The parser's behaviour on sent and received lines, run on both implementations (the ``Parser`` fixture)."""
from __future__ import annotations

import logging

import pytest

from zevents import events as catalogue
from zevents.parser import (C_LOAD_ERROR, CParser, FORCED_PURE, IMPLEMENTATION, BinaryGcodeError, Event,
                            ParserState, PyParser)
from zevents._parser import _rules




def names(events):
    return [event.name for event in events]


def feed_lines(parser, *lines):
    events = []
    for line in lines:
        events += parser.sent(line)
    return events


# ------------------------------------------------------------------------------------------------ the guard


def test_compiled_parser_loaded_unless_pure_python_is_forced():
    import zevents.parser

    if FORCED_PURE:
        assert IMPLEMENTATION == "py"
        assert zevents.parser.Parser is PyParser
    else:
        assert CParser is not None, f"the compiled parser did not load: {C_LOAD_ERROR}"
        assert IMPLEMENTATION == "c"
        assert zevents.parser.Parser is CParser


def test_every_parser_event_is_in_the_gcode_group_of_the_catalogue():
    for name in _rules.EVENT_NAMES:
        assert catalogue.lookup(name) is not None, name
        assert catalogue.group_of(name) == "gcode"


# ------------------------------------------------------------------------------------------- command events


@pytest.mark.parametrize("key,name", sorted(_rules.COMMAND_EVENTS.items()))
def test_each_command_fires_its_event_with_an_empty_payload(Parser, key, name):
    parser = Parser({"blocked_commands": []})
    events = parser.sent(f"{key[0]}{key[1]}")
    assert names(events) == [name]
    assert events[0].payload == {} and events[0].group == "gcode"


def test_m0_and_m1_are_blocked_by_default_and_must_not_be_sent(Parser):
    parser = Parser()
    events = parser.sent("M0 Click to continue ; pause")
    assert names(events) == ["CommandSuppressed"]
    assert events[0].payload == {"command": "M0 Click to continue", "severity": "warn",
                                 "message": "Not sending M0 to the printer, it is configured as a blocked command"}
    assert names(parser.sent("M1")) == ["CommandSuppressed"]
    assert names(parser.sent("M226")) == ["Waiting"]


def test_ignored_commands_are_suppressed_with_info_and_blocked_wins(Parser):
    parser = Parser({"ignored_commands": ["M300", "g29.1", "M0"], "blocked_commands": ["M0"]})
    alert = parser.sent("N5 M300 S440 P200*12")
    assert names(alert) == ["CommandSuppressed"]
    assert alert[0].payload["severity"] == "info"
    assert alert[0].payload["command"] == "M300 S440 P200"
    assert "ignored" in alert[0].payload["message"]
    assert parser.sent("G29.1")[0].payload["severity"] == "info"
    assert parser.sent("G29") == []
    assert parser.sent("M0")[0].payload["severity"] == "warn"


def test_a_suppressed_command_changes_no_state(Parser):
    parser = Parser({"blocked_commands": ["G1", "G28", "T1", "G91"]})
    parser.sent("G0 Z1")
    before = parser.state
    for line in ("G1 Z5", "G28", "T1", "G91"):
        events = parser.sent(line)
        assert names(events) == ["CommandSuppressed"], line
    assert parser.state == before
    assert names(parser.sent("G0 Z2")) == ["ZChange"]


@pytest.mark.parametrize("config,problem", [
    ({"blocked_commands": ["X12"]}, "not a G-code command name"),
    ({"blocked_commands": "M0"}, "must be a list"),
    ({"ignored_commands": [5]}, "not a G-code command name"),
    ({"blocked": ["M0"]}, "unknown parser config keys"),
    ({"ignored_commands": [f"M{number}" for number in range(300)]}, "at most 256 commands"),
    ("M0", "must be a mapping"),
])
def test_bad_config_is_a_clear_error(Parser, config, problem):
    with pytest.raises(ValueError, match=problem):
        Parser(config)


def test_the_whole_zevents_config_is_accepted(Parser):
    parser = Parser({"parser": {"blocked_commands": [], "ignored_commands": ["M300"]}, "bus": {}})
    assert names(parser.sent("M0")) == ["Waiting"]
    assert names(parser.sent("M300")) == ["CommandSuppressed"]


# --------------------------------------------------------------------------------------------- what is text


@pytest.mark.parametrize("line", [
    "M117 hello G28", "; G28", "(G28)", "( G28", "SET_VELOCITY_LIMIT ACCEL=500 G28", "G28_SAFE", "T0_PREHEAT",
    "G28.1", "G", "NG28", "N12", "M104 T1 S200", "M109 T1 S215", "EXCLUDE_OBJECT_START NAME=G28", "", "   ",
    "N12*34", "\x00\x00", "G99999999", "X10 G28",
])
def test_lines_that_are_not_events(Parser, line):
    parser = Parser()
    assert parser.sent(line) == []
    assert parser.state.tool == 0


@pytest.mark.parametrize("line", [
    "G28", "g28", "G028", "  \tG28", "\x00G28 ; home", "N123 G28*71", "n10 g28", "N7G28", "G28*5", "(home) G28",
    "(a)(b) G28 W", "G28 X0 Y0", "G28W",
])
def test_home_as_it_really_comes(Parser, line):
    assert names(Parser().sent(line)) == ["Home"]


# ------------------------------------------------------------------------------------------------ Z changes


def test_zchange_tracks_absolute_moves(Parser):
    parser = Parser()
    events = feed_lines(parser, "G1 Z0.2 F720", "G1 Z.2", "G0 Z0.4", "G1 X10 Y10", "G2 X1 Y1 Z1 I1 J1")
    assert [(e.name, e.payload) for e in events] == [
        ("ZChange", {"new": 0.2, "old": None}),
        ("ZChange", {"new": 0.4, "old": 0.2}),
        ("ZChange", {"new": 1.0, "old": 0.4}),
    ]


def test_g91_relative_moves_are_followed_unlike_octoprint(Parser):
    parser = Parser()
    assert feed_lines(parser, "G91", "G1 Z10") == []  # Z unknown: 10 mm up from where?
    assert parser.state.z is None and parser.state.relative
    events = feed_lines(parser, "G90", "G1 Z5", "G91", "G1 Z10", "G1 Z-2.5", "G90", "G1 Z1")
    assert [e.payload for e in events] == [{"new": 5.0, "old": None}, {"new": 15.0, "old": 5.0},
                                          {"new": 12.5, "old": 15.0}, {"new": 1.0, "old": 12.5}]


def test_g92_sets_positions_without_an_event(Parser):
    parser = Parser()
    parser.sent("G1 Z5")
    assert parser.sent("G92 Z0 E0") == []
    assert parser.state.z == 0.0
    assert names(parser.sent("G1 Z0")) == []
    assert parser.sent("G1 Z1")[0].payload == {"new": 1.0, "old": 0.0}


def test_g20_inches_are_converted_to_mm(Parser):
    parser = Parser()
    events = feed_lines(parser, "G20", "G1 Z1 F10", "G21", "G1 Z1")
    assert [e.payload["new"] for e in events] == [25.4, 1.0]
    assert parser.state.units == "mm"
    assert parser.state.feedrate == 254.0
    parser.sent("G20")
    assert parser.state.units == "in"


def test_g28_makes_homed_axes_unknown(Parser):
    parser = Parser()
    feed_lines(parser, "G1 X1 Y2 Z3")
    assert names(parser.sent("G28 X")) == ["Home"]
    assert (parser.state.x, parser.state.y, parser.state.z) == (None, 2.0, 3.0)
    parser.sent("G28")
    assert (parser.state.x, parser.state.y, parser.state.z) == (None, None, None)
    assert parser.sent("G1 Z3")[0].payload == {"new": 3.0, "old": None}


@pytest.mark.parametrize("line,z", [
    ("G1X10Z.4", 0.4), ("G1 Z+0.5", 0.5), ("g1 z-.25", -0.25), ("G1 Z5*71", 5.0), ("G1 Z5 ; Z6", 5.0),
    ("G1 (Z6) Z5", 5.0), ("G1 Z5 (unclosed Z6", 5.0), ("G1 Z1 Z2", 2.0), ("G1\tZ7", 7.0), ("G01 Z8", 8.0),
    ("G1 Z9.", 9.0), ("G1 Z0007.50", 7.5), ("G1 Z1.2.3", 1.2), ("G1 Z-0", -0.0),
])
def test_parameters_as_they_really_come(Parser, line, z):
    parser = Parser()
    parser.sent(line)
    assert parser.state.z == z


@pytest.mark.parametrize("line", ["G1 Z", "G1 Z1 Z", "G1 Z-", "G1 Z.", "G1 Z+.", "G1 *Z5", "G1 ;Z5", "G1.1 Z5"])
def test_parameters_without_a_value_change_nothing(Parser, line):
    parser = Parser()
    assert parser.sent(line) == []
    assert parser.state.z is None


def test_numbers_parse_exactly_like_python_float(Parser):
    parser = Parser()
    for text in ("0.1", "0.2", "0.30000000000000004", "123456789.123456789", "1" * 30, "0." + "0" * 30 + "1",
                 "9007199254740993", "-0.000001", "3.14159265358979323846264338327950288", "9" * 400):
        parser.sent(f"G1 Z{text}")
        assert parser.state.z == float(text) or (text == "9" * 400 and parser.state.z != float("inf")), text


# The sliced shape "G1 X.. Y.. E.." and its neighbours, fed as a buffer with room after them: the compiled parser
# reads such lines on fast paths (numbers of up to 7 characters in one word, the XYE shape as a whole) that need
# bytes of buffer ahead; these are the edges where a line must leave them or read the same.
SLICED_MOVES = [
    ("G1 X-0 Y.5 E5.", ("-0", ".5", "5.")),
    ("G1 X+1.5 Y-2 E.02455", ("+1.5", "-2", ".02455")),
    ("G1 X1234567 Y0.00001 E-.8", ("1234567", "0.00001", "-.8")),
    ("G1 X12345678 Y1234.567 E0000001", ("12345678", "1234.567", "0000001")),
    ("G1 X1.23456789012345678 Y99999999.5 E00000001.5", ("1.23456789012345678", "99999999.5", "00000001.5")),
    ("G1 X195.577 Y164.215 E100.06027", ("195.577", "164.215", "100.06027")),  # absolute E grows long
    ("G1 X1234567.7654321 Y.1234567 E-1234567.", ("1234567.7654321", ".1234567", "-1234567.")),
    ("G1 X1.12345678 Y.12345678 E12345678.5", ("1.12345678", ".12345678", "12345678.5")),
    ("G1 X87.905 Y77.568 E.02455;comment", ("87.905", "77.568", ".02455")),
    ("G1 X87.905 Y77.568 E.02455*34", ("87.905", "77.568", ".02455")),
    ("N12 G1 X87.905 Y77.568 E.02455*34", ("87.905", "77.568", ".02455")),
    ("g1 x1.5 y2.5 e3.5", ("1.5", "2.5", "3.5")),
    ("G1\tX1.5\tY2.5\tE3.5", ("1.5", "2.5", "3.5")),
    ("G1 X1.5 Y2.5 E3.5 ", ("1.5", "2.5", "3.5")),
    ("G1 X1.5  Y2.5 E3.5 F1200", ("1.5", "2.5", "3.5")),
    ("G1 X1.5 Y2.5 (note) E3.5", ("1.5", "2.5", "3.5")),
    ("G1 Y2.5 X1.5 E3.5", ("1.5", "2.5", "3.5")),
]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
@pytest.mark.parametrize("line,values", SLICED_MOVES)
def test_sliced_moves_read_exactly(Parser, line, values, terminator):
    parser = Parser()
    room = b"; room after the line: fast paths read ahead of a number" + b"." * 64 + terminator
    events = parser.feed_sent(b"G92 E0" + terminator + b"G1 X0 Y0 Z0.2 F600" + terminator + line.encode() + terminator
                              + room)
    state = parser.state
    assert (state.x, state.y, state.e) == tuple(float(text) for text in values)
    assert str(state.x) == str(float(values[0]))  # the sign of zero too
    expect_layer = float(values[2]) > 0 and (state.x, state.y) != (0.0, 0.0)
    assert [event.name for event in events] == ["ZChange"] + (["LayerChanged"] if expect_layer else [])


# ------------------------------------------------------------------------------------------------- layers


def test_layer_changed_only_on_extrusion_at_a_new_height(Parser):
    parser = Parser()
    events = feed_lines(
        parser,
        "M83", "G1 Z0.2 F720", "G1 X10 Y10 F1200",  # travel: no layer yet
        "G1 X20 Y10 E1",  # first extrusion: layer 1
        "G1 E-0.8", "G1 Z0.6", "G1 X30 Y30", "G1 Z0.2", "G1 E0.8",  # z-hop, travel, unretract: not a layer
        "G1 X40 Y30 E1",
        "G1 Z0.4", "G1 E-1", "G1 E1",  # retract and prime at the new height: still not a layer
        "G1 Z0.4 E1",  # extrusion without an XY move: not a layer
        "G1 X50 Y30 E1",  # layer 2
    )
    assert [(e.name, e.payload) for e in events] == [
        ("ZChange", {"new": 0.2, "old": None}),
        ("LayerChanged", {"layer": 1, "z": 0.2, "old_z": None}),
        ("ZChange", {"new": 0.6, "old": 0.2}),
        ("ZChange", {"new": 0.2, "old": 0.6}),
        ("ZChange", {"new": 0.4, "old": 0.2}),
        ("LayerChanged", {"layer": 2, "z": 0.4, "old_z": 0.2}),
    ]
    assert parser.state.layer == 2 and parser.state.layer_z == 0.4


def test_layer_tolerance_absorbs_relative_rounding(Parser):
    parser = Parser()
    feed_lines(parser, "G1 Z0.2", "G1 X1 Y1 E1")
    events = feed_lines(parser, "G91", "G1 Z0.1", "G1 Z0.1", "G1 Z-0.2", "G90", "G1 X2 E2")
    assert "LayerChanged" not in names(events)
    assert parser.state.layer == 1


def test_absolute_extrusion_counts_only_forward_e(Parser):
    parser = Parser()
    events = feed_lines(parser, "M82", "G92 E10", "G1 Z1", "G1 X5 Y5 E9", "G1 X6 Y6 E9", "G1 X7 Y7 E9.5")
    assert names(events) == ["ZChange", "LayerChanged"]
    assert events[1].line == 6
    assert parser.state.e == 9.5
    assert parser.state.filament == pytest.approx(-0.5)


# ------------------------------------------------------------------------------------------------- tools


def test_tool_changes_only_when_the_tool_changes(Parser):
    parser = Parser()
    events = feed_lines(parser, "T0", "T1", "T1", "M104 T2 S200", "t2", "T01", "T1.5", "T")
    assert [e.payload for e in events] == [{"old": 0, "new": 1}, {"old": 1, "new": 2}, {"old": 2, "new": 1}]
    assert parser.state.tool == 1


def test_invalid_tool_reported_then_selecting_it_is_suppressed(Parser):
    parser = Parser()
    assert parser.sent("T1")[0].payload == {"old": 0, "new": 1}
    events = parser.received("echo:T1 Invalid extruder")
    assert [(e.name, e.payload) for e in events] == [("InvalidToolReported", {"tool": 1, "fallback": 0})]
    assert parser.state.tool == 0 and parser.state.invalid_tools == (1,)
    suppressed = parser.sent("T1 ; again")
    assert names(suppressed) == ["CommandSuppressed"]
    assert suppressed[0].payload["severity"] == "warn"
    assert suppressed[0].payload["command"] == "T1"
    assert "invalid" in suppressed[0].payload["message"]
    assert parser.state.tool == 0
    assert parser.sent("T2")[0].payload == {"old": 0, "new": 2}


def test_bare_invalid_extruder_names_the_tool_just_selected(Parser):
    parser = Parser()
    feed_lines(parser, "T3", "T2")
    events = parser.received("Invalid extruder")
    assert events[0].payload == {"tool": 2, "fallback": 3}
    assert parser.received("echo:T7 invalid extruder ")[0].payload == {"tool": 7, "fallback": 3}
    assert parser.received("echo:T1 Invalid extruder number !") == []


# ------------------------------------------------------------------------------------------- state extras


def test_state_snapshot_after_a_start_sequence(Parser):
    parser = Parser()
    feed_lines(parser, "G21", "G90", "M83", "G28 W", "G1 Z0.2 F720", "G1 Y-3 F1000", "G92 E0",
               "G1 X60 E9 F1000", "T1")
    state = parser.state
    assert isinstance(state, ParserState)
    assert (state.x, state.y, state.z, state.e) == (60.0, -3.0, 0.2, 9.0)
    assert (state.tool, state.feedrate, state.relative, state.relative_e, state.units) == (1, 1000.0, False, True,
                                                                                           "mm")
    assert (state.layer, state.layer_z, state.filament) == (1, 0.2, 9.0)
    assert state.as_dict()["layer"] == 1


def test_filament_bounding_box_and_time_estimate(Parser):
    parser = Parser()
    feed_lines(parser, "G92 E0", "G1 X0 Y0 Z0.2 F600", "G1 X10 Y0 E1", "G1 X10 Y5 E1.5", "G1 E1", "G1 X50 Y50",
               "G4 P500", "G4 S2", "G4 S-1")
    state = parser.state
    assert state.filament == 1.0  # 1.5 extruded, 0.5 retracted
    assert state.extrusion_bbox == (0.0, 0.0, 0.2, 10.0, 5.0, 0.2)
    travel = ((40 ** 2 + 45 ** 2) ** 0.5)
    assert state.print_time == pytest.approx((10 + 5 + 0.5 + travel) / 10 + 0.5 + 2)


def test_extrusion_box_takes_the_start_of_each_extruding_run(Parser):
    parser = Parser()
    feed_lines(parser, "G1 X10 Y10 Z0.2 F1200", "G1 X11 Y10 E1",
               "G1 X-50 Y-50 E1",  # no extrusion (absolute E stays): a travel out of the box
               "G1 X1 Y1 E2",  # extrudes from (-50, -50): the start is in the box
               "G1 X2 Y2 E3", "G1 X-60 Y3 E2.5", "G1 Z0.6", "G1 X3 Y3 E3.5")  # a retract, a lift
    assert parser.state.extrusion_bbox == (-60.0, -50.0, 0.2, 11.0, 10.0, 0.6)


# ---------------------------------------------------------------------------------------------- positions


POSITIONS = [
    ("X:0.00 Y:127.00 Z:145.00 E:0.00 Count X: 0 Y:10160 Z:116000", {"x": 0.0, "y": 127.0, "z": 145.0, "e": 0.0}),
    ("ok X:62.417 Y:64.781 Z:0.2 E:2.72328 Count: A:6241 B:6478 C:20",
     {"x": 62.417, "y": 64.781, "z": 0.2, "e": 2.72328}),
    ("X:150.0 Y:150.0 Z:  0.7 E:  0.0", {"x": 150.0, "y": 150.0, "z": 0.7, "e": 0.0}),
    ("X:10.000 Y:20.000 Z:0.200 E:0.000 E0:0.0 Count 800 1600 80 Machine 10.000 20.000 0.200 Bed comp 0.000",
     {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0, "e0": 0.0}),
    ("X:96.99 Y:88.31 Z:0.30 E0:0.0 E1:1.5 E2:-2", {"x": 96.99, "y": 88.31, "z": 0.3, "e": None, "e0": 0.0,
                                                  "e1": 1.5, "e2": -2.0}),
    ("ok C: X:10.0000 Y:20.0000 Z:0.2000 E:0.0000 ", {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}),
    ("ok C: X:10.0000 Y:20.0000 Z:0.2000", {"x": 10.0, "y": 20.0, "z": 0.2, "e": None}),
    ("X:10.000 Y:20.000 Z:0.200", {"x": 10.0, "y": 20.0, "z": 0.2, "e": None}),
    ("X:10.00 Y:20.00 Z:0.200 E:0.0000", {"x": 10.0, "y": 20.0, "z": 0.2, "e": 0.0}),
    ("Bed X: 1 Y: 2 Z: 3 X:4 Y:5 Z:6 E:7", {"x": 4.0, "y": 5.0, "z": 6.0, "e": 7.0}),
]


@pytest.mark.parametrize("line,expected", POSITIONS)
def test_position_update_from_every_m114_format(Parser, line, expected):
    parser = Parser()
    feed_lines(parser, "T2", "G1 F1500")
    events = parser.received(line)
    assert names(events) == ["PositionUpdate"]
    assert events[0].payload == {**expected, "t": 2, "f": 1500.0}


@pytest.mark.parametrize("line", [
    "Bed X: 110.00 Y: 110.00 Z: 0.08", "!! Must home axis first: 10.000 20.000 0.200 [0.000]",
    "ok T:210.0 /210.0 B:60.0 /60.0", "X:1. Y:2 Z:3 E:4", "X:1 Y:2", "echo:X:1 Y:2 Z:3", "ok MCS: X:1 Y:2 Z:3",
])
def test_lines_that_are_not_positions(Parser, line):
    assert Parser().received(line) == []


def test_received_lines_do_not_move_the_tracked_state(Parser):
    parser = Parser()
    parser.sent("G1 Z1")
    parser.received("X:0 Y:0 Z:50 E:0")
    assert parser.state.z == 1.0


# ------------------------------------------------------------------------------------------------ streams


def test_offsets_and_line_numbers_over_lf_cr_and_crlf(Parser):
    data = b"G28\r\nG1 Z1\rG1 Z2\n\nM80\r\n"
    events = Parser().feed_sent(data)
    assert [(e.name, e.offset, e.line) for e in events] == [("Home", 0, 1), ("ZChange", 5, 2), ("ZChange", 11, 3),
                                                           ("PowerOn", 18, 5)]


@pytest.mark.parametrize("split", range(1, 21))
def test_every_split_point_gives_the_same_events(Parser, split):
    data = b"G28\r\nG1 Z1\rG1 Z2\n\nM80\r\n"
    whole = Parser().feed_sent(data)
    parser = Parser()
    assert parser.feed_sent(data[:split]) + parser.feed_sent(data[split:]) + parser.flush() == whole


def test_a_partial_line_waits_for_its_end_or_flush(Parser):
    parser = Parser()
    assert parser.feed_sent(b"G1 Z1\nG2") == [Event("ZChange", {"new": 1.0, "old": None}, 0, 1)]
    assert parser.feed_sent(b"8") == []
    events = parser.flush()
    assert [(e.name, e.offset, e.line) for e in events] == [("Home", 6, 2)]
    assert parser.flush() == []
    assert parser.sent_lines == 2 and parser.sent_bytes == 9


def test_cr_at_a_chunk_end_then_lf_is_one_terminator(Parser):
    parser = Parser()
    events = parser.feed_sent(b"G28\r") + parser.feed_sent(b"\nM80\n")
    assert [(e.name, e.line, e.offset) for e in events] == [("Home", 1, 0), ("PowerOn", 2, 5)]


def test_sent_is_feed_sent_with_a_newline(Parser):
    lines = [b"G28", b"G1 Z0.2", b"T1\n", b"M80\r\n", "G1 Z0.4 ; str", b"G1 Z0.6"]
    by_line = Parser()
    events = feed_lines(by_line, *lines)
    joined = b"".join((line.encode() if isinstance(line, str) else line) + (
        b"" if (line.endswith("\n") if isinstance(line, str) else line.endswith(b"\n")) else b"\n") for line in lines)
    assert events == Parser().feed_sent(joined)
    assert by_line.sent_bytes == len(joined)


def test_bytes_like_and_str_inputs(Parser):
    parser = Parser()
    assert names(parser.feed_sent(bytearray(b"G28\n"))) == ["Home"]
    assert names(parser.feed_sent(memoryview(b"M80\n"))) == ["PowerOn"]
    assert names(parser.feed_sent("M81\n")) == ["PowerOff"]
    assert names(parser.received(bytearray(b"X:1 Y:2 Z:3 E:4"))) == ["PositionUpdate"]
    with pytest.raises(TypeError, match="expected bytes or str"):
        parser.feed_sent(42)


def test_binary_gcode_is_refused_not_misparsed(Parser):
    parser = Parser()
    assert parser.feed_sent(b"GC") == []
    with pytest.raises(BinaryGcodeError, match="binary G-code") as caught:
        parser.feed_sent(b"DE\x01\x00G28\n")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(BinaryGcodeError):
        parser.feed_sent(b"G28\n")  # the stream stays refused
    with pytest.raises(BinaryGcodeError):
        Parser().sent(b"GCDE")
    assert names(parser.received(b"X:1 Y:2 Z:3 E:4")) == ["PositionUpdate"]  # the other stream is fine
    assert names(Parser().feed_sent(b"GCD\nG28\n")) == ["Home"]


def test_invalid_utf8_and_nul_bytes(Parser):
    parser = Parser()
    events = parser.feed_sent(b"G1 Z1 ;\xff\xfe caf\xc3\n\x00G28\n\xff\xfeM80\nM117 \xe9t\xe9\n")
    assert names(events) == ["ZChange", "Home"]
    suppressed = Parser({"blocked_commands": ["M117"]}).sent(b"M117 \xe9t\xe9")
    assert suppressed[0].payload["command"] == "M117 \ufffdt\ufffd"


def test_over_long_lines_are_parsed_on_their_head_and_logged(Parser, caplog):
    parser = Parser()
    long_comment = b"G1 Z5 ;" + b"x" * 100_000 + b"\n"
    hidden_z = b"G1 X1" + b" " * 70_000 + b"Z9\n"
    config_line = b"; compatible_printers_condition = " + b"printer_notes=~/.*PRINTER_VENDOR_PRUSA3D.*/ " * 60 + b"\n"
    assert len(config_line) > 2600
    with caplog.at_level(logging.WARNING, logger="zevents.parser"):
        events = []
        for chunk in (long_comment[:3], long_comment[3:70000], long_comment[70000:], hidden_z, config_line):
            events += parser.feed_sent(chunk)
        events += parser.sent("G1 Z6")
    assert [e.payload["new"] for e in events] == [5.0, 6.0]
    assert parser.state.x == 1.0
    assert parser.long_lines == 2
    assert "only its first 65536 bytes were parsed" in caplog.text
    assert [e.line for e in events] == [1, 4]


def test_event_objects(Parser):
    event = Parser().sent("G1 Z1")[0]
    assert event == Event("ZChange", {"new": 1.0, "old": None}, 0, 1)
    assert event != Event("ZChange", {"new": 1.0, "old": None}, 0, 2)
    assert event.topic == "gcode/ZChange"
    assert event.as_dict() == {"name": "ZChange", "group": "gcode", "payload": {"new": 1.0, "old": None},
                               "offset": 0, "line": 1}
    assert "ZChange" in repr(event)
