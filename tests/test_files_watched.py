"""The watched folder with real inotify (and watchdog's polling observer), real files and the files service as a
real process: fast, slow and still-being-written files, 1 000 at once, a .failed case, the startup scan."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from zevents import bus

from files_helpers import count, events, start_service, stop_service, write_config
from conftest import wait_for

BODY = b"G28\n" + b"G1 X10 Y10 E0.5 F1200\n" * 200


@pytest.fixture
def service(short_tmp, bus_config, running_broker):
    """service(**files settings, before=fn(watched)) starts a files service (analysis off) as a real process;
    returns (watched folder, uploads folder); the process is stopped after the test."""
    started = []

    def start(before=None, **files):
        files.setdefault("analysis", {"run_at": "never"})
        config = write_config(short_tmp, bus_config, files=files)
        watched, uploads = short_tmp / "data" / "watched", short_tmp / "data" / "uploads"
        if before is not None:
            before(watched)
        started.append(start_service(config, bus_config))
        return watched, uploads

    yield start
    for process in started:
        stop_service(process)


@pytest.fixture
def subscriber(bus_config, running_broker):
    sub = bus.Subscriber(bus_config, groups=["file"])
    yield sub
    sub.close()


def drop(watched: Path, relative: str, data: bytes = BODY) -> Path:
    path = watched / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def slow_write(path: Path, data: bytes, chunks: int, pause: float):
    """A slow writer (a Samba or scp transfer): one open file, written in chunks with pauses between them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    step = max(1, len(data) // chunks)
    with open(path, "wb") as handle:
        for offset in range(0, len(data), step):
            handle.write(data[offset:offset + step])
            handle.flush()
            time.sleep(pause)   # the writer's own slowness, not a wait for the code under test


def added_paths(got):
    return [payload["path"] for name, payload in got if name == "FileAdded"]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_dropped_files_are_added_with_their_subfolder_and_removed(service, subscriber, polling):
    watched, uploads = service(poll_watched=polling)
    drop(watched, "top.gcode")
    drop(watched, "sub/dir/deep.gcode")
    outside = watched.parent / "elsewhere"                 # a whole folder renamed into the watched folder
    drop(outside, "inner/one.gcode")
    os.rename(outside, watched / "moved")
    got = events(subscriber, count("FileAdded", 3))
    assert sorted(added_paths(got)) == ["moved/inner/one.gcode", "sub/dir/deep.gcode", "top.gcode"]
    added = [p for n, p in got if n == "FileAdded"]
    assert all(p["operation"] == "add" and p["storage"] == "local" for p in added)
    assert "Upload" not in [n for n, _ in got]            # OctoPrint: no Upload for the watched folder
    assert (uploads / "sub" / "dir" / "deep.gcode").read_bytes() == BODY
    wait_for(lambda: not (watched / "top.gcode").exists() and not (watched / "sub/dir/deep.gcode").exists(),
             message="the sources to go")


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_slow_writer_is_added_once_complete(service, subscriber, polling):
    # polling decides by a size stable for stable_time (0.5 s here): the writer pauses less than that
    watched, uploads = service(poll_watched=polling, stable_time=1.5)
    data = BODY * 20
    writer = threading.Thread(target=slow_write, args=(watched / "slow.gcode", data, 15, 0.1))
    writer.start()
    got = events(subscriber, count("FileAdded", 1))
    writer.join()
    assert added_paths(got) == ["slow.gcode"]
    assert (uploads / "slow.gcode").read_bytes() == data


def test_a_file_that_cannot_be_added_is_renamed_failed_with_an_event(service, subscriber):
    watched, uploads = service()
    drop(watched, "notes/readme.txt", b"not G-code")
    drop(watched, "bad\x01name.gcode")
    got = events(subscriber, count("WatchedFileFailed", 2))
    failed = sorted((p["path"], p["reason"]) for n, p in got if n == "WatchedFileFailed")
    assert "control character" in failed[0][1] and failed[0][0] == "bad\x01name.gcode"
    assert failed[1][0] == "notes/readme.txt" and "neither G-code" in failed[1][1]
    assert (watched / "notes" / "readme.txt.failed").read_bytes() == b"not G-code"
    assert not (watched / "notes" / "readme.txt").exists()
    assert not any(name for name, _ in got if name == "FileAdded")
    drop(watched, "dl/part.gcode.part")                      # a download's temp name: left alone until renamed
    os.rename(watched / "dl" / "part.gcode.part", watched / "dl" / "part.gcode")
    got = events(subscriber, count("FileAdded", 1))
    assert added_paths(got) == ["dl/part.gcode"] and "WatchedFileFailed" not in [n for n, _ in got]
    drop(watched, "ok.gcode")                            # .failed files are not picked up again
    got = events(subscriber, count("FileAdded", 1))
    assert added_paths(got) == ["ok.gcode"] and "WatchedFileFailed" not in [n for n, _ in got]


def test_startup_scan_adds_what_was_dropped_while_stopped(service, subscriber):
    def early(watched):
        for i in range(5):
            drop(watched, f"early/{i}.gcode")
        drop(watched, ".hidden.gcode")                          # hidden files are left alone
    watched, uploads = service(before=early)
    got = events(subscriber, count("FileAdded", 5))
    assert sorted(added_paths(got)) == [f"early/{i}.gcode" for i in range(5)]
    assert (watched / ".hidden.gcode").exists()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_thousand_files_at_once_some_slow_end_as_a_thousand_file_added(service, subscriber, polling):
    watched, uploads = service(poll_watched=polling)
    slow = [threading.Thread(target=slow_write, args=(watched / "slow" / f"s{i}.gcode", BODY * 5, 5, 0.05))
            for i in range(20)]
    for thread in slow:
        thread.start()
    for i in range(980):
        drop(watched, f"batch/{i // 100}/f{i}.gcode", BODY + str(i).encode())
    for thread in slow:
        thread.join()
    got = events(subscriber, count("FileAdded", 1000), timeout=240)
    paths = added_paths(got)
    assert len(paths) == len(set(paths)) == 1000
    # nothing added twice: the next FileAdded after the thousand is a new file's
    drop(watched, "last.gcode")
    assert added_paths(events(subscriber, count("FileAdded", 1))) == ["last.gcode"]
    assert (uploads / "batch" / "9" / "f979.gcode").read_bytes() == BODY + b"979"
    assert all((uploads / "slow" / f"s{i}.gcode").read_bytes() == BODY * 5 for i in range(20))
    wait_for(lambda: not any(files for _, _, files in os.walk(watched)), message="the watched folder to empty")
