"""The analysis queue: a real worker process, killed and requeued when a print starts (OctoPrint's runAt: idle),
high priority first, a per-file timeout, results cached by content hash; and the service's events around it."""
from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import pytest

from zevents import bus
from zevents.files.analysis_queue import AnalysisQueue

from conftest import wait_for
from files_helpers import count, events, request, start_service, stop_service, write_config

# A worker speaking the real protocol whose first attempt at a file named "*hang*" never answers (until killed),
# while every other request is answered at once: the queue's decisions become visible without timing anything.
WORKER = r'''
import json, os, sys, time
from zevents.files.analysis_queue import _die_with_parent
_die_with_parent()
attempts = os.environ["ATTEMPTS"]
for line in sys.stdin:
    path = json.loads(line)["path"]
    with open(attempts, "a") as log:
        log.write(os.path.basename(path) + "\n")
    seen = open(attempts).read().split().count(os.path.basename(path))
    if "garbage" in path:
        print("this is not JSON", flush=True)
        continue
    if "hang" in path and (seen == 1 or "forever" in path):
        while True:
            time.sleep(3600)
    print(json.dumps({"ok": True, "result": {"file": os.path.basename(path), "attempt": seen}}), flush=True)
'''


class Recorder:
    def __init__(self):
        self.reports = []
        self.lock = threading.Lock()

    def __call__(self, kind, job, result):
        with self.lock:
            self.reports.append((kind, job.path, result))

    def kinds(self, kind):
        with self.lock:
            return [path for k, path, _ in self.reports if k == kind]


@pytest.fixture
def queue_with_worker(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    attempts = tmp_path / "attempts"
    attempts.touch()
    monkeypatch.setenv("ATTEMPTS", str(attempts))
    queues = []

    def make(**kwargs):
        recorder = Recorder()
        queue = AnalysisQueue(recorder, tmp_path / "cache", worker=(sys.executable, str(script)), **kwargs)
        queues.append(queue)
        return queue, recorder, attempts

    yield make
    for queue in queues:
        queue.close()


def job(tmp_path: Path, name: str, data: bytes = b"G28\n"):
    path = tmp_path / name
    path.write_bytes(data + name.encode())
    return name, str(path), hashlib.sha1(path.read_bytes()).hexdigest()


def attempted(attempts: Path) -> list:
    return attempts.read_text().split()


def test_a_running_analysis_is_stopped_and_requeued_while_printing(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker()
    queue.enqueue(*job(tmp_path, "hang.gcode"), high=True)
    wait_for(lambda: attempted(attempts) == ["hang.gcode"], message="the first attempt")
    queue.pause()                                     # PrintStarted: the worker is killed, the file requeued
    queue.enqueue(*job(tmp_path, "other.gcode"))
    wait_for(lambda: queue.pending() == ["hang.gcode", "other.gcode"], message="the requeue")
    assert recorder.kinds("finished") == [] and attempted(attempts) == ["hang.gcode"]
    queue.resume()                                    # PrintDone: both run, the aborted one first (priority 0)
    wait_for(lambda: recorder.kinds("finished") == ["hang.gcode", "other.gcode"], message="both analyses")
    assert [r for k, p, r in recorder.reports if k == "finished"][0] == {"file": "hang.gcode", "attempt": 2}
    assert recorder.kinds("started") == ["hang.gcode", "hang.gcode", "other.gcode"]


def test_an_upload_preempts_a_backlog_analysis(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker()
    queue.enqueue(*job(tmp_path, "hang-backlog.gcode"), high=False)
    wait_for(lambda: attempted(attempts) == ["hang-backlog.gcode"], message="the backlog analysis")
    queue.enqueue(*job(tmp_path, "upload.gcode"), high=True)
    wait_for(lambda: recorder.kinds("finished") == ["upload.gcode", "hang-backlog.gcode"], message="both")


def test_a_hung_analysis_is_killed_at_its_timeout_and_the_queue_goes_on(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker(timeout=1.0)
    queue.enqueue(*job(tmp_path, "hang-forever.gcode"))
    queue.enqueue(*job(tmp_path, "next.gcode"))
    wait_for(lambda: recorder.kinds("finished") == ["next.gcode"], timeout=30, message="the next file")
    failed = [(p, r) for k, p, r in recorder.reports if k == "failed"]
    assert failed and failed[0][0] == "hang-forever.gcode" and "timed out" in failed[0][1]


def test_a_worker_answering_garbage_fails_that_file_only(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker()
    queue.enqueue(*job(tmp_path, "garbage.gcode"))
    queue.enqueue(*job(tmp_path, "fine.gcode"))
    wait_for(lambda: recorder.kinds("finished") == ["fine.gcode"], message="the next file")
    failed = [(p, r) for k, p, r in recorder.reports if k == "failed"]
    assert failed[0][0] == "garbage.gcode" and "garbage" in failed[0][1]


def test_results_are_cached_by_content_hash(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker()
    name, disk, digest = job(tmp_path, "a.gcode")
    queue.enqueue(name, disk, digest)
    wait_for(lambda: recorder.kinds("finished") == ["a.gcode"], message="the analysis")
    queue.enqueue("copy/a.gcode", disk, digest)       # same bytes elsewhere: no second run of the worker
    wait_for(lambda: recorder.kinds("finished") == ["a.gcode", "copy/a.gcode"], message="the cached result")
    assert attempted(attempts) == ["a.gcode"]
    assert (tmp_path / "cache" / f"{digest}.{queue.engine}.json").exists()


def test_the_worker_dies_with_a_killed_service(tmp_path):
    """kill -9 of the process that owns the queue: its worker, busy with a file, goes too."""
    import os
    import signal
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    owner = tmp_path / "owner.py"
    owner.write_text(f"""
import sys, time
from zevents.files.analysis_queue import AnalysisQueue
queue = AnalysisQueue(lambda *a: None, {str(tmp_path / "cache")!r}, worker=(sys.executable, {str(script)!r}))
queue.enqueue("hang-forever.gcode", {str(tmp_path / "hang-forever.gcode")!r}, "0" * 40)
while queue._worker is None:
    time.sleep(0.01)
print(queue._worker.pid, flush=True)
time.sleep(3600)
""")
    (tmp_path / "hang-forever.gcode").write_text("G28\n")
    (tmp_path / "attempts").touch()
    process = subprocess.Popen([sys.executable, str(owner)], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, ATTEMPTS=str(tmp_path / "attempts")))
    try:
        worker = int(process.stdout.readline())
        wait_for(lambda: attempted(tmp_path / "attempts") == ["hang-forever.gcode"], message="the analysis")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

        def gone():
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, timeout=30, message="the worker to die with its service")
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_run_at_never_ignores_every_file(queue_with_worker, tmp_path):
    queue, recorder, attempts = queue_with_worker(run_at="never")
    assert queue.enqueue(*job(tmp_path, "a.gcode")) is False and queue.pending() == []


# --- through the service ----------------------------------------------------------------------------------------

GCODE = b"M82\nG28\nG1 Z0.2 F3000\nG1 X10 Y10\nG1 X30 Y10 E2 F1200\nG1 X30 Y30 E4\nG1 Z0.4\nG1 X10 Y30 E6\n"


def test_service_analyses_uploads_only_when_not_printing(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config)
    subscriber = bus.Subscriber(bus_config, groups=["file"])
    process = start_service(config, bus_config)
    source = short_tmp / "part.gcode"
    source.write_bytes(GCODE)
    try:
        with bus.Publisher(bus_config, src="job") as publisher:
            publisher.publish("PrinterStateChanged", {"state_id": "PRINTING", "state_string": "Printing"})
            wait_for(lambda: request(config, "STATUS")["analysis"]["paused"], message="the pause")
            request(config, "UPLOAD", source=str(source), path="part.gcode")
            got = events(subscriber, count("Upload", 1))
            assert [n for n, _ in got] == ["FileAdded", "UpdatedFiles", "Upload"]
            assert request(config, "STATUS")["analysis"]["pending"] == ["part.gcode"]   # waits for the print
            publisher.publish("PrinterStateChanged", {"state_id": "OPERATIONAL", "state_string": "Operational"})
        got = events(subscriber, count("MetadataAnalysisFinished", 1))
        assert got[0] == ("MetadataAnalysisStarted", {"name": "part.gcode", "path": "part.gcode", "origin": "local",
                                                      "type": "gcode"})
        result = got[1][1]["result"]
        assert {"printingArea", "dimensions", "travelArea", "travelDimensions", "filament", "history",
                "statistics"} <= set(result)
        assert result["filament"]["tool0"]["length"] == pytest.approx(6.0)
        assert result["dimensions"]["width"] == pytest.approx(20.0)
        info = request(config, "INFO", path="part.gcode")["file"]
        assert info["analysis"]["filament"] == result["filament"]
        # new bytes under the same name: analysed again
        source.write_bytes(GCODE + b"G1 X10 Y10 E8\n")
        request(config, "UPLOAD", source=str(source), path="part.gcode")
        got = events(subscriber, count("MetadataAnalysisFinished", 1))
        assert [p for n, p in got if n == "MetadataAnalysisFinished"][0]["result"]["filament"]["tool0"][
            "length"] == pytest.approx(8.0)
    finally:
        stop_service(process)
        subscriber.close()


def test_backlog_at_start_analyses_files_without_analysis(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config)
    uploads = short_tmp / "data" / "uploads" / "old"
    uploads.mkdir(parents=True)
    (uploads / "a.gcode").write_bytes(GCODE)              # put there while no service ran
    subscriber = bus.Subscriber(bus_config, groups=["file"])
    process = start_service(config, bus_config)
    try:
        got = events(subscriber, count("MetadataAnalysisFinished", 1))
        assert got[-1][1]["path"] == "old/a.gcode"
    finally:
        stop_service(process)
        subscriber.close()
