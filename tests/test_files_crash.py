"""`kill -9` of the files service at random moments during uploads and metadata writes: every visible file is
complete, every .metadata.json is whole, and the next start leaves metadata and files matching exactly."""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

from zevents.files.storage import METADATA, TEMP_PREFIX
from zevents.printer.channel import ChannelError

from files_helpers import request, start_service, write_config

BIG = b"G1 X1 Y1 E0.1 F1200 ; a line of a large upload\n" * 400_000      # ~19 MB: a copy takes a while
SMALL = b"G28\nG1 X5 E1\n"


def check_store(uploads: Path, contents: set):
    """What must hold at any instant: visible files complete, metadata files whole JSON maps."""
    for directory, folders, files in os.walk(uploads):
        for name in files:
            path = Path(directory) / name
            if name == METADATA:
                assert isinstance(json.loads(path.read_text()), dict), path
            elif not name.startswith("."):
                assert path.read_bytes() in contents, f"{path} is not a complete upload"


def check_reconciled(uploads: Path):
    """What must hold once the service started again: no temp files, one entry per file with its real hash."""
    for directory, folders, files in os.walk(uploads):
        visible = {n for n in files if not n.startswith(".")}
        assert not [n for n in files if n.startswith(TEMP_PREFIX)], directory
        meta = json.loads((Path(directory) / METADATA).read_text()) if METADATA in files else {}
        assert set(meta) == visible, directory
        for name in visible:
            assert meta[name]["hash"] == hashlib.sha1((Path(directory) / name).read_bytes()).hexdigest()


def test_kill_9_during_uploads_and_metadata_writes_leaves_a_consistent_store(short_tmp, bus_config,
                                                                            running_broker):
    config = write_config(short_tmp, bus_config, files={"analysis": {"run_at": "never"}, "watch": False})
    uploads = short_tmp / "data" / "uploads"
    many = uploads / "many"
    many.mkdir(parents=True)
    for i in range(2000):                 # a big .metadata.json: each write of it takes a while
        (many / f"old{i}.gcode").write_bytes(SMALL + str(i).encode())
    contents = {SMALL + str(i).encode() for i in range(2000)} | {BIG, SMALL}
    sources = short_tmp / "sources"
    sources.mkdir()
    (sources / "big.gcode").write_bytes(BIG)
    (sources / "small.gcode").write_bytes(SMALL)
    rng = random.Random(14)
    for round_ in range(8):
        # even rounds: kill during a 19 MB upload (the copy); odd: during a small upload into a folder whose
        # .metadata.json has 2000 entries (the metadata write)
        name, folder = ("big.gcode", "big") if round_ % 2 == 0 else ("small.gcode", "many")
        process = start_service(config, bus_config)
        check_reconciled(uploads)
        started = time.monotonic()
        request(config, "UPLOAD", source=str(sources / name), path=f"{folder}/first{round_}.gcode")
        duration = time.monotonic() - started
        sent = threading.Event()

        def upload_until_killed():
            sent.set()
            try:
                request(config, "UPLOAD", _timeout=duration * 4 + 5, source=str(sources / name),
                        path=f"{folder}/r{round_}.gcode")
            except ChannelError:
                pass                # killed before it answered
        thread = threading.Thread(target=upload_until_killed)
        thread.start()
        sent.wait()
        time.sleep(rng.uniform(0, duration))     # a random instant inside the next upload: the kill's moment
        process.kill()              # SIGKILL: no cleanup at all
        process.wait()
        process.stderr.close()
        thread.join()
        check_store(uploads, contents)
    process = start_service(config, bus_config)
    try:
        check_reconciled(uploads)
        listing = request(config, "LIST", path="big")["files"]
        assert all(entry["size"] == len(BIG) for entry in listing)
    finally:
        process.terminate()
        process.wait(20)
        process.stderr.close()
