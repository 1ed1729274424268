"""The live view of `zevents run`: the fields that matter first and whole, times as times, numbers as numbers."""
from __future__ import annotations

import re

from conftest import wait_for
from zevents import bus, console
from zevents.console import summarise

LONG_PATH = "/home/pi/.local/share/zevents/uploads/" + "a-very-long-folder-name/" * 5 + "cube.gcode"


def test_print_progress_shows_its_progress_first_whatever_the_path():
    line = summarise({"name": "cube.gcode", "path": LONG_PATH, "origin": "local", "progress": 42,
                      "fileposition": 123456, "time": 12.5}, name="PrintProgress")
    assert line.startswith("progress=42 % name=cube.gcode")
    assert len(line) <= 100


def test_hook_results_show_the_tail_of_stdout_despite_a_long_argv():
    line = summarise({"subscription": "tell me", "event": "PrintDone", "argv": [["echo", "x" * 300]],
                      "returncode": 0, "duration": 0.0123, "stderr": "", "started": 1796330000123456,
                      "stdout": "first line\n" + "y" * 400 + "\nPrintDone: cube at 100 percent\n"},
                     name="HookFinished")
    assert line.startswith("subscription=tell me returncode=0 duration=0.01 s stdout=")
    assert "PrintDone: cube at 100 percent'" in line


def test_layers_with_their_total_and_errors_whole():
    assert summarise({"layer": 3, "z": 0.6, "old_z": 0.4, "total": 120}, name="LayerChanged") == \
        "layer=3/120 z=0.6 old_z=0.4"
    error = "Printer halted. kill() called! " * 6
    assert f"error={error.strip()}" in summarise({"error": error, "reason": "firmware"}, name="Error")


def test_times_are_times_and_no_number_is_in_exponent_form():
    line = summarise({"date": 1796330000.5, "started": 1796330000123456, "time": 3725.2, "size": 1.5e7,
                      "temp": {"actual": 200.123456, "target": 210.0}}, name="Custom")
    assert "e+" not in line
    assert re.search(r"date=\d\d:\d\d:\d\d started=\d\d:\d\d:\d\d time=1 h 02 min size=15000000 ", line), line
    assert "temp={actual=200.123, target=210}" in line


def test_the_viewer_prints_the_headline_of_a_live_event(running_broker, bus_config, capsys):
    viewer = console.Viewer(bus_config).start()
    try:
        with bus.Publisher(bus_config, src="test") as pub:
            pub.publish_confirmed("PrintProgress", {"name": "cube.gcode", "path": LONG_PATH, "progress": 57})

        def shown():
            out = capsys.readouterr().out
            shown.text += out
            return "PrintProgress" in shown.text
        shown.text = ""
        wait_for(shown, 30, 0.05, message="the viewer's line")
    finally:
        viewer.stop()
    assert "progress=57 % name=cube.gcode" in shown.text
