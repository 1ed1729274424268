"""Print jobs on the link and the virtual printer (real pty, real pyserial, the real parser): a whole real sliced
file with its exact event sequence, pause with position, resume, cancel, scripts, failures mid-print, firmware
actions, SD upload and SD print.
"""
from __future__ import annotations

import os

from pathlib import Path

import pytest

from test_link import Recorder, make_link, wait_until
from zevents import analysis
from zevents.parser import Parser
from zevents.printer.job import JobError, Jobs, LocalSource
from zevents.printer.link import LinkError, strip_line
from zevents.printer.virtual import VirtualPrinter

DATA = Path(__file__).parent / "data" / "printer"
CUBE = DATA / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
# Commands the link (and the pause/cancel position query, the SD poll) send on their own.
OWN = ("M110", "M115", "M155", "M105", "M114", "M27")
SCRIPTS = {"beforePrintStarted": "M117 zevents start", "afterPrintDone": "M104 S0\nM140 S0",
           "afterPrintPaused": "M117 paused", "beforePrintResumed": "M117 resuming",
           "afterPrintCancelled": "M117 cancelled\nM104 S0"}
NOT_ORDERED = ("PrintProgress", "Temperature", "PositionUpdate")


def file_lines(path: Path) -> list:
    return [raw.rstrip(b"\r\n").decode() for raw in path.read_bytes().splitlines(keepends=True)]


def file_commands(path: Path) -> list:
    return [c for c in (strip_line(line) for line in file_lines(path)) if c and not c.upper().startswith(OWN)]


def expected_gcode_events(path: Path) -> list:
    """What a fresh parser makes of the file fed line by line: the link must publish exactly this (src job)."""
    parser = Parser(None)
    events = []
    for line in file_lines(path):
        events.extend((event.name, event.payload) for event in parser.sent(line))
    return events


def executed(printer: VirtualPrinter) -> list:
    return [c for c in printer.received if not c.upper().startswith(OWN)]


def gcode_event_names() -> set:
    from zevents import events as zevents_events

    return {name for name, spec in zevents_events.EVENTS.items() if spec.group == "gcode"}


def job_sequence(recorder: Recorder) -> list:
    """The events in order without gcode events and telemetry; states as (PrinterStateChanged, id)."""
    skip = gcode_event_names() | set(NOT_ORDERED)
    out = []
    for name, payload, src, _ in list(recorder.events):
        if name in skip:
            continue
        out.append((name, payload["state_id"]) if name == "PrinterStateChanged" else name)
    return out


def progress_values(recorder: Recorder) -> list:
    return [e[1]["progress"] for e in recorder.named("PrintProgress")]


class Bench:
    """A virtual printer, a link and its jobs, torn down in order."""

    def __init__(self, tmp_path, speed=0.0, scripts=None, firmware="marlin", tools=1, abort_heatup_on_cancel=True,
                 **link_options):
        self.recorder = Recorder()
        self.printer = VirtualPrinter(firmware=firmware, speed=speed, tools=tools, sd_dir=tmp_path / "sd",
                                      boot_delay=0.05)
        self.printer.start()
        self.link = make_link(self.printer.port, self.recorder, **link_options)
        self.jobs = Jobs(self.link, scripts=scripts, sd_poll_interval=0.2,
                         abort_heatup_on_cancel=abort_heatup_on_cancel)
        assert self.link.connect(), self.link.error

    def wait(self, *args, **kwargs):
        return self.recorder.wait(*args, **kwargs)

    def wait_progress(self, percent: int):
        return self.wait(lambda n, p, s: n == "PrintProgress" and p["progress"] >= percent, timeout=30,
                         what=f"progress {percent}")

    def close(self):
        self.jobs.close()
        self.link.disconnect(timeout=1.0)
        self.printer.stop()


@pytest.fixture
def bench(tmp_path):
    made = []

    def make(**options):
        made.append(Bench(tmp_path, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_real_sliced_file_prints_with_the_exact_event_sequence(bench):
    b = bench(scripts={"beforePrintStarted": SCRIPTS["beforePrintStarted"], "afterPrintDone": SCRIPTS["afterPrintDone"]})
    b.jobs.start(str(CUBE), user="alice")
    done = b.wait("PrintDone", timeout=60)
    wait_until(lambda: b.link.status()["state_id"] == "OPERATIONAL", what="operational again")

    sequence = job_sequence(b.recorder)
    start = sequence.index("FileSelected")
    assert sequence[start:] == [
        "FileSelected", ("PrinterStateChanged", "PRINTING"), "PrintStarted", "ChartMarked",
        "GcodeScriptBeforePrintStartedRunning", "GcodeScriptBeforePrintStartedFinished",
        ("PrinterStateChanged", "FINISHING"),
        "GcodeScriptAfterPrintDoneRunning", "GcodeScriptAfterPrintDoneFinished",
        "PrintDone", "ChartMarked", ("PrinterStateChanged", "OPERATIONAL"),
    ]
    size = CUBE.stat().st_size
    assert done[1]["name"] == CUBE.name and done[1]["origin"] == "local" and done[1]["size"] == size
    assert done[1]["owner"] == "alice" and done[1]["time"] > 0
    assert b.recorder.wait("PrintStarted")[1]["user"] == "alice"
    assert [e[1]["type"] for e in b.recorder.named("ChartMarked")] == ["print", "done"]

    # Every gcode event of the file, with src job, exactly as a fresh parser sees the file; but the layers are
    # the slicer's markers (one per ";LAYER_CHANGE", z from its ";Z:", the total known), not the parser's guess.
    gcode_names = gcode_event_names()
    published = [(e[0], e[1]) for e in b.recorder.events if e[0] in gcode_names and e[2] == "job"]
    assert [e for e in published if e[0] != "LayerChanged"] == [
        e for e in expected_gcode_events(CUBE) if e[0] != "LayerChanged"]
    layers = [(p["layer"], p["z"], p["old_z"], p["total"]) for n, p in published if n == "LayerChanged"]
    assert layers == [(1, 0.2, None, 5), (2, 0.4, 0.2, 5), (3, 0.6, 0.4, 5), (4, 0.8, 0.6, 5), (5, 1.0, 0.8, 5)]
    counts = {name: sum(1 for n, _ in published if n == name) for name in ("Home", "ZChange", "LayerChanged")}
    assert counts["Home"] == 1 and counts["LayerChanged"] == 5 and counts["ZChange"] > 5
    # ... and the counts are those of the parser's analysis of the same file.
    analysed = analysis.analyse(str(CUBE))["events"]
    assert counts == {name: analysed.get(name, 0) for name in counts}

    # Progress: every percent once, in order, ending at 100.
    assert progress_values(b.recorder) == list(range(0, 101))
    # The printer executed the scripts and every command of the file once, in order.
    assert executed(b.printer) == ["M117 zevents start"] + file_commands(CUBE) + ["M104 S0", "M140 S0"]


def test_pause_records_the_position_and_resume_finishes_the_print(bench):
    b = bench(speed=20.0, scripts=SCRIPTS)
    b.jobs.start(str(CUBE))
    b.wait_progress(30)
    paused = b.jobs.pause(user="bob")
    event = b.wait("PrintPaused")[1]
    assert b.link.state == "PAUSED"
    position = event["position"]
    actual = b.printer.position
    for axis in "xyz":
        assert position[axis] == pytest.approx(actual[axis], abs=0.01), axis
    assert position["t"] == 0 and position["f"] and position["f"] > 0
    assert event["user"] == "bob" and 30 <= event["progress"] < 100 and 0 < event["fileposition"] < CUBE.stat().st_size
    assert paused["position"] == position
    b.printer.wait_received("M117 paused")
    with pytest.raises(JobError, match="not printing"):
        b.jobs.pause()

    b.jobs.resume(user="bob")
    b.wait("PrintResumed")
    b.wait("PrintDone", timeout=60)
    names = [e for e in job_sequence(b.recorder) if e not in ("ChartMarked",)]
    at = names.index(("PrinterStateChanged", "PAUSING"))
    assert names[at:at + 9] == [
        ("PrinterStateChanged", "PAUSING"), "PrintPaused", "GcodeScriptAfterPrintPausedRunning",
        "GcodeScriptAfterPrintPausedFinished", ("PrinterStateChanged", "PAUSED"), ("PrinterStateChanged", "RESUMING"),
        "GcodeScriptBeforePrintResumedRunning", "GcodeScriptBeforePrintResumedFinished", "PrintResumed"]
    assert [e[1]["type"] for e in b.recorder.named("ChartMarked")] == ["print", "pause", "resume", "done"]
    commands = [c for c in executed(b.printer) if not c.startswith("M117")]
    assert commands == file_commands(CUBE) + ["M104 S0", "M140 S0"]


def test_cancel_stops_the_stream_and_reports_where_it_stopped(bench):
    b = bench(speed=20.0, scripts=SCRIPTS)
    b.jobs.start(str(CUBE))
    b.wait_progress(25)
    b.jobs.cancel(user="carol")
    cancelled = b.wait("PrintCancelled")[1]
    failed = b.wait("PrintFailed")[1]
    assert failed["reason"] == "cancelled" and failed["time"] > 0
    assert cancelled["user"] == "carol" and cancelled["position"]["z"] == pytest.approx(b.printer.position["z"], abs=0.01)
    assert 25 <= cancelled["progress"] < 100
    assert b.wait("PrintCancelling")[1]["firmwareError"] is None
    assert b.link.state == "OPERATIONAL"
    assert not b.recorder.named("PrintDone")
    commands = [c for c in executed(b.printer) if not c.startswith("M117")]
    expected = file_commands(CUBE)
    # Everything sent is a prefix of the file, then the cancel script; the rest never went out.
    assert commands[-1] == "M104 S0"
    assert commands[:-1] == expected[:len(commands) - 1] and len(commands) - 1 < len(expected)
    b.printer.wait_received("M117 cancelled")
    with pytest.raises(JobError, match="no job"):
        b.jobs.cancel()


def test_firmware_actions_pause_resume_and_cancel(bench):
    b = bench(speed=20.0)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.printer.send_action("pause")
    b.wait("PrintPaused")
    wait_until(lambda: b.link.state == "PAUSED", what="paused")
    b.printer.send_action("resume")
    b.wait("PrintResumed")
    b.printer.send_action("cancel")
    assert b.wait("PrintFailed")[1]["reason"] == "cancelled"
    assert b.recorder.named("PrintCancelled")


def test_a_filament_change_paused_by_the_firmware_resumes_when_the_user_continues(bench, tmp_path):
    b = bench()
    job = tmp_path / "m600.gcode"
    job.write_text("G28\nG1 Z1 F600\nG1 X10 Y10\nM600\nG1 X20 Y20\nG1 Z2\n")
    b.jobs.start(str(job))
    paused = b.wait("PrintPaused")[1]
    assert paused["position"] is None  # the firmware holds its queue: nothing to ask it now
    wait_until(lambda: b.link.state == "PAUSED", what="paused")
    assert b.wait("FilamentChange")[2] == "job"
    assert "G1 X20 Y20" not in executed(b.printer)
    b.printer.user_continue()
    b.wait("PrintResumed")
    b.wait("PrintDone")
    assert executed(b.printer)[-3:] == ["M600", "G1 X20 Y20", "G1 Z2"]


def test_a_printer_that_disconnects_mid_print_fails_the_job(bench):
    b = bench(speed=20.0)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.printer.inject("disconnect")
    error = b.wait("Error")[1]
    assert error["reason"] == "connection" and error["consequence"] == "disconnect"
    failed = b.wait("PrintFailed")[1]
    assert failed["reason"] == "error" and failed["name"] == CUBE.name
    b.wait("Disconnected")
    assert b.jobs.active is None and b.link.state == "CLOSED_WITH_ERROR"


def test_disconnecting_mid_print_stops_the_stream_and_fails_the_job(bench):
    b = bench(speed=20.0)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.link.disconnect(timeout=5.0)
    failed = b.wait("PrintFailed")[1]
    assert failed["reason"] == "error"
    names = [n for n in b.recorder.names() if n in ("Disconnecting", "PrintFailed", "Disconnected")]
    assert names == ["Disconnecting", "PrintFailed", "Disconnected"]
    assert b.link.state == "CLOSED" and not b.recorder.named("Error")
    sent = len([c for c in executed(b.printer) if not c.startswith("M117")])
    assert sent < len(file_commands(CUBE))


def test_a_silent_printer_mid_print_fails_the_job_without_hanging(bench):
    b = bench(speed=20.0, timeout=0.5, retries=2)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.printer.inject("silent")
    assert b.wait("Error", timeout=20)[1]["reason"] == "timeout"
    assert b.wait("PrintFailed")[1]["reason"] == "error"
    b.wait("Disconnected")
    b.printer.recover()


def test_a_fatal_firmware_error_mid_print_is_an_emergency(bench):
    b = bench(speed=20.0)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.printer.inject("firmware_error")
    error = b.wait("Error")[1]
    assert error["reason"] == "firmware" and error["consequence"] == "emergency" and "MINTEMP" in error["error"]
    assert b.wait("PrintFailed")[1]["reason"] == "error"
    b.wait("Disconnected")


def test_a_non_fatal_firmware_error_mid_print_cancels_it(bench):
    b = bench(speed=20.0)
    b.jobs.start(str(CUBE))
    b.wait_progress(20)
    b.printer.send_line("Error:Filament runout sensor reports no filament")
    error = b.wait("Error")[1]
    assert error["reason"] == "firmware" and error["consequence"] == "cancel"
    cancelling = b.wait("PrintCancelling")[1]
    assert "runout" in cancelling["firmwareError"]
    assert b.wait("PrintFailed")[1]["reason"] == "cancelled"
    wait_until(lambda: b.link.state == "OPERATIONAL", what="operational after the cancel")


# Files that must never reach a printer: (name, content, what the refusal says).
BINARIES = [("cube.bgcode", b"GCDE\x01\x00\x00\x00" + bytes(range(256)), "binary G-code"),
            ("tool.gcode", b"\x7fELF\x02\x01\x01" + bytes(200), r"executable \(ELF\)"),
            ("image.gcode", b"G28\nG1 X1\n\x89PNG\x00\x00IHDR", r"binary file \(a NUL byte at offset 14\)")]


def test_selection_refuses_what_cannot_be_printed(bench, tmp_path):
    b = bench()
    with pytest.raises(JobError, match="No such file"):
        b.jobs.select(str(tmp_path / "missing.gcode"))
    with pytest.raises(JobError, match="is a directory, not a G-code file"):
        b.jobs.select(str(tmp_path))
    fifo = tmp_path / "pipe.gcode"
    os.mkfifo(fifo)
    with pytest.raises(JobError, match=r"is a named pipe \(FIFO\), not a G-code file"):
        b.jobs.select(str(fifo))
    for name, content, why in BINARIES:
        binary = tmp_path / name
        binary.write_bytes(content)
        with pytest.raises(JobError, match=why):
            b.jobs.select(str(binary))
    with pytest.raises(JobError, match="no file selected"):
        b.jobs.start()
    b.jobs.select(str(CUBE))
    assert b.wait("FileSelected")[1] == {"name": CUBE.name, "path": str(CUBE.resolve()), "origin": "local"}
    b.jobs.deselect()
    b.wait("FileDeselected")
    assert not b.recorder.named("PrintStarted")


def test_after_tool_change_script_runs_after_each_tool_change(bench, tmp_path):
    b = bench(scripts={"afterToolChange": "M117 tool changed"}, tools=2)
    job = tmp_path / "tools.gcode"
    job.write_text("G28\nT0\nG1 X10\nT1\nG1 X20\nT0\nG1 X30\n")
    b.jobs.start(str(job))
    b.wait("PrintDone")
    changes = b.recorder.named("ToolChange")
    assert [(e[1]["old"], e[1]["new"], e[2]) for e in changes] == [(0, 1, "job"), (1, 0, "job")]
    assert len(b.recorder.named("GcodeScriptAfterToolChangeRunning")) == 2
    assert len(b.recorder.named("GcodeScriptAfterToolChangeFinished")) == 2
    assert executed(b.printer)[-9:] == ["G28", "T0", "G1 X10", "T1", "M117 tool changed", "G1 X20", "T0",
                                        "M117 tool changed", "G1 X30"]


def test_sd_upload_list_and_print(bench, tmp_path):
    b = bench(speed=20.0)
    result = b.jobs.sd_upload(str(CUBE), "cube.gco", wait=True)
    assert result["remote"] == "cube.gco"
    started = b.wait("TransferStarted")[1]
    done = b.wait("TransferDone")[1]
    assert started == {"local": CUBE.name, "remote": "cube.gco"}
    assert done["local"] == CUBE.name and done["remote"] == "cube.gco" and done["time"] >= 0
    assert ("PrinterStateChanged", "TRANSFERING_FILE") in job_sequence(b.recorder)
    # Streaming to SD moves nothing: no gcode events for the file's lines.
    assert not [e for e in b.recorder.events if e[0] in ("Home", "ZChange") and e[2] == "job"]
    stored = [p for p in b.printer.sd_dir.iterdir() if p.name.lower() == "cube.gco"]
    assert stored, list(b.printer.sd_dir.iterdir())
    stored_commands = [line for line in stored[0].read_text().splitlines() if line.strip()]
    assert [c for c in stored_commands if not c.upper().startswith(OWN)] == file_commands(CUBE)

    listing = b.jobs.sd_list()
    assert any(entry["name"].lower() == "cube.gco" for entry in listing), listing

    b.jobs.sd_print("cube.gco")
    selected = b.wait(lambda n, p, s: n == "FileSelected" and p["origin"] == "sdcard")[1]
    assert selected["name"] == "cube.gco"
    started = b.wait("PrintStarted")[1]
    assert started["origin"] == "sdcard" and started["size"] == stored[0].stat().st_size
    done = b.wait("PrintDone", timeout=60)[1]
    assert done["origin"] == "sdcard" and done["name"] == "cube.gco"
    wait_until(lambda: b.link.state == "OPERATIONAL", what="operational after the SD print")
    # Progress comes from the firmware's M27 reports: increasing, at most once per percent.
    sd_progress = [e[1] for e in b.recorder.named("PrintProgress") if e[1]["origin"] == "sdcard"]
    values = [p["progress"] for p in sd_progress]
    assert values and values == sorted(set(values)) and all(0 <= v <= 100 for v in values)
    assert all(0 <= p["fileposition"] <= stored[0].stat().st_size for p in sd_progress), sd_progress
    assert values[-1] >= 50  # the polls saw the print advance
    # Printing from SD is the printer's business: no gcode events from the host.
    assert not [e for e in b.recorder.events if e[0] == "ZChange" and e[2] == "job"]


def test_sd_print_of_a_missing_file_is_refused(bench):
    b = bench()
    with pytest.raises(JobError, match="cannot open"):
        b.jobs.sd_print("nothere.gco")
    assert not b.recorder.named("PrintStarted")
    assert b.wait("Error")[1]["reason"] == "start_print"


def test_a_selected_file_that_vanished_cannot_start(bench, tmp_path):
    b = bench()
    doomed = tmp_path / "doomed.gcode"
    doomed.write_text("G28\n")
    b.jobs.select(str(doomed))
    doomed.unlink()
    with pytest.raises(JobError, match="cannot open"):
        b.jobs.start()
    error = b.wait("Error")[1]
    assert error["reason"] == "start_print" and "doomed.gcode" in error["error"]
    assert not b.recorder.named("PrintStarted") and b.link.state == "OPERATIONAL"


# --- lines the firmware cannot take, files that change -----------------------------------------------------------

def test_a_2kb_m117_in_a_file_is_shortened_and_the_print_finishes(bench, tmp_path):
    b = bench()
    path = tmp_path / "message.gcode"
    path.write_text("G28\nM117 " + "x" * 2048 + "\nG1 X10 Y10\n")
    b.jobs.start(str(path))
    b.wait("PrintDone", timeout=30)
    shortened = b.wait("CommandSuppressed")[1]
    assert shortened["severity"] == "info" and "shortened from 2053 to 80" in shortened["message"]
    sent = [c for c in executed(b.printer) if c.startswith("M117")]
    assert sent == ["M117 " + "x" * 75]
    assert executed(b.printer)[-1] == "G1 X10 Y10" and not b.recorder.named("Error")


def test_a_10mb_line_refuses_the_print_at_its_start_naming_the_line(bench, tmp_path):
    b = bench()
    path = tmp_path / "huge.gcode"
    with open(path, "wb") as handle:
        handle.write(b"G28\nG1 X1\n; a comment as long as it likes " + b"c" * 1000 + b"\nG1 X2 " + b"9" * (10 << 20)
                     + b"\nG1 X3\n")
    before = len(executed(b.printer))
    with pytest.raises(JobError, match=r"huge.gcode: line 4 \(G1 X2 9+\.\.\.\) is 10485766 characters long, "
                                       r"the printer takes at most 80 \(printer.max_line\)"):
        b.jobs.start(str(path))
    assert b.wait("Error")[1]["reason"] == "start_print"
    assert not b.recorder.named("PrintStarted") and b.link.state == "OPERATIONAL"
    assert len(executed(b.printer)) == before


def test_an_over_long_line_that_reaches_the_firmware_ends_in_a_defined_state(bench, tmp_path):
    """No line limit on our side (max_line 0) and a firmware that drops lines over its buffer without a word:
    every probe is answered with a request for the same line, and the retries must still run out."""
    b = bench(timeout=0.5, retries=2, max_line=0)
    path = tmp_path / "long.gcode"
    path.write_text("G28\nG1 X1 " + "0" * 2000 + "\nG1 X2\n")
    b.jobs.start(str(path))
    error = b.wait("Error", timeout=30)[1]
    assert error["reason"] == "timeout" and error["consequence"] == "disconnect"
    assert b.wait("PrintFailed", timeout=30)[1]["reason"] == "error"
    b.wait("Disconnected", timeout=30)
    assert b.link.state == "CLOSED_WITH_ERROR"


def test_send_refuses_an_over_long_line_and_shortens_a_message(bench):
    b = bench()
    with pytest.raises(LinkError, match=r"line 2 not sent \(nothing was\): G1 X1 0+\.\.\. is 206 characters long"):
        b.link.send(["G1 X5", "G1 X1 " + "0" * 200])
    accepted, suppressed = b.link.send(["M118 E1 " + "y" * 300, "G1 X6"])
    assert accepted == 2 and not suppressed
    assert b.link.wait_idle(10)
    assert [c for c in executed(b.printer) if c.startswith(("G1", "M118"))] == ["M118 E1 " + "y" * 72, "G1 X6"]


@pytest.mark.parametrize("change", ["truncate", "append", "rewrite"])
def test_a_file_changed_under_the_job_stops_it_saying_why(bench, tmp_path, monkeypatch, change):
    monkeypatch.setattr(LocalSource, "CHECK_EVERY", 1024)
    b = bench(speed=20.0, scripts=SCRIPTS)
    path = tmp_path / "cube.gcode"
    original = CUBE.read_bytes()
    path.write_bytes(original)
    b.jobs.start(str(path))
    b.wait_progress(10)
    if change == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(len(original) // 5)
    elif change == "append":
        with open(path, "ab") as handle:
            handle.write(original * 8)
    else:
        with open(path, "r+b") as handle:
            handle.write(original[::-1][:len(original)])
    error = b.wait("Error", timeout=30)[1]
    assert "changed while it was printing" in error["error"] and error["consequence"] == "cancel"
    assert b.wait("PrintCancelling")[1]["firmwareError"] == error["error"]
    assert b.wait("PrintFailed", timeout=30)[1]["reason"] == "cancelled"
    assert not b.recorder.named("PrintDone")
    assert all(0 <= p <= 100 for p in progress_values(b.recorder))
    assert all(e[1]["size"] == len(original) for e in b.recorder.named("PrintStarted", "PrintCancelled"))
    b.printer.wait_received("M117 cancelled")
    wait_until(lambda: b.link.state == "OPERATIONAL", what="operational again")


def test_a_file_replaced_by_a_new_one_prints_as_started(bench, tmp_path):
    """The usual atomic save (write a new file, rename it over the old) is no change: the job prints the file it
    opened."""
    b = bench(speed=20.0)
    path = tmp_path / "cube.gcode"
    path.write_bytes(CUBE.read_bytes())
    b.jobs.start(str(path))
    b.wait_progress(10)
    replacement = tmp_path / "new.gcode"
    replacement.write_text("G28\n")
    os.replace(replacement, path)
    b.wait("PrintDone", timeout=60)
    assert not b.recorder.named("Error")
    assert [c for c in executed(b.printer) if not c.startswith("M117")][-len(file_commands(CUBE)):] == \
        file_commands(CUBE)


def test_cancel_turns_the_heaters_fan_and_motors_off_by_default(bench):
    """OctoPrint's default afterPrintCancelled: a cancelled print does not leave a 215 °C nozzle behind."""
    b = bench(speed=20.0, tools=2)
    b.jobs.start(str(CUBE))
    b.wait_progress(25)
    assert b.printer.temperatures["tools"][0][1] == 215 and b.printer.temperatures["bed"][1] == 60
    b.jobs.cancel()
    b.wait("GcodeScriptAfterPrintCancelledFinished", timeout=30)
    b.wait("PrintCancelled")
    temperatures = b.printer.temperatures
    assert [target for _, target in temperatures["tools"]] == [0, 0] and temperatures["bed"][1] == 0
    assert executed(b.printer)[-5:] == ["M84", "M104 T0 S0", "M104 T1 S0", "M140 S0", "M106 S0"]


@pytest.mark.parametrize("abort", [True, False])
def test_a_cancel_while_heating_ends_the_heat_up_waits_with_m108(bench, abort):
    """OctoPrint's abortHeatupOnCancel: cancelled during M190 (M109 right behind it), the print does not wait for
    the bed and then the nozzle to reach temperature; each wait gets its M108 once it runs. Off, the waits run to
    the end (the cancel script comes after them)."""
    b = bench(speed=2.0 if abort else 20.0, abort_heatup_on_cancel=abort)
    b.jobs.start(str(CUBE))
    assert b.printer.wait_received("M190 S60", timeout=30)
    wait_until(lambda: b.printer.temperatures["bed"][1] == 60, what="the bed heating")
    b.jobs.cancel()
    b.wait("PrintCancelled", timeout=60)
    bed, nozzle = b.printer.temperatures["bed"][0], b.printer.temperatures["tools"][0][0]
    # M109 ran only when it was already in flight when the cancel came; otherwise the cancel dropped it
    waits = [c for c in executed(b.printer) if c.startswith(("M190", "M109"))]
    assert waits[0] == "M190 S60", waits
    if abort:
        assert bed < 55 and nozzle < 200, (bed, nozzle)
        assert b.printer.received.count("M108") >= len(waits), b.printer.received[-12:]   # one per wait that ran
    else:
        assert bed >= 55 and (nozzle >= 200 or waits == ["M190 S60"]), (bed, nozzle, waits)
        assert "M108" not in b.printer.received
    assert b.printer.temperatures["bed"][1] == 0 and not b.recorder.named("Error")


def test_a_configured_script_replaces_the_default_and_an_empty_one_turns_it_off(bench):
    b = bench(scripts={"afterPrintCancelled": ""})
    assert b.jobs.run_script("afterPrintCancelled") is False
    b = bench(scripts={"afterPrintCancelled": "M104 S0 ; only the nozzle"})
    assert b.jobs.run_script("afterPrintCancelled") is True
    b.printer.wait_received("M104 S0")
    assert "M84" not in executed(b.printer)


def end_offsets(path: Path) -> list:
    """The file offset after each line that carries a command (what a printer executes), in order."""
    offsets, position = [], 0
    for raw in path.read_bytes().splitlines(keepends=True):
        position += len(raw)
        if strip_line(raw.decode()):
            offsets.append(position)
    return offsets


@pytest.mark.parametrize("how", ["pause", "cancel"])
def test_pause_and_cancel_report_the_position_of_the_last_acknowledged_line(bench, how):
    b = bench(speed=20.0, scripts={"afterPrintCancelled": ""})
    b.jobs.start(str(CUBE))
    b.wait_progress(30)
    # A few lines past the last percent published: the pause comes between two PrintProgress events.
    count = len(b.printer.received)
    wait_until(lambda: len(b.printer.received) >= count + 5, what="five more lines")
    if how == "pause":
        b.jobs.pause()
        event = b.wait("PrintPaused")[1]
    else:
        b.jobs.cancel()
        event = b.wait("PrintCancelled")[1]
    # What the printer ran of the file (it acknowledges a line once it has run it): the job's position is the end
    # of the last of those lines, not of the last line read or of the last percent published.
    ran = [c for c in b.printer.received if c != "M115" and not c.startswith(("M110", "M155", "M105", "M114"))]
    offset = end_offsets(CUBE)[len(ran) - 1]
    assert event["fileposition"] == offset
    assert event["progress"] == round(offset * 100.0 / CUBE.stat().st_size, 2)
    if how == "pause":
        b.jobs.resume()
        b.wait("PrintDone", timeout=60)


@pytest.mark.parametrize("how", ["pause", "cancel"])
def test_resend_requests_while_pausing_or_cancelling_lose_and_duplicate_nothing(bench, how):
    """Line errors on the lines still in flight when a pause or a cancel comes: they are resent, the job's
    position is still the last acknowledged line, and a resumed print runs every command exactly once."""
    b = bench(speed=20.0, scripts={"afterPrintCancelled": ""})
    b.printer.inject("keep_buffer", count=10_000)
    b.jobs.start(str(CUBE))
    b.wait_progress(30)
    for _ in range(3):
        b.printer.inject("corrupt_checksum")
    if how == "pause":
        b.jobs.pause()
        b.wait("PrintPaused")
        b.jobs.resume()
        b.wait("PrintDone", timeout=60)
        assert [c for c in executed(b.printer) if not c.startswith("M117")] == file_commands(CUBE)
    else:
        b.jobs.cancel()
        b.wait("PrintCancelled")
        ran = [c for c in executed(b.printer) if not c.startswith("M117")]
        assert ran == file_commands(CUBE)[:len(ran)]
    assert b.printer.stats["resends_requested"] >= 1 and not b.recorder.named("Error")
