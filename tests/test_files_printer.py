"""The files service with a real printer link (`zevents printer --virtual` process): the SD card as storage
`sdcard` (list, upload, remove through the link's channel), upload with --select / --print, and the print history
of a real print."""
from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from zevents import bus

from conftest import wait_for
from files_helpers import ZEVENTS, cli, count, events, request, start_service, stop_service, write_config

CUBE = Path(__file__).parent / "data" / "printer" / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
SMALL = b"M82\nG28\nG1 Z0.2 F3000\nG1 X10 Y10 E1 F1200\nG1 X20 Y10 E2\n"


@contextlib.contextmanager
def printer_and_files(config: Path, bus_config, files_now: bool = True):
    """A virtual printer's link (`zevents printer --virtual`) and, unless told, a files service: both real
    processes; yields (subscriber on their events, start_files() to start the files service later)."""
    subscriber = bus.Subscriber(bus_config, groups=["file", "print", "comm"])
    printer = subprocess.Popen(ZEVENTS + ["printer", "--virtual", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    started = []

    def start_files():
        started.append(start_service(config, bus_config))

    try:
        events(subscriber, count("Connected", 1), names=("Connected",))
        if files_now:
            start_files()
        yield subscriber, start_files
    finally:
        for process in started:
            stop_service(process)
        stop_service(printer)
        subscriber.close()


@pytest.fixture
def node(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config, files={"analysis": {"run_at": "never"}, "watch": False})
    with printer_and_files(config, bus_config) as (subscriber, _):
        yield config, subscriber, short_tmp


NAMES = ("FileAdded", "FileRemoved", "UpdatedFiles", "Upload", "TransferStarted", "TransferDone", "FileSelected",
         "FileDeselected", "PrintStarted", "PrintDone", "MetadataStatisticsUpdated")


def test_sd_card_storage_through_the_printer_link(node):
    config, subscriber, tmp = node
    source = tmp / "sdpart.gcode"
    source.write_bytes(SMALL)
    result = cli(config, "files", "upload", str(source), "--storage", "sdcard")
    assert result.returncode == 0, result.stderr
    got = events(subscriber, count("Upload", 1), names=NAMES)
    assert [n for n, _ in got] == ["TransferStarted", "TransferDone", "FileAdded", "UpdatedFiles", "Upload"]
    remote = got[-1][1]["path"]
    assert got[2][1] == {"storage": "sdcard", "path": remote, "name": remote, "type": ["machinecode", "gcode"],
                         "operation": "add"}
    assert got[-1][1]["target"] == "sdcard"
    listing = json.loads(cli(config, "files", "ls", "--storage", "sdcard", "--json").stdout)
    assert remote.lower() in [entry["name"].lower() for entry in listing]
    assert cli(config, "files", "rm", remote, "--storage", "sdcard").returncode == 0
    got = events(subscriber, count("UpdatedFiles", 1), names=NAMES)
    assert got[0] == ("FileRemoved", {"storage": "sdcard", "path": remote, "name": remote,
                                      "type": ["machinecode", "gcode"], "operation": "remove"})
    wait_for(lambda: remote.lower() not in [e["name"].lower() for e in
                                            request(config, "LIST", storage="sdcard")["files"]],
             message="the SD file to go")
    refused = cli(config, "files", "mkdir", "x", "--storage", "sdcard")
    assert refused.returncode != 0


def test_upload_with_select_and_print_then_history(node):
    config, subscriber, tmp = node
    source = tmp / "cube.gcode"
    source.write_bytes(CUBE.read_bytes())
    reply = request(config, "UPLOAD", source=str(source), path="jobs/cube.gcode", select=True)
    assert reply["effective_select"] is True and reply["effective_print"] is False
    got = events(subscriber, count("Upload", 1), names=NAMES)
    assert [n for n, _ in got] == ["FileAdded", "UpdatedFiles", "FileSelected", "Upload"]
    assert got[-1][1]["effective_select"] is True
    result = cli(config, "files", "upload", str(source), "--path", "jobs", "--print")
    assert result.returncode == 0 and "printing" in result.stderr, result.stderr
    got = events(subscriber, count("MetadataStatisticsUpdated", 1), names=NAMES, timeout=120)
    names = [n for n, _ in got]
    # Upload after PrintStarted (OctoPrint's order); the virtual printer at speed 0 may be done before Upload
    assert names.index("PrintStarted") < names.index("Upload") and "PrintDone" in names
    info = request(config, "INFO", path="jobs/cube.gcode")["file"]
    assert [h["success"] for h in info["history"]] == [True]
    assert info["statistics"]["lastPrintTime"]["_default"] == info["history"][0]["printTime"]


def test_a_restarted_service_learns_the_running_print_from_the_link(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config, files={"watch": False},
                          printer={"virtual": {"firmware": "marlin", "speed": 1, "tools": 1}})
    stored = short_tmp / "data" / "uploads" / "long.gcode"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(CUBE.read_bytes())
    with printer_and_files(config, bus_config, files_now=False) as (subscriber, start_files):
        assert cli(config, "print", str(stored)).returncode == 0
        events(subscriber, count("PrintStarted", 1), names=("PrintStarted",))
        start_files()                     # started after PrintStarted: it must ask the link
        wait_for(lambda: request(config, "STATUS")["printing"] == "long.gcode", message="the running print")
        status = request(config, "STATUS")
        assert status["analysis"]["paused"] and status["analysis"]["pending"] == ["long.gcode"], status
        refused = cli(config, "files", "rm", "long.gcode")
        assert refused.returncode == 1 and "being printed" in refused.stderr
        assert stored.exists()
        assert cli(config, "cancel").returncode == 0
        got = events(subscriber, count("MetadataAnalysisFinished", 1), names=NAMES + ("PrintFailed",
                                                                                   "MetadataAnalysisFinished"))
        names = [n for n, _ in got]
        assert names.index("PrintFailed") < names.index("MetadataStatisticsUpdated")
        result = got[-1][1]["result"]
        assert [h["success"] for h in result["history"]] == [False]


def test_a_selected_file_replaced_through_the_watched_folder_is_selected_again(short_tmp, bus_config,
                                                                              running_broker):
    config = write_config(short_tmp, bus_config, files={"analysis": {"run_at": "never"}})
    with printer_and_files(config, bus_config) as (subscriber, _):
        source = short_tmp / "w.gcode"
        source.write_bytes(SMALL)
        assert request(config, "UPLOAD", source=str(source), path="w.gcode", select=True)["effective_select"]
        events(subscriber, count("Upload", 1), names=NAMES)
        (short_tmp / "data" / "watched" / "w.gcode").write_bytes(SMALL + b"G1 X30 E3\n")
        got = events(subscriber, count("FileSelected", 1), names=NAMES)
        assert [n for n, _ in got] == ["FileAdded", "UpdatedFiles", "FileSelected"]
        assert got[-1][1]["path"].endswith("/uploads/w.gcode")


def test_removing_the_selected_file_deselects_it_first(node):
    config, subscriber, tmp = node
    source = tmp / "sel.gcode"
    source.write_bytes(SMALL)
    assert request(config, "UPLOAD", source=str(source), path="sel.gcode", select=True)["effective_select"]
    events(subscriber, count("Upload", 1), names=NAMES)
    assert cli(config, "files", "rm", "sel.gcode").returncode == 0
    got = events(subscriber, count("UpdatedFiles", 1), names=NAMES)
    assert [n for n, _ in got] == ["FileDeselected", "FileRemoved", "UpdatedFiles"]     # OctoPrint's order
