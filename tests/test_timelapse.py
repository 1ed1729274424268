"""The timelapse: configuration (OctoPrint's webcam: section unchanged), camera sources against real HTTP servers
and commands, the capture process's events and frames on a real broker, rendering with the real ffmpeg (checked
with ffprobe), and renders that survive ffmpeg being killed."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from conftest import DATA, collect, wait_for
from timelapse_helpers import Camera, every, probe, write_frames

from zevents import bus, config as zconfig
from zevents.timelapse import capture, render, settings as tl_settings, sources, store

pytestmark = pytest.mark.skipif(not (os.path.exists("/usr/bin/ffmpeg") or __import__("shutil").which("ffmpeg")),
                                reason="ffmpeg is not installed (.ci/run installs it)")


def make_config(tmp_path, bus_config=None, **timelapse):
    text = f"data_dir: {tmp_path}/data\nprinter: {{port: null}}\n"
    config = zconfig.load(text=text)
    if bus_config is not None:
        config = zconfig.from_bus(bus_config, data_dir=str(tmp_path / "data"), printer={"port": None})
    config.data["timelapse"].update(timelapse)
    return config


# --- configuration ------------------------------------------------------------------------------------------------

def test_octoprint_webcam_section_from_a_real_config_yaml_loads_unchanged():
    config = zconfig.load(DATA / "octoprint_webcam_config.yaml")
    settings = tl_settings.resolve(config)
    assert settings.modes == ("zchange",)
    assert (settings.fps, settings.post_roll, settings.render_after, settings.zhop) == (30, 2, "success", 0.4)
    assert settings.bitrate == "5000k" and settings.ffmpeg == "/usr/bin/ffmpeg"
    camera = settings.camera_for(None)
    assert camera.snapshot == "http://127.0.0.1:8080/?action=snapshot" and camera.timeout == 3
    assert zconfig.check(DATA / "octoprint_webcam_config.yaml") == []


def test_older_octoprint_snapshot_keys_and_a_bare_off(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("webcam:\n  snapshot: http://cam.local/snap.jpg\n  snapshotTimeout: 7\n"
                    "  timelapse:\n    type: off\n    options: {interval: 3}\n")
    settings = tl_settings.resolve(zconfig.load(path))
    assert settings.camera_for("any").snapshot == "http://cam.local/snap.jpg"
    assert settings.camera_for("any").timeout == 7
    assert settings.modes == ("layer",)      # off in OctoPrint's terms: our layer mode, a camera being configured


def test_config_check_names_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("webcam:\n  timelapse:\n    fps: 0\n    type: sometimes\n  ffmpegThreads: 0\n"
                    "timelapse:\n  nice: 40\n  retries: many\n")
    problems = {(p.line, p.key) for p in zconfig.check(path)}
    assert {(3, "webcam.timelapse.fps"), (4, "webcam.timelapse.type"), (5, "webcam.ffmpegThreads"),
            (7, "timelapse.nice"), (8, "timelapse.retries")} <= problems
    # the section checks (run once every type is right)
    path.write_text("timelapse:\n  modes: [layer, weekly]\n  cameras:\n    - name: a\n      snapshot: ftp://x\n"
                    "    - name: b\n      command: []\nplugins:\n  classicwebcam:\n    snapshotTimeout: -1\n"
                    "  othersplugin: {anything: 1}\n")
    problems = {(p.line, p.key) for p in zconfig.check(path)}
    assert {(2, "timelapse.modes.1"), (5, "timelapse.cameras.0.snapshot"), (6, "timelapse.cameras.1"),
            (10, "plugins.classicwebcam.snapshotTimeout")} <= problems
    assert not any(key.startswith("plugins.othersplugin") for _, key in problems)


def test_node_plans_the_timelapse_and_the_virtual_camera():
    from zevents import node

    config = zconfig.load(text="")
    assert {"camera", "timelapse"} <= set(node.plan_services(config))
    config.data["printer"]["port"] = "/dev/ttyACM0"
    assert "camera" not in node.plan_services(config)
    config.data["timelapse"]["enabled"] = False
    assert "timelapse" not in node.plan_services(config)


# --- sources ------------------------------------------------------------------------------------------------------

def grab(camera, **kw):
    return sources.snapshot_once(tl_settings.Camera(name="t", **kw), min_bytes=100, max_bytes=kw.pop("max", 2_000_000))


@pytest.mark.parametrize("kind, message", [
    ("html", "not a JPEG or PNG image"), ("empty", "0 bytes"), ("error", "HTTP 500"),
    ("truncated", "truncated JPEG"), ("hang", "within 0.5 s"), ("stream", "more than max_frame_bytes"),
])
def test_a_bad_answer_is_a_failed_frame(kind, message):
    camera = Camera(lambda n: kind)
    try:
        with pytest.raises(sources.FrameError, match=message):
            sources.snapshot_once(tl_settings.Camera(name="t", snapshot=camera.url, timeout=0.5, retries=0),
                                  max_bytes=1_000_000)
    finally:
        camera.close()


def test_retries_with_backoff_then_a_good_frame_and_png_becomes_jpeg():
    camera = Camera(lambda n: {1: "html", 2: "empty"}.get(n, "png"))
    try:
        data = sources.snapshot_once(tl_settings.Camera(name="t", snapshot=camera.url, retries=2, retry_backoff=0.01))
        assert sources.image_kind(data) == "jpeg" and camera.requests == 3
    finally:
        camera.close()


@pytest.mark.parametrize("auth", ["basic", "digest"])
def test_camera_auth(auth):
    camera = Camera(auth=auth)
    try:
        good = tl_settings.Camera(name="t", snapshot=camera.url, auth=auth, username="cam", password="secret",
                                  retries=0)
        assert sources.image_kind(sources.snapshot_once(good)) == "jpeg"
        wrong = tl_settings.Camera(name="t", snapshot=camera.url, auth=auth, username="cam", password="nope",
                                   retries=0)
        with pytest.raises(sources.FrameError, match="HTTP 401"):
            sources.snapshot_once(wrong)
    finally:
        camera.close()


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="no openssl to make a certificate")
def test_https_camera_with_and_without_certificate_validation(tmp_path):
    from timelapse_helpers import self_signed

    camera = Camera(tls=self_signed(tmp_path))
    try:
        assert camera.url.startswith("https://")
        with pytest.raises(sources.FrameError, match="(?i)certificate"):
            sources.snapshot_once(tl_settings.Camera(name="t", snapshot=camera.url, retries=0))
        unchecked = tl_settings.Camera(name="t", snapshot=camera.url, retries=0, ssl_validation=False)
        assert sources.image_kind(sources.snapshot_once(unchecked)) == "jpeg"
    finally:
        camera.close()


def test_command_camera_and_its_timeout(tmp_path):
    image = tmp_path / "f.jpg"
    from timelapse_helpers import jpeg

    image.write_bytes(jpeg(1))
    good = tl_settings.Camera(name="c", command=[sys.executable, "-c", f"import sys; sys.stdout.buffer.write("
                                                 f"open({str(image)!r}, 'rb').read())"], retries=0)
    assert sources.snapshot_once(good) == image.read_bytes()
    pid_file = tmp_path / "pid"
    hung = tl_settings.Camera(name="h", command=[sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, "
                                                 "'w').write(str(os.getpid())); time.sleep(60)"],
                              timeout=1.0, retries=0)
    with pytest.raises(sources.FrameError, match="did not finish within 1 s"):
        sources.snapshot_once(hung)
    pid = int(pid_file.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", message="the hung command killed")
    failing = tl_settings.Camera(name="f", command=[sys.executable, "-c", "import sys; sys.exit('no camera')"],
                                 retries=0)
    with pytest.raises(sources.FrameError, match="exited with 1: no camera"):
        sources.snapshot_once(failing)


# --- capture on a real broker -------------------------------------------------------------------------------------

class CaptureThread:
    """The capture loop of the capture process, on a thread of the test (same code, stop by event)."""

    def __init__(self, config):
        self.stop, ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=capture.run, args=(config, None, self.stop, ready), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the capture loop did not start"

    def close(self):
        self.stop.set()
        self.thread.join(20)


def capture_setup(tmp_path, bus_config, answer, retries=0, **extra):
    camera = Camera(answer)
    config = make_config(tmp_path, bus_config, cameras=[{"name": "cam", "snapshot": camera.url, "timeout": 0.5,
                                                          "retries": retries}], **extra)
    return camera, config


def print_layers(publisher, layers: int, name="cube.gcode", done=True, watch=None):
    publisher.publish("PrintStarted", {"name": name, "path": f"/tmp/{name}", "origin": "local"})
    for layer in range(1, layers + 1):
        publisher.publish("LayerChanged", {"layer": layer, "z": layer * 0.2, "old_z": None})
        if watch is not None:   # one layer at a time: the camera's request counter follows the layers
            collect(watch, 1, names={"CaptureDone", "CaptureFailed"})
    publisher.publish("PrintDone" if done else "PrintFailed", {"name": name, "path": f"/tmp/{name}",
                                                                "origin": "local", "time": 1.0})


@pytest.mark.parametrize("bad", ["error", "hang", "html", "empty"])
def test_a_flaky_camera_fails_frames_and_capture_goes_on(tmp_path, bus_config, running_broker, bad):
    camera, config = capture_setup(tmp_path, bus_config, every(3, bad))
    watch = bus.Subscriber(bus_config, groups=["timelapse"])
    worker = CaptureThread(config)
    publisher = bus.Publisher(bus_config, src="job")
    try:
        events = []
        print_layers(publisher, 9, watch=_Tee(watch, events))
        job = wait_for(lambda: next((j for j in store.jobs(config) if j.read().get("state") == "captured"), None),
                       timeout=30, message="the job captured")
    finally:
        worker.close()
        publisher.close()
        watch.close()
        camera.close()
    names = [e.name for e in events]
    assert names.count("CaptureDone") == 6 and names.count("CaptureFailed") == 3
    failed = [e.payload for e in events if e.name == "CaptureFailed"]
    assert all(p["error"] and p["file"].startswith(str(job.path)) for p in failed)
    assert job.read()["frames"] == 6 and job.frame_count() == 6
    published = []
    assert render.render(config, tl_settings.resolve(config), job, lambda n, p: published.append((n, p))) == "done"
    movie = published[-1][1]["movie"]
    assert published[-1][0] == "MovieDone" and probe(movie)["frames"] == 6


class _Tee:
    """A subscriber whose received events are also kept in a list."""

    def __init__(self, subscriber, into: list):
        self.subscriber, self.into = subscriber, into

    def recv(self, timeout=None):
        envelope = self.subscriber.recv(timeout)
        if envelope is not None:
            self.into.append(envelope)
        return envelope


def test_no_frames_at_all_is_movie_failed_no_frames(tmp_path, bus_config, running_broker):
    camera, config = capture_setup(tmp_path, bus_config, lambda n: "html")
    watch = bus.Subscriber(bus_config, groups=["timelapse"])
    worker = CaptureThread(config)
    publisher = bus.Publisher(bus_config, src="job")
    try:
        print_layers(publisher, 2)
        failed = collect(watch, 1, names={"MovieFailed"})[0].payload
    finally:
        worker.close()
        publisher.close()
        watch.close()
        camera.close()
    assert failed["reason"] == "no_frames" and failed["gcode"] == "cube.gcode"
    assert store.jobs(config) == []


def test_two_printers_never_share_a_frame_folder(tmp_path, bus_config, running_broker):
    camera, config = capture_setup(tmp_path, bus_config, lambda n: "good")
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["CaptureDone"])
    worker = CaptureThread(config)
    left = bus.Publisher(bus_config, src="job", printer="left")
    right = bus.Publisher(bus_config, src="job", printer="right")
    try:
        for publisher in (left, right):
            publisher.publish("PrintStarted", {"name": "same.gcode", "path": "/tmp/same.gcode", "origin": "local"})
        for layer in range(1, 4):
            for publisher in (left, right):
                publisher.publish("LayerChanged", {"layer": layer, "z": layer * 0.2, "old_z": None})
        done = collect(watch, 6)
    finally:
        worker.close()
        left.close()
        right.close()
        watch.close()
        camera.close()
    by_printer = {}
    for event in done:
        by_printer.setdefault(event.printer, set()).add(str(Path(event.payload["file"]).parent))
    assert set(by_printer) == {"left", "right"}
    (left_dir,), (right_dir,) = by_printer["left"], by_printer["right"]
    assert left_dir != right_dir
    assert Path(left_dir).parent.name == "left" and Path(right_dir).parent.name == "right"
    assert [len([n for n in os.listdir(d) if n.endswith(".jpg")]) for d in (left_dir, right_dir)] == [3, 3]


def test_post_roll_and_failed_print_suffix(tmp_path, bus_config, running_broker):
    camera = Camera()
    config = make_config(tmp_path, bus_config, cameras=[{"name": "cam", "snapshot": camera.url}])
    config.data["webcam"]["timelapse"].update(postRoll=1, fps=5)
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["CaptureDone"])
    worker = CaptureThread(config)
    publisher = bus.Publisher(bus_config, src="job")
    try:
        print_layers(publisher, 3, done=False)
        collect(watch, 4)
        job = wait_for(lambda: next((j for j in store.jobs(config) if j.read().get("state") == "captured"), None))
    finally:
        worker.close()
        publisher.close()
        watch.close()
        camera.close()
    data = job.read()
    assert data["frames"] == 3 + 1 + 5 - 1 + 1 and data["postfix"] == "-fail" and data["render"] is True
    assert render.render(config, tl_settings.resolve(config), job, lambda n, p: None) == "done"
    (movie,) = store.movies(config)
    assert movie.name.endswith("-fail.mp4") and Path(f"{movie}.thumb.jpg").stat().st_size > 0
    assert probe(movie)["frames"] == data["frames"]


# --- rendering ----------------------------------------------------------------------------------------------------

def captured_job(config, frames: int, size=(320, 240), printer="printer") -> store.Job:
    job = store.new_job(config, printer, "part.gcode")
    job.update(job=job.id, printer=printer, gcode="part.gcode", state="captured", render=True, postfix="",
               fps=25, created=1.0)
    write_frames(job, frames, size)
    return job


def test_render_progress_and_events(tmp_path):
    config = make_config(tmp_path)
    job = captured_job(config, 60)
    published = []
    assert render.render(config, tl_settings.resolve(config), job, lambda n, p: published.append((n, p))) == "done"
    names = [n for n, _ in published]
    assert names[0] == "MovieRendering" and names[-1] == "MovieDone" and "MovieRenderProgress" in names
    progress = [p["progress"] for n, p in published if n == "MovieRenderProgress"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert probe(published[-1][1]["movie"]) == {"frames": 60, "duration": 2.4}
    assert not job.path.exists()


def test_ffmpeg_returncode_is_movie_failed_and_frames_are_kept(tmp_path):
    config = make_config(tmp_path)
    config.data["webcam"]["ffmpegVideoCodec"] = "no-such-codec"
    job = captured_job(config, 5)
    published = []
    assert render.render(config, tl_settings.resolve(config), job, lambda n, p: published.append((n, p))) == "failed"
    name, payload = published[-1]
    assert name == "MovieFailed" and payload["reason"] == "returncode" and payload["returncode"] > 0
    assert job.frame_count() == 5 and job.read()["state"] == "failed" and store.movies(config) == []


@pytest.mark.timeout(600)
def test_ffmpeg_killed_mid_render_is_retried_into_a_whole_movie(tmp_path):
    config = make_config(tmp_path)
    settings = tl_settings.resolve(config)
    job = captured_job(config, 300, size=(640, 480))
    processes, published = [], []

    def publish(name, payload):
        published.append((name, payload))
        if name == "MovieRenderProgress" and 0 < payload["progress"] < 100 and processes and \
                not any(n == "killed" for n, _ in published):
            published.append(("killed", None))
            os.kill(processes[0].pid, signal.SIGKILL)

    assert render.render(config, settings, job, publish, on_process=processes.append) == "retry"
    assert ("killed", None) in published and store.movies(config) == []
    assert not list(store.movie_folder(config, "printer").glob(".*"))        # no half movie left
    assert job.read()["state"] == "captured" and job.read()["attempts"] == 1
    assert render.render(config, settings, job, lambda n, p: published.append((n, p))) == "done"
    (movie,) = store.movies(config)
    assert probe(movie)["frames"] == 300


def test_a_render_in_progress_is_locked_against_a_second_one(tmp_path):
    config = make_config(tmp_path)
    job = captured_job(config, 3)
    with job.lock():
        with pytest.raises(store.StoreError, match="being rendered"):
            render.render(config, tl_settings.resolve(config), job, lambda n, p: None)


def test_old_unrendered_jobs_are_cleaned(tmp_path):
    config = make_config(tmp_path)
    old, new = captured_job(config, 2), captured_job(config, 2)
    for path in [old.path] + list(old.path.iterdir()):
        os.utime(path, (1, 1))
    assert store.clean_old(config, 7) == [old.id]
    assert [j.id for j in store.jobs(config)] == [new.id]


# --- OctoPrint's modes --------------------------------------------------------------------------------------------

def run_capture(tmp_path, bus_config, modes, options, publish_steps, expect_done: int, exact: bool = True):
    camera = Camera()
    config = make_config(tmp_path, bus_config, cameras=[{"name": "cam", "snapshot": camera.url}], modes=modes)
    config.data["webcam"]["timelapse"]["options"].update(options)
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["CaptureDone"])
    worker = CaptureThread(config)
    publisher = bus.Publisher(bus_config, src="job")
    try:
        publisher.publish("PrintStarted", {"name": "m.gcode", "path": "/tmp/m.gcode", "origin": "local"})
        for name, payload in publish_steps:
            publisher.publish(name, payload)
        collect(watch, expect_done)
        publisher.publish("PrintDone", {"name": "m.gcode", "path": "/tmp/m.gcode", "origin": "local", "time": 1})
        job = wait_for(lambda: next((j for j in store.jobs(config) if j.read().get("state") == "captured"), None))
        assert not exact or watch.recv(timeout=0.5) is None
    finally:
        worker.close()
        publisher.close()
        watch.close()
        camera.close()
    return job.read()["frames"]


def test_zchange_skips_z_hops_and_layer_changes_do_not_count(tmp_path, bus_config, running_broker):
    steps = [("ZChange", {"new": 0.2, "old": 0.0}), ("LayerChanged", {"layer": 1, "z": 0.2, "old_z": None}),
             ("ZChange", {"new": 0.6, "old": 0.2}),          # a z-hop of exactly retractionZHop: no frame
             ("ZChange", {"new": 0.4, "old": 0.6}), ("ZChange", {"new": 0.6, "old": 0.4})]
    assert run_capture(tmp_path, bus_config, ["zchange"], {"retractionZHop": 0.4, "minDelay": 0}, steps, 3) == 3


def test_zchange_min_delay_rate_limits(tmp_path, bus_config, running_broker):
    steps = [("ZChange", {"new": 0.2 * i, "old": 0.2 * (i - 1)}) for i in range(1, 6)]
    assert run_capture(tmp_path, bus_config, ["zchange"], {"minDelay": 600}, steps, 1) == 1


def test_layer_and_timed_at_once(tmp_path, bus_config, running_broker):
    steps = [("LayerChanged", {"layer": 1, "z": 0.2, "old_z": None})]
    # timed: a frame at once at PrintStarted and one a second later; layer: one more
    frames = run_capture(tmp_path, bus_config, ["layer", "timed"], {"interval": 1}, steps, 3, exact=False)
    assert frames >= 3


@pytest.mark.parametrize("after, success, renders", [
    ("always", True, True), ("always", False, True), ("success", True, True), ("success", False, False),
    ("failure", False, True), ("failure", True, False), ("off", True, False), ("never", False, False)])
def test_render_after_print_as_octoprint(tmp_path, after, success, renders):
    config = make_config(tmp_path)
    config.data["webcam"]["timelapse"]["renderAfterPrint"] = after
    assert tl_settings.resolve(config).should_render(success) is renders


def test_stale_partial_movies_are_removed_unless_their_render_runs(tmp_path):
    config = make_config(tmp_path)
    running, dead = captured_job(config, 1), captured_job(config, 1)
    folder = store.movie_folder(config, "printer")
    folder.mkdir(parents=True)
    for job in (running, dead):
        (folder / f".{job.id}.part.mp4").write_bytes(b"half a movie")
    with running.lock():
        assert store.remove_stale_parts(config) == [f".{dead.id}.part.mp4"]
    assert (folder / f".{running.id}.part.mp4").exists()


def test_capture_started_mid_print_films_it_from_then_on(tmp_path, bus_config, running_broker):
    camera, config = capture_setup(tmp_path, bus_config, lambda n: "good")
    publisher = bus.Publisher(bus_config, src="job")
    publisher.publish_confirmed("PrintStarted", {"name": "late.gcode", "path": "/tmp/late.gcode", "origin": "local"})
    watch = bus.Subscriber(bus_config, groups=["timelapse"], events=["CaptureDone"])
    worker = CaptureThread(config)
    try:
        publisher.publish("LayerChanged", {"layer": 7, "z": 1.4, "old_z": None})
        (done,) = collect(watch, 1)
    finally:
        worker.close()
        publisher.close()
        watch.close()
        camera.close()
    (job,) = store.jobs(config)
    assert done.payload["file"] == str(job.frame(1)) and job.read()["gcode"] == "late.gcode"


def test_a_custom_thumbnail_command_line_is_run(tmp_path):
    config = make_config(tmp_path)
    config.data["webcam"]["ffmpegThumbnailCommandline"] = '{ffmpeg} -i "{input}" -frames:v 1 -vf scale=32:-1 "{output}"'
    job = captured_job(config, 10)
    assert render.render(config, tl_settings.resolve(config), job, lambda n, p: None) == "done"
    (movie,) = store.movies(config)
    from PIL import Image

    with Image.open(f"{movie}.thumb.jpg") as thumb:
        assert thumb.size[0] == 32
