"""The timelapse as processes: `zevents run --demo` filming the virtual print with the virtual camera, the service
killed with kill -9 in the middle of a render, and the CLI (`zevents timelapse ls|render|rm`, `zevents snapshot`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import collect, wait_for
from timelapse_helpers import Camera, probe, write_frames

from zevents import bus, config as zconfig
from zevents.timelapse import store

pytestmark = pytest.mark.skipif(not __import__("shutil").which("ffmpeg"), reason="ffmpeg is not installed")
ZEVENTS = [sys.executable, "-m", "zevents"]


def write_config(directory: Path, bus_config=None, **sections) -> Path:
    data = {"data_dir": str(directory / "data"), "printer": {"port": None}}
    if bus_config is not None:
        data["bus"] = {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                       "replay": bus_config.replay, "heartbeat": 0.2}
    data.update(sections)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def captured_job(config, frames, size=(320, 240)):
    job = store.new_job(config, "printer", "part.gcode")
    job.update(job=job.id, printer="printer", gcode="part.gcode", state="captured", render=True, postfix="", fps=25,
               created=1.0)
    write_frames(job, frames, size)
    return job


def ffmpeg_pids(marker: str) -> list:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"ffmpeg" in cmdline and marker.encode() in cmdline and state != "Z":
                pids.append(int(entry))
    return pids


@pytest.mark.timeout(600)
def test_demo_films_the_virtual_print_one_frame_per_layer(short_tmp):
    from zevents import demo
    from zevents.printer.virtual.camera import Toolpath

    node = f"tl{uuid.uuid4().hex[:8]}"
    path = write_config(short_tmp, bus={"node": node}, printer={"port": "VIRTUAL"})
    result = subprocess.run(ZEVENTS + ["run", "--demo", "-q", "-c", str(path)], capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("zevents demo: timelapse of the demo print: "), result.stdout[-2000:]
    movie = Path(last.rsplit(": ", 1)[1])
    layers = len(Toolpath(str(demo.sample_file(short_tmp / "data"))).layer_offsets)
    assert layers == 100
    assert probe(movie) == {"frames": layers, "duration": layers / 25}
    assert Path(f"{movie}.thumb.jpg").exists() and store.jobs(zconfig.load(path)) == []


@pytest.mark.timeout(600)
def test_service_killed_mid_render_renders_the_whole_movie_after_restart(short_tmp, bus_config, running_broker):
    path = write_config(short_tmp, bus_config)
    config = zconfig.load(path)
    job = captured_job(config, 300, size=(640, 480))
    watch = bus.Subscriber(bus_config, groups=["timelapse"])
    argv = [sys.executable, "-m", "zevents.service", "timelapse", "-c", str(path)]
    service = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        while True:
            envelope = collect(watch, 1, timeout=120)[0]
            assert envelope.name != "MovieDone", "the render finished before it could be killed"
            if envelope.name == "MovieRenderProgress" and envelope.payload["progress"] > 0:
                break
        assert ffmpeg_pids(job.id)
        service.send_signal(signal.SIGKILL)
        service.wait(30)
        wait_for(lambda: not ffmpeg_pids(job.id), timeout=30, message="ffmpeg to die with its service")
        assert job.read()["state"] == "rendering" and store.movies(config) == []
        service = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        done = collect(watch, 1, timeout=300, names={"MovieDone", "MovieFailed"})[0]
    finally:
        service.terminate()
        service.wait(30)
        watch.close()
    assert done.name == "MovieDone", done.payload
    assert probe(done.payload["movie"])["frames"] == 300
    assert [m.name for m in store.movies(config)] == [Path(done.payload["movie"]).name]
    assert not list(store.movie_folder(config, "printer").glob(".*")) and not job.path.exists()


def test_service_waits_for_the_print_to_end_before_rendering(short_tmp, bus_config, running_broker):
    path = write_config(short_tmp, bus_config)
    config = zconfig.load(path)
    publisher = bus.Publisher(bus_config, src="job")
    publisher.publish_confirmed("PrintStarted", {"name": "other.gcode", "path": "/tmp/other.gcode",
                                                 "origin": "local"})
    job = captured_job(config, 5)
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["MovieRendering", "MovieDone"])
    started = bus.Subscriber(bus_config, groups=["sys"], events=["ServiceStarted"])
    service = subprocess.Popen([sys.executable, "-m", "zevents.service", "timelapse", "-c", str(path)],
                               stdin=subprocess.DEVNULL)
    try:
        # it is up (no camera: capture off, renders still served) and has rendered nothing
        collect(started, 1, timeout=120)
        assert watch.recv(timeout=1.0) is None and job.read()["state"] == "captured"
        publisher.publish("PrintDone", {"name": "other.gcode", "path": "/tmp/other.gcode", "origin": "local",
                                        "time": 1.0})
        events = collect(watch, 2, timeout=120)
    finally:
        service.terminate()
        service.wait(30)
        watch.close()
        started.close()
        publisher.close()
    assert [e.name for e in events] == ["MovieRendering", "MovieDone"]
    assert events[0].payload["movie_basename"].startswith(job.id)


def test_cli_ls_render_rm(short_tmp, bus_config):
    path = write_config(short_tmp, bus_config)
    config = zconfig.load(path)
    job = captured_job(config, 10)

    def zevents(*args):
        return subprocess.run(ZEVENTS + list(args) + ["-c", str(path)], capture_output=True, text=True, timeout=300)

    listed = json.loads(zevents("timelapse", "ls", "--json").stdout)
    assert listed["movies"] == [] and [(j["name"], j["count"]) for j in listed["unrendered"]] == [(job.id, 10)]
    rendered = zevents("timelapse", "render", job.id)
    assert rendered.returncode == 0, rendered.stderr
    movie = Path(rendered.stdout.strip())
    assert probe(movie)["frames"] == 10 and not job.path.exists()
    listed = json.loads(zevents("timelapse", "ls", "--json").stdout)
    assert [m["name"] for m in listed["movies"]] == [movie.name] and listed["unrendered"] == []
    assert listed["movies"][0]["thumbnail"] == f"{movie}.thumb.jpg"
    assert zevents("timelapse", "rm", movie.name).returncode == 0
    assert not movie.exists() and not Path(f"{movie}.thumb.jpg").exists()
    missing = zevents("timelapse", "rm", "nothing-here")
    assert missing.returncode == 2 and "no movie or unrendered timelapse" in missing.stderr
    other = captured_job(config, 2)
    assert zevents("timelapse", "rm", other.id).returncode == 0 and not other.path.exists()


def test_cli_snapshot(short_tmp):
    camera = Camera(lambda n: "good" if n == 1 else "html")
    try:
        path = write_config(short_tmp, plugins={"classicwebcam": {"snapshot": camera.url}},
                            timelapse={"retries": 0})
        out = short_tmp / "frame.jpg"
        good = subprocess.run(ZEVENTS + ["snapshot", "--out", str(out), "-c", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert good.returncode == 0, good.stderr
        assert out.read_bytes().startswith(b"\xff\xd8")
        bad = subprocess.run(ZEVENTS + ["snapshot", "--out", str(out), "-c", str(path)], capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 1 and "not a JPEG or PNG image" in bad.stderr
    finally:
        camera.close()


def children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, ValueError):
                continue
    return found


def capture_processes(pid: int) -> list:
    """The service's multiprocessing children that run capture (not its resource tracker)."""
    found = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


@pytest.mark.timeout(600)
def test_capture_process_killed_mid_print_resumes_the_same_job(short_tmp, bus_config, running_broker):
    camera = Camera()
    path = write_config(short_tmp, bus_config, timelapse={"cameras": [{"name": "c", "snapshot": camera.url}]})
    config = zconfig.load(path)
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["CaptureDone", "MovieDone", "MovieFailed"])
    started = bus.Subscriber(bus_config, groups=["sys"], events=["ServiceStarted"])
    publisher = bus.Publisher(bus_config, src="job")
    service = subprocess.Popen([sys.executable, "-m", "zevents.service", "timelapse", "-c", str(path)],
                               stdin=subprocess.DEVNULL)
    job_payload = {"name": "k.gcode", "path": "/tmp/k.gcode", "origin": "local"}
    try:
        collect(started, 1, timeout=120)
        publisher.publish("PrintStarted", job_payload)
        for layer in (1, 2, 3):
            publisher.publish("LayerChanged", {"layer": layer, "z": layer * 0.2, "old_z": None})
        first = collect(watch, 3, timeout=60)
        (capture_pid,) = capture_processes(service.pid)
        os.kill(capture_pid, signal.SIGKILL)
        wait_for(lambda: [p for p in capture_processes(service.pid) if p != capture_pid], timeout=60,
                 message="a new capture process")
        # resumed (its subscriber is up by then: what is published next reaches it)
        wait_for(lambda: any(j.read().get("resumed") for j in store.jobs(config)), timeout=60,
                 message="the job resumed")
        for layer in (4, 5):
            publisher.publish("LayerChanged", {"layer": layer, "z": layer * 0.2, "old_z": None})
        second = collect(watch, 2, timeout=60)
        publisher.publish("PrintDone", dict(job_payload, time=1.0))
        done = collect(watch, 1, timeout=120, names={"MovieDone", "MovieFailed"})[0]
    finally:
        service.terminate()
        service.wait(30)
        for sub in (watch, started):
            sub.close()
        publisher.close()
        camera.close()
    folders = {Path(e.payload["file"]).parent for e in first + second}
    assert len(folders) == 1                       # the same job before and after the kill
    assert done.name == "MovieDone" and probe(done.payload["movie"])["frames"] == 5
