"""The files service as a real process against a real broker: every operation's events in OctoPrint's order and
payloads (reference-behaviour.md 2.2), bad input refused with nothing changed, print history, the CLI."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from zevents import bus
from zevents.printer.channel import ChannelError

from files_helpers import cli, count, events, request, start_service, stop_service, write_config

GCODE = b"G28\nG1 X10 Y10 Z0.2 F3000\nG1 X20 Y10 E1.5 F1200\nG1 X20 Y20 E3.0\n"
GC = ["machinecode", "gcode"]


@pytest.fixture
def files_node(short_tmp, bus_config, running_broker):
    """A running files service (analysis never runs, so only operation events are on the bus)."""
    config = write_config(short_tmp, bus_config, files={"analysis": {"run_at": "never"}})
    subscriber = bus.Subscriber(bus_config, groups=["file"])
    process = start_service(config, bus_config)
    try:
        yield config, subscriber, short_tmp / "data" / "uploads"
    finally:
        stop_service(process)
        subscriber.close()


def snapshot(root: Path) -> dict:
    """Every file and folder under root (metadata included) with its bytes: to prove that nothing changed."""
    out = {}
    for directory, folders, files in os.walk(root):
        for name in folders:
            out[os.path.relpath(os.path.join(directory, name), root) + "/"] = None
        for name in files:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def visible(root: Path) -> list:
    """The stored files and folders, without the hidden metadata and lock files."""
    return sorted(p for p in snapshot(root) if not os.path.basename(p.rstrip("/")).startswith("."))


def upload(config, tmp: Path, name: str, path: str | None = None, data: bytes = GCODE, **args) -> dict:
    source = tmp / "src" / name
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    return request(config, "UPLOAD", source=str(source), path=path or name, **args)


def file_event(operation, path, kind=GC):
    return {"storage": "local", "path": path, "name": path.rpartition("/")[2], "type": kind, "operation": operation}


UPDATED = ("UpdatedFiles", {"type": "printables"})


def test_upload_fires_file_added_updated_files_then_upload(files_node, short_tmp):
    config, sub, uploads = files_node
    reply = upload(config, short_tmp, "cube.gcode", "parts/cube.gcode", userdata={"k": 1})
    assert reply["path"] == "parts/cube.gcode" and reply["effective_select"] is False
    got = events(sub, count("Upload", 1))
    assert got == [("FileAdded", file_event("add", "parts/cube.gcode")), UPDATED,
                   ("Upload", {"name": "cube.gcode", "path": "parts/cube.gcode", "target": "local", "select": False,
                               "print": False, "effective_select": False, "effective_print": False,
                               "userdata": {"k": 1}})]
    assert (uploads / "parts" / "cube.gcode").read_bytes() == GCODE
    metadata = json.loads((uploads / "parts" / ".metadata.json").read_text())
    assert metadata["cube.gcode"]["hash"] and metadata["cube.gcode"]["userdata"] == {"k": 1}


def test_model_upload_has_the_model_type(files_node, short_tmp):
    config, sub, _ = files_node
    upload(config, short_tmp, "part.stl", data=b"solid x\nendsolid x\n")
    assert events(sub, count("FileAdded", 1))[0] == ("FileAdded", file_event("add", "part.stl", ["model", "stl"]))


def test_copy_move_remove_files_in_octoprint_order(files_node, short_tmp):
    config, sub, uploads = files_node
    upload(config, short_tmp, "a.gcode")
    events(sub, count("Upload", 1))
    request(config, "MKDIR", path="dir")
    assert events(sub, count("UpdatedFiles", 1)) == [
        ("FolderAdded", {"storage": "local", "path": "dir", "name": "dir"}), UPDATED]
    assert request(config, "COPY", source="a.gcode", destination="dir")["path"] == "dir/a.gcode"
    assert events(sub, count("UpdatedFiles", 1)) == [("FileAdded", file_event("copy", "dir/a.gcode")), UPDATED]
    assert request(config, "MOVE", source="dir/a.gcode", destination="b.gcode")["path"] == "b.gcode"
    assert events(sub, count("UpdatedFiles", 1)) == [
        ("FileRemoved", file_event("move", "dir/a.gcode")), ("FileAdded", file_event("move", "b.gcode")),
        ("FileMoved", {"storage": "local", "source_path": "dir/a.gcode", "source_name": "a.gcode",
                       "source_type": GC, "destination_path": "b.gcode", "destination_name": "b.gcode",
                       "destination_type": GC}), UPDATED]
    request(config, "REMOVE", path="b.gcode")
    assert events(sub, count("UpdatedFiles", 1)) == [("FileRemoved", file_event("remove", "b.gcode")), UPDATED]
    assert visible(uploads) == ["a.gcode", "dir/"]
    assert "b.gcode" not in json.loads((uploads / ".metadata.json").read_text())


def test_folder_copy_move_remove_in_octoprint_order(files_node, short_tmp):
    config, sub, uploads = files_node
    upload(config, short_tmp, "x.gcode", "f/x.gcode")
    events(sub, count("Upload", 1))
    request(config, "COPY", source="f", destination="g")
    assert events(sub, count("UpdatedFiles", 1)) == [
        ("FolderAdded", {"storage": "local", "path": "g", "name": "g"}), UPDATED]
    assert (uploads / "g" / "x.gcode").read_bytes() == GCODE
    request(config, "MOVE", source="g", destination="f")       # an existing folder: into it
    assert events(sub, count("UpdatedFiles", 1)) == [
        ("FolderRemoved", {"storage": "local", "path": "g", "name": "g"}),
        ("FolderAdded", {"storage": "local", "path": "f/g", "name": "g"}),
        ("FolderMoved", {"storage": "local", "source_path": "g", "source_name": "g", "destination_path": "f/g",
                         "destination_name": "g"}), UPDATED]
    with pytest.raises(ChannelError, match="not empty"):
        request(config, "RMDIR", path="f")
    request(config, "RMDIR", path="f", recursive=True)
    # OctoPrint: only FolderRemoved, no FileRemoved per file inside
    assert events(sub, count("UpdatedFiles", 1)) == [
        ("FolderRemoved", {"storage": "local", "path": "f", "name": "f"}), UPDATED]
    assert not (uploads / "f").exists()


BAD = [
    ("UPLOAD", {"path": "../evil.gcode"}, "'..' is not allowed", "invalid"),
    ("UPLOAD", {"path": "/etc/evil.gcode"}, "absolute paths", "invalid"),
    ("UPLOAD", {"path": "a\0b.gcode"}, "NUL", "invalid"),
    ("UPLOAD", {"path": "a\nb.gcode"}, "control character", "invalid"),
    ("UPLOAD", {"path": "x" * 300 + ".gcode"}, "the file system allows", "invalid"),
    ("UPLOAD", {"path": "notes.txt"}, "neither G-code", "unsupported_type"),
    ("UPLOAD", {"path": ".hidden.gcode"}, "hidden", "invalid"),
    ("UPLOAD", {"path": "keep.gcode", "overwrite": False}, "already exists", "exists"),
    ("UPLOAD", {"path": "keep.gcode/inner.gcode"}, "is a file", "exists"),
    ("COPY", {"source": "keep.gcode", "destination": "folder/keep.gcode"}, "already exists", "exists"),
    ("COPY", {"source": "keep.gcode", "destination": "../keep.gcode"}, "'..'", "invalid"),
    ("COPY", {"source": "keep.gcode", "destination": "keep.stl"}, "type", "unsupported_type"),
    ("MOVE", {"source": "folder", "destination": "folder/sub"}, "inside itself", "invalid"),
    ("MOVE", {"source": "missing.gcode", "destination": "x.gcode"}, "no such file", "not_found"),
    ("REMOVE", {"path": "folder/../../keep.gcode"}, "'..'", "invalid"),
    ("REMOVE", {"path": "folder"}, "no such file", "not_found"),
    ("MKDIR", {"path": "folder"}, "already exists", "exists"),
    ("RMDIR", {"path": "keep.gcode"}, "no such folder", "not_found"),
    ("LIST", {"path": "../.."}, "'..'", "invalid"),
    ("INFO", {"path": "nothing.gcode"}, "no such file", "not_found"),
]


def test_bad_input_is_refused_and_changes_nothing(files_node, short_tmp):
    config, sub, uploads = files_node
    upload(config, short_tmp, "keep.gcode")
    upload(config, short_tmp, "keep.gcode", "folder/keep.gcode")
    events(sub, count("Upload", 2))
    source = short_tmp / "src" / "keep.gcode"
    before = snapshot(uploads)
    for command, args, message, code in BAD:
        if command == "UPLOAD":
            args = dict(args, source=str(source) if not args["path"].endswith(".txt") else str(short_tmp / "n.txt"))
            Path(args["source"]).write_bytes(b"G28\n")
        with pytest.raises(ChannelError, match=message) as refused:
            request(config, command, **args)
        assert refused.value.reply["code"] == code, (command, args)    # what a gateway maps to an HTTP status
        assert snapshot(uploads) == before, (command, args)
    assert source.exists()   # a refused upload keeps its source
    request(config, "MKDIR", path="sentinel")   # the next event on the bus is this one: no refusal fired any
    assert events(sub, count("UpdatedFiles", 1))[0][0] == "FolderAdded"


def test_unicode_names_are_kept_as_they_are(files_node, short_tmp):
    config, sub, uploads = files_node
    name = "Ünïcødé 雪 ☃ (final) v2.gcode"
    upload(config, short_tmp, "u.gcode", f"Ordner é/{name}")
    assert events(sub, count("FileAdded", 1))[0][1]["path"] == f"Ordner é/{name}"
    assert (uploads / "Ordner é" / name).read_bytes() == GCODE
    listed = request(config, "LIST", path="Ordner é")["files"]
    assert [entry["name"] for entry in listed] == [name]


def test_print_history_from_print_done_and_failed(files_node, short_tmp, bus_config):
    config, sub, uploads = files_node
    upload(config, short_tmp, "h.gcode", "p/h.gcode")
    events(sub, count("Upload", 1))
    disk = str(uploads / "p" / "h.gcode")
    job = {"name": "h.gcode", "path": disk, "origin": "local", "size": len(GCODE), "owner": None}
    with bus.Publisher(bus_config, src="job") as publisher:
        publisher.publish("PrintStarted", dict(job, user=None))
        publisher.publish("PrintDone", dict(job, time=100.0))
        publisher.publish("PrintStarted", dict(job, user=None))
        publisher.publish("PrintFailed", dict(job, time=5.0, reason="cancelled"))
        publisher.publish("PrintStarted", dict(job, user=None))
        publisher.publish("PrintDone", dict(job, time=200.0))
    got = events(sub, count("MetadataStatisticsUpdated", 3))
    assert got[-1] == ("MetadataStatisticsUpdated", {"storage": "local", "path": "p/h.gcode"})
    info = request(config, "INFO", path="p/h.gcode")["file"]
    assert [h["success"] for h in info["history"]] == [True, False, True]
    assert "printTime" not in info["history"][1]          # OctoPrint records no time for a failure
    assert info["statistics"] == {"averagePrintTime": {"_default": 150.0}, "lastPrintTime": {"_default": 200.0}}
    assert info["prints"]["success"] == 2 and info["prints"]["failure"] == 1
    text = cli(config, "files", "info", "p/h.gcode")
    assert text.returncode == 0 and "average print time (_default): 150.0 s" in text.stdout


def test_the_file_being_printed_cannot_be_removed_moved_or_replaced(files_node, short_tmp, bus_config):
    config, sub, uploads = files_node
    upload(config, short_tmp, "busy.gcode", "d/busy.gcode")
    events(sub, count("Upload", 1))
    job = {"name": "busy.gcode", "path": str(uploads / "d" / "busy.gcode"), "origin": "local", "size": 1,
           "owner": None}
    with bus.Publisher(bus_config, src="job") as publisher:
        publisher.publish("PrintStarted", dict(job, user=None))
    from conftest import wait_for

    wait_for(lambda: request(config, "STATUS")["printing"] == "d/busy.gcode", message="the print to be seen")
    before = snapshot(uploads)
    for command, args in [("REMOVE", {"path": "d/busy.gcode"}), ("MOVE", {"source": "d/busy.gcode",
                                                                          "destination": "x.gcode"}),
                          ("RMDIR", {"path": "d", "recursive": True}), ("MOVE", {"source": "d", "destination": "e"})]:
        with pytest.raises(ChannelError, match="being printed"):
            request(config, command, **args)
    with pytest.raises(ChannelError, match="being printed"):
        upload(config, short_tmp, "busy.gcode", "d/busy.gcode", data=b"G28\n")
    assert snapshot(uploads) == before
    with bus.Publisher(bus_config, src="job") as publisher:
        publisher.publish("PrintDone", dict(job, time=1.0))
    events(sub, count("MetadataStatisticsUpdated", 1))
    request(config, "REMOVE", path="d/busy.gcode")


def test_cli_commands(files_node, short_tmp):
    config, sub, uploads = files_node
    source = short_tmp / "cli.gcode"
    source.write_bytes(GCODE)
    assert cli(config, "files", "upload", str(source), "--path", "c").returncode == 0
    assert cli(config, "files", "mkdir", "m").returncode == 0
    assert cli(config, "files", "cp", "c/cli.gcode", "m").returncode == 0
    assert cli(config, "files", "mv", "m/cli.gcode", "m/renamed.gcode").returncode == 0
    listing = json.loads(cli(config, "files", "ls", "--recursive", "--json").stdout)
    assert [(e["name"], [c["name"] for c in e["children"]]) for e in listing] == [("c", ["cli.gcode"]),
                                                                                 ("m", ["renamed.gcode"])]
    info = json.loads(cli(config, "files", "info", "m/renamed.gcode", "--json").stdout)
    assert info["size"] == len(GCODE) and info["typePath"] == GC
    refused = cli(config, "files", "rm", "../../etc/passwd")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "'..'" in refused.stderr
    assert cli(config, "files", "rm", "m/renamed.gcode").returncode == 0
    assert cli(config, "files", "rmdir", "m").returncode == 0
    assert cli(config, "files", "upload", str(short_tmp / "missing.gcode")).returncode == 2
    assert visible(uploads) == ["c/", "c/cli.gcode"]


def test_cli_without_a_running_service_says_so(short_tmp, bus_config):
    config = write_config(short_tmp, bus_config)
    result = cli(config, "files", "ls")
    assert result.returncode == 1 and "files service is not running" in result.stderr


def test_zevents_run_plans_the_files_service_unless_disabled(tmp_path):
    from zevents import config as zconfig
    from zevents.node import plan_services

    assert "files" in plan_services(zconfig.load(text=""))
    assert "files" not in plan_services(zconfig.load(text="files:\n  enabled: false\n"))


def test_config_check_names_the_bad_files_key(tmp_path, zevents_cmd):
    import subprocess

    path = tmp_path / "bad.yaml"
    path.write_text("files:\n  poll_watched: true\n  analysis:\n    run_at: sometimes\n")
    result = subprocess.run(zevents_cmd + ["config", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "bad.yaml" in result.stderr and ":4" in result.stderr and "run_at" in result.stderr


def test_upload_with_select_and_no_printer_link_is_done_without_selecting(files_node, short_tmp):
    config, sub, uploads = files_node
    reply = upload(config, short_tmp, "s.gcode", select=True, _timeout=10)
    assert reply["effective_select"] is False and (uploads / "s.gcode").exists()
    got = events(sub, count("Upload", 1))
    assert got[-1][1]["select"] is True and got[-1][1]["effective_select"] is False


def test_a_second_service_on_the_same_uploads_refuses_to_start(files_node):
    import subprocess

    config, sub, uploads = files_node
    second = subprocess.run([sys.executable, "-m", "zevents", "files", "serve", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "another files service is using" in second.stderr
    assert request(config, "STATUS")["uploads"] == str(uploads)     # the first one still answers
