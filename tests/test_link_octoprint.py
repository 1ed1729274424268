"""The link against a firmware simulator that is not ours: OctoPrint's own virtual printer (Marlin-like, with its
built-in simulated line errors at lines 100-115: a plain resend, a resend that then ignores a line, a line number
missing, a checksum mismatch), put on a pty by tests/data/printer/octoprint_bridge.py.

OctoPrint is a big install, so this runs only where an interpreter with OctoPrint is named::

    python -m venv /tmp/octovenv && /tmp/octovenv/bin/pip install octoprint
    ZEVENTS_OCTOPRINT_PYTHON=/tmp/octovenv/bin/python pytest tests/test_link_octoprint.py
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from test_link import Recorder, make_link

BRIDGE = Path(__file__).parent / "data" / "printer" / "octoprint_bridge.py"


@pytest.fixture
def octoprint_printer():
    python = os.environ.get("ZEVENTS_OCTOPRINT_PYTHON")
    if not python:
        pytest.skip("set ZEVENTS_OCTOPRINT_PYTHON to an interpreter with OctoPrint installed")
    probe = subprocess.run([python, "-c", "import octoprint.plugins.virtual_printer.virtual"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import OctoPrint's virtual printer")
    process = subprocess.Popen([python, str(BRIDGE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        assert port.startswith("/dev/"), process.stderr.read()
        yield port
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_octoprints_virtual_printer_gets_every_line_once_through_its_line_errors(octoprint_printer):
    recorder = Recorder()
    link = make_link(octoprint_printer, recorder, timeout=5.0, retries=3)
    try:
        assert link.connect(), link.error
        assert link.firmware.get("FIRMWARE_NAME") == "Virtual Marlin 1.0"
        assert link.capabilities.get("AUTOREPORT_TEMP") is True
        # Relative moves (the simulator's default): the end position counts every executed line, so a lost or
        # doubled line shows.  Line numbers run from 3 to 152, through all of its simulated errors.  One line is
        # lost on purpose by the simulator: at line 105 ("resend_with_timeout") it asks for 105 again, counts it
        # as received and ignores the copy, to test a host's timeout; the rest must all arrive exactly once.
        link.send(["G1 X1 F60000"] * 150 + ["M400"])
        assert link.send_and_wait("M114", timeout=60) is not None
        update = recorder.wait("PositionUpdate")[1]
        assert (update["x"], update["y"]) == (149, 0)
        assert link.stats["resend_requests"] >= 4
        assert not recorder.named("Error") and link.connected
        assert recorder.wait("Temperature")[1]["tools"]["T0"][0] == pytest.approx(21.3)
    finally:
        link.disconnect(timeout=2.0)


@pytest.mark.parametrize("window", [4, 16])
def test_a_print_through_octoprints_default_simulated_errors_completes(octoprint_printer, tmp_path, window):
    """The simulator's default errors (lines 100-115) with a job streaming a file: every line is executed once,
    in order (the firmware refuses any other order), except line 105, which its "resend_with_timeout" error
    swallows on purpose; PrintDone, and no Error."""
    from zevents.printer.job import Jobs

    moves = 400
    path = tmp_path / "moves.gcode"
    path.write_text("G91\n" + "G1 X1 F60000\n" * moves + "M400\n")
    recorder = Recorder()
    link = make_link(octoprint_printer, recorder, timeout=5.0, retries=3, window=window)
    jobs = Jobs(link)
    try:
        assert link.connect(), link.error
        jobs.start(str(path))
        recorder.wait(lambda n, p, s: n in ("PrintDone", "PrintFailed"), timeout=120, what="the print's end")
        assert recorder.named("PrintDone") and not recorder.named("PrintFailed")
        assert link.send_and_wait("M114", timeout=30) is not None
        update = recorder.wait(lambda n, p, s: n == "PositionUpdate" and p["x"] >= moves - 1, timeout=30)[1]
        assert update["x"] == moves - 1
        assert link.stats["resend_requests"] >= 4
        # No rewind per echo of a line in flight: a handful of rewinds of at most a window each.
        assert link.stats["lines_resent"] <= 6 * window
        assert not recorder.named("Error") and link.connected
    finally:
        jobs.close()
        link.disconnect(timeout=2.0)
