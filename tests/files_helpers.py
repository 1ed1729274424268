"""Shared pieces of the files tests: a config for a files service under a short tmp dir, the service as a real
process, requests to its channel, and collecting the file events it publishes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from zevents import bus
from zevents.files import channel

ZEVENTS = [sys.executable, "-m", "zevents"]
FILE_EVENTS = ("FileAdded", "FileRemoved", "FileMoved", "FolderAdded", "FolderRemoved", "FolderMoved",
               "UpdatedFiles", "Upload", "MetadataAnalysisStarted", "MetadataAnalysisFinished",
               "MetadataStatisticsUpdated", "WatchedFileFailed")


def write_config(directory: Path, bus_config, files: dict | None = None, printer: dict | None = None) -> Path:
    section = {"commands": f"ipc://{directory}/files.sock", "stable_time": 0.5, "poll_interval": 0.2,
               "analysis": {"run_at": "idle", "timeout": 60.0}}
    for key, value in (files or {}).items():
        section[key] = dict(section[key], **value) if isinstance(value, dict) and key in section else value
    printer_section = {"commands": f"ipc://{directory}/printer.sock", "timeout": 3.0,
                       "virtual": {"firmware": "marlin", "speed": 0, "tools": 1}}
    printer_section.update(printer or {})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "files": section, "printer": printer_section, "data_dir": str(directory / "data")}, allow_unicode=True))
    return path


def start_service(config: Path, bus_config, timeout: float = 30.0) -> subprocess.Popen:
    """`zevents files serve` as a real process; returns once its ServiceStarted is on the bus."""
    watcher = bus.Subscriber(bus_config, groups=["sys"])
    process = subprocess.Popen(ZEVENTS + ["files", "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            envelope = watcher.recv(timeout=0.5)
            if envelope is not None and envelope.name == "ServiceStarted" and envelope.payload["service"] == "files":
                return process
            if process.poll() is not None:
                raise AssertionError(f"the files service exited: {process.stderr.read()}")
            if time.monotonic() > deadline:
                stop_service(process)
                raise AssertionError("the files service did not start")
    finally:
        watcher.close()


def stop_service(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    err = process.stderr.read() if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    return err


def request(config_path: Path, command: str, _timeout: float = 60.0, **args) -> dict:
    from zevents.config import load

    client = channel.FilesClient(channel.endpoint(load(config_path)))
    try:
        return client.request(command, args, timeout=_timeout)
    finally:
        client.close()


def events(subscriber, until, timeout: float = 30.0, names=FILE_EVENTS) -> list:
    """(name, payload) of file events until ``until(list)`` is true; fails after timeout."""
    got = []
    deadline = time.monotonic() + timeout
    while not until(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; got {[n for n, _ in got]}")
        envelope = subscriber.recv(timeout=remaining)
        if envelope is not None and envelope.name in names:
            got.append((envelope.name, envelope.payload))
    return got


def count(name: str, n: int):
    return lambda got: sum(1 for event, _ in got if event == name) >= n


def cli(config: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ZEVENTS + list(args) + ["-c", str(config)], capture_output=True, text=True,
                          timeout=timeout)
