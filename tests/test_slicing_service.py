"""The slicing service as a real process beside a real files service and broker: `zevents slice` end to end with
the real slicers, events in OctoPrint's order, failures and cancellation, nothing partial left in storage."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import start_service_process, wait_for
from tests.files_helpers import start_service as start_files, stop_service
from tests.test_slicing import cube_stl, needs
from zevents import bus
from zevents.config import load
from zevents.slicing.service import SlicingClient, endpoint

ZEVENTS = [sys.executable, "-m", "zevents"]
FINAL = ("SlicingDone", "SlicingFailed", "SlicingCancelled")


def write_config(directory: Path, bus_config, slicing: dict | None = None) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "files": {"commands": f"ipc://{directory}/files.sock", "analysis": {"run_at": "never"}, "watch": False},
        "slicing": {"commands": f"ipc://{directory}/slicing.sock", "nice": 5, **(slicing or {})},
        "printer": {"commands": f"ipc://{directory}/printer.sock"},
        "data_dir": str(directory / "data")}))
    return path


def start_slicing(config: Path, bus_config) -> subprocess.Popen:
    return start_service_process(ZEVENTS + ["slicing", "serve", "-c", str(config)], bus_config, "slicing")


@pytest.fixture
def slicing_node(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config)
    subscriber = bus.Subscriber(bus_config, groups=["slicing", "file"])
    files = start_files(config, bus_config)
    slicing = start_slicing(config, bus_config)
    try:
        yield config, subscriber, short_tmp / "data" / "uploads"
    finally:
        stop_service(slicing)
        stop_service(files)
        subscriber.close()


def events_until_final(subscriber, gcode: str, count: int = 1, timeout: float = 120.0) -> list:
    """Every slicing and file event until ``count`` final slicing events for ``gcode`` arrived."""
    got, finals = [], 0
    deadline = time.monotonic() + timeout
    while finals < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no outcome for {gcode}: {[(e.name, e.payload) for e in got]}"
        envelope = subscriber.recv(remaining)
        if envelope is None:
            continue
        got.append(envelope)
        if envelope.name in FINAL and envelope.payload.get("gcode") == gcode:
            finals += 1
    return got


def zevents(config: Path, *args, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run(ZEVENTS + list(args) + ["-c", str(config)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("slicer_id", ["prusaslicer", "slic3r"])
def test_slice_stores_the_gcode_with_the_events_in_order(slicing_node, tmp_path, slicer_id):
    needs(slicer_id)
    config, subscriber, uploads = slicing_node
    model = cube_stl(tmp_path / "cube.stl")
    result = zevents(config, "slice", str(model), "--slicer", slicer_id, "--dest", "sliced/cube.gcode")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sliced/cube.gcode"
    events = events_until_final(subscriber, "sliced/cube.gcode")
    names = [e.name for e in events if e.name != "SlicingProgress"]
    # the model's own upload first, then OctoPrint's slicing order
    assert names[:3] == ["FileAdded", "UpdatedFiles", "Upload"]
    assert names[3:] == ["SlicingStarted", "FileAdded", "UpdatedFiles", "SlicingDone"], names
    started = next(e for e in events if e.name == "SlicingStarted").payload
    assert started == {"slicer": slicer_id, "stl": "cube.stl", "stl_location": "local",
                       "gcode": "sliced/cube.gcode", "gcode_location": "local", "progressAvailable": True}
    progress = [e.payload["progress"] for e in events if e.name == "SlicingProgress"]
    assert progress and progress == sorted(set(progress)) and max(progress) <= 100
    added = [e.payload for e in events if e.name == "FileAdded"][1]
    assert added["path"] == "sliced/cube.gcode" and added["type"] == ["machinecode", "gcode"]
    done = events[-1].payload
    assert done["time"] > 0 and done["gcode"] == "sliced/cube.gcode"
    gcode = (uploads / "sliced" / "cube.gcode").read_text()
    assert gcode.startswith(";Generated from cube.stl (hash: ")
    assert "G1" in gcode
    assert list((Path(load(config).data_dir) / "slicing" / "tmp").iterdir()) == []


def test_a_broken_model_and_one_bigger_than_the_bed_fail_with_reasons(slicing_node, tmp_path):
    needs("prusaslicer")
    config, subscriber, uploads = slicing_node
    broken = tmp_path / "broken.stl"
    broken.write_bytes(b"solid x\nendsolid x\n")
    result = zevents(config, "slice", str(broken), "--slicer", "prusaslicer")
    assert result.returncode == 1 and "the mesh is empty" in result.stderr
    failed = [e for e in events_until_final(subscriber, "broken.gcode") if e.name == "SlicingFailed"][0]
    assert "empty" in failed.payload["reason"]
    huge = cube_stl(tmp_path / "huge.stl", 500)
    result = zevents(config, "slice", str(huge), "--slicer", "prusaslicer")
    assert result.returncode == 1 and "larger than the build volume" in result.stderr
    failed = [e for e in events_until_final(subscriber, "huge.gcode") if e.name == "SlicingFailed"][0]
    assert failed.payload["slicer"] == "prusaslicer" and "500 × 500 × 500" in failed.payload["reason"]
    assert sorted(p.name for p in uploads.iterdir() if not p.name.startswith(".")) == ["broken.stl", "huge.stl"]


def test_a_file_that_is_not_a_model_is_refused_before_anything(slicing_node, tmp_path):
    config, subscriber, uploads = slicing_node
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = zevents(config, "slice", str(text))
    assert result.returncode == 2 and "not a model file" in result.stderr
    assert subscriber.recv(0.5) is None


@contextlib.contextmanager
def node_with_slow_prusaslicer(short_tmp, bus_config, tmp_path, **slicing):
    """Files and slicing services whose 'prusaslicer' reports 10 % and then hangs (to cancel or time out)."""
    slow = tmp_path / "slow-slicer"
    slow.write_text("#!/bin/sh\necho '10 => Processing triangulated mesh'\nexec sleep 300\n")
    slow.chmod(0o755)
    config = write_config(short_tmp, bus_config, {"prusaslicer": {"path": str(slow)}, **slicing})
    subscriber = bus.Subscriber(bus_config, groups=["slicing"])
    files = start_files(config, bus_config)
    slicing_process = start_slicing(config, bus_config)
    client = SlicingClient(endpoint(load(config)))
    try:
        assert zevents(config, "files", "upload", str(cube_stl(tmp_path / "cube.stl"))).returncode == 0
        yield config, subscriber, client
    finally:
        client.close()
        stop_service(slicing_process)
        stop_service(files)
        subscriber.close()


def wait_progress(subscriber, gcode: str):
    def seen():
        envelope = subscriber.recv(0.2)
        return envelope is not None and envelope.name == "SlicingProgress" and envelope.payload["gcode"] == gcode
    wait_for(seen, 60, message=f"progress of {gcode}")


def test_a_second_job_for_the_same_destination_cancels_the_first(short_tmp, bus_config, running_broker, tmp_path):
    """The first job hangs; the second (real Slic3r) replaces it, goes on, and is still tracked afterwards."""
    needs("slic3r")
    with node_with_slow_prusaslicer(short_tmp, bus_config, tmp_path) as (config, subscriber, client):
        first = client.request("SLICE", {"model": "cube.stl", "slicer": "prusaslicer", "dest": "out.gcode"},
                               timeout=30)
        wait_progress(subscriber, "out.gcode")
        second = client.request("SLICE", {"model": "cube.stl", "slicer": "slic3r", "dest": "out.gcode"},
                                timeout=30)
        assert first["job"] != second["job"]
        events = events_until_final(subscriber, "out.gcode", count=2)
        status = client.request("STATUS", {}, timeout=10)
    named = [(e.name, e.payload["slicer"]) for e in events if e.name != "SlicingProgress"]
    assert named == [("SlicingStarted", "slic3r"), ("SlicingCancelled", "prusaslicer"),
                     ("SlicingDone", "slic3r")], named
    assert status["jobs"] == []
    assert (short_tmp / "data" / "uploads" / "out.gcode").read_text().startswith(";Generated from cube.stl")


def test_cancel_from_the_cli_and_a_timeout(short_tmp, bus_config, running_broker, tmp_path):
    with node_with_slow_prusaslicer(short_tmp, bus_config, tmp_path, timeout=3) as (config, subscriber, client):
        client.request("SLICE", {"model": "cube.stl", "slicer": "prusaslicer", "dest": "a.gcode"}, timeout=30)
        wait_progress(subscriber, "a.gcode")
        cancelled = zevents(config, "slice", "cancel", "a.gcode")
        assert cancelled.returncode == 0, cancelled.stderr
        assert events_until_final(subscriber, "a.gcode")[-1].name == "SlicingCancelled"
        assert zevents(config, "slice", "cancel", "a.gcode").returncode == 1
        client.request("SLICE", {"model": "cube.stl", "slicer": "prusaslicer", "dest": "b.gcode"}, timeout=30)
        failed = events_until_final(subscriber, "b.gcode")[-1]
    assert failed.name == "SlicingFailed" and "did not finish within 3 s" in failed.payload["reason"]
    assert not (short_tmp / "data" / "uploads" / "a.gcode").exists()
    assert not (short_tmp / "data" / "uploads" / "b.gcode").exists()


def test_profile_cli_publishes_added_modified_deleted(short_tmp, bus_config, running_broker, tmp_path):
    config = write_config(short_tmp, bus_config)
    ini = tmp_path / "fast.ini"
    ini.write_text("layer_height = 0.3\n")
    with bus.Subscriber(bus_config, groups=["slicing"]) as subscriber:
        assert zevents(config, "slicing", "profile", "add", "slic3r", "Fast", str(ini)).stdout.strip() == "Fast"
        assert zevents(config, "slicing", "profile", "add", "slic3r", "Fast", str(ini), "--set",
                       "fill_density=10%").returncode == 0
        listed = zevents(config, "slicing", "profile", "ls", "slic3r")
        assert listed.stdout.strip() == "slic3r       Fast  (default)"
        assert "fill_density = 10%" in zevents(config, "slicing", "profile", "show", "slic3r", "Fast").stdout
        assert zevents(config, "slicing", "profile", "rm", "slic3r", "Fast").returncode == 0
        missing = zevents(config, "slicing", "profile", "rm", "slic3r", "Fast")
        assert missing.returncode == 2 and "no slic3r profile 'Fast'" in missing.stderr
        events = [subscriber.recv(10) for _ in range(3)]
    assert [(e.name, e.payload) for e in events] == [
        ("SlicingProfileAdded", {"slicer": "slic3r", "profile": "Fast"}),
        ("SlicingProfileModified", {"slicer": "slic3r", "profile": "Fast"}),
        ("SlicingProfileDeleted", {"slicer": "slic3r", "profile": "Fast"}),
    ]


def test_the_sliced_gcode_is_analysed_by_the_files_service(short_tmp, bus_config, running_broker, tmp_path):
    needs("prusaslicer")
    config = write_config(short_tmp, bus_config)
    data = yaml.safe_load(config.read_text())
    data["files"]["analysis"] = {"run_at": "always"}
    config.write_text(yaml.safe_dump(data))
    subscriber = bus.Subscriber(bus_config, groups=["file"])
    files = start_files(config, bus_config)
    slicing = start_slicing(config, bus_config)
    try:
        result = zevents(config, "slice", str(cube_stl(tmp_path / "cube.stl")), "--slicer", "prusaslicer")
        assert result.returncode == 0, result.stderr

        def analysed():
            envelope = subscriber.recv(0.5)
            return envelope is not None and envelope.name == "MetadataAnalysisFinished" and \
                envelope.payload["path"] == "cube.gcode" and envelope.payload
        payload = wait_for(analysed, 120, message="the analysis of cube.gcode")
    finally:
        stop_service(slicing)
        stop_service(files)
        subscriber.close()
    result_ = payload["result"]
    assert result_["estimatedPrintTime"] > 0
    assert result_["filament"]["tool0"]["length"] > 0
    # the G-code was sliced for the printer's profile, so it fits it
    assert result_["printerProfile"] == "_default" and result_["outsideVolume"] is False


def test_a_missing_slicer_or_profile_is_a_slicing_failed_with_its_reason(slicing_node, tmp_path):
    config, subscriber, uploads = slicing_node
    model = cube_stl(tmp_path / "cube.stl")
    unknown = zevents(config, "slice", str(model), "--slicer", "simplify3d")
    assert unknown.returncode == 2 and "unknown slicer 'simplify3d'" in unknown.stderr
    failed = [e for e in events_until_final(subscriber, "cube.gcode") if e.name == "SlicingFailed"][0]
    assert failed.payload["slicer"] == "simplify3d" and "unknown slicer" in failed.payload["reason"]
    if not slicers_installed("prusaslicer"):
        return
    missing = zevents(config, "slice", str(model), "--slicer", "prusaslicer", "--profile", "nope",
                      "--dest", "other.gcode")
    assert missing.returncode == 2 and "no prusaslicer profile 'nope'" in missing.stderr
    failed = [e for e in events_until_final(subscriber, "other.gcode") if e.name == "SlicingFailed"][0]
    assert "no prusaslicer profile 'nope'" in failed.payload["reason"]
    assert not (uploads / "other.gcode").exists()


def slicers_installed(slicer_id: str) -> bool:
    from zevents.slicing import slicers

    return slicers.find(slicer_id, with_version=False).available
