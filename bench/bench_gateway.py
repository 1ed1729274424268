"""The gateway against OctoPrint 1.11.8's own server, under the same client load in the same run.

- ``GET /api/printer`` and ``GET /api/job`` requests per second: the gateway (with its node: broker, files service,
  virtual printer) against ``octoprint serve`` from the side venv (``ZEVENTS_OCTOPRINT_PYTHON``; that baseline is
  skipped without it) with its own virtual printer connected.  The load, the same for both: a minimal HTTP/1.1
  client on asyncio streams, ``CONNECTIONS`` keep-alive connections, ``REQUESTS`` requests per endpoint and round,
  rounds alternating between the two servers; the gateway's CPU time per request beside.  Target: ratio ≥ 3.
- Upload of a 500 MB G-code file through ``POST /api/files/local`` (streamed multipart, as a slicer sends it): MB/s
  against ``cp`` of the same file, and the gateway process's RSS growth while it streams (target < 20 MB).
- Push latency: 50 raw-socket clients, authenticated, a publisher process firing 1 000 events/s on the bus for
  ``PUSH_SECONDS``; each event carries its monotonic send time (one clock for every process on Linux); p50 and
  p99 of bus → client over every (event, client) pair, beside the bus alone (one plain Subscriber in the same run).
  The clients run in PUSH_PROCESSES processes; on a small machine they compete with the gateway for the CPU, which
  the bus subscriber's own tail shows.

Run: ZEVENTS_OCTOPRINT_PYTHON=/work/octoprint-venv/bin/python pytest bench/bench_gateway.py --benchmark-only -s
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import broker_process
from tests.gateway_helpers import cli, free_port, raw_socket, start, stop, write_config
from zevents import bus

CONNECTIONS = 8
REQUESTS = 2000
ROUNDS = 3
UPLOAD_MB = 500
PUSH_CLIENTS = 50
PUSH_PROCESSES = 5
PUSH_RATE = 1000
PUSH_SECONDS = 5
OCTOPRINT_KEY = "bench-octoprint-key-0123456789"


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.1)


def _status(port: int, key: str, path: str) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"X-Api-Key": key})
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):       # not listening yet, or OctoPrint's start-up placeholder
        return 0
    finally:
        connection.close()


@pytest.fixture(scope="module")
def gateway_node():
    """broker, files service, virtual printer and gateway as processes; yields (port, alice's key, directory,
    the gateway's pid, bus config)."""
    with broker_process() as (bus_config, directory, _pid):
        port = free_port()
        config = write_config(directory, bus_config, port, gateway={"max_upload": (UPLOAD_MB + 100) << 20})
        assert cli(config, "user", "add", "alice", "--admin", stdin="alice-secret\n").returncode == 0
        key = cli(config, "user", "apikey", "alice").stdout.strip()
        processes = []
        with open(directory / "services.log", "w") as log:
            try:
                processes.append(start(config, bus_config, "files", ["files", "serve"], stderr=log))
                processes.append(start(config, bus_config, "printer", ["printer", "--virtual"], stderr=log))
                gateway = start(config, bus_config, "gateway", ["gateway", "serve"], stderr=log)
                processes.append(gateway)
                _wait(lambda: _status(port, key, "/api/printer") == 200, 60, "the gateway to see the printer")
                yield port, key, directory, gateway.pid, bus_config
            finally:
                for process in reversed(processes):
                    stop(process)
                shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def octoprint_server():
    """``octoprint serve`` from the side venv on a fresh basedir: first-run wizard done, online check and the
    plugins that reach the internet off, an admin user with an API key, its virtual printer connected at start.
    Yields its port, or None without ZEVENTS_OCTOPRINT_PYTHON (the baseline is then skipped)."""
    python = os.environ.get("ZEVENTS_OCTOPRINT_PYTHON")
    if not python or not Path(python).is_file():
        yield None
        return
    import yaml

    basedir = Path(tempfile.mkdtemp(prefix="zevop-"))
    (basedir / "config.yaml").write_text(yaml.safe_dump({
        "server": {"firstRun": False, "onlineCheck": {"enabled": False}, "pluginBlacklist": {"enabled": False}},
        "plugins": {"_disabled": ["softwareupdate", "announcements", "tracking", "errortracking", "discovery",
                                  "achievements"],
                    "virtual_printer": {"enabled": True}},
        "serial": {"port": "VIRTUAL", "baudrate": 115200, "autoconnect": True}}))
    # OctoPrint's users.yaml (file version 2); the password hash is never checked: the bench uses the key
    (basedir / "users.yaml").write_text(yaml.safe_dump({
        "_version": 2,
        "admin": {"active": True, "apikey": OCTOPRINT_KEY, "groups": ["admins", "users"], "password": "unused",
                  "permissions": [], "settings": {}}}))
    port = free_port()
    argv = [python, "-m", "octoprint", "serve", "--basedir", str(basedir), "--port", str(port),
            "--host", "127.0.0.1"]
    if os.geteuid() == 0:
        argv.append("--iknowwhatimdoing")          # OctoPrint refuses to start as root without it
    with open(basedir / "serve.log", "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: process.poll() is not None or _status(port, OCTOPRINT_KEY, "/api/printer") == 200, 180,
                  "OctoPrint to connect its virtual printer")
            assert process.poll() is None, (basedir / "serve.log").read_text()[-3000:]
            yield port
        finally:
            stop(process)
            shutil.rmtree(basedir, ignore_errors=True)


# --- requests per second ------------------------------------------------------------------------------------------

async def _get(reader, writer, request: bytes) -> None:
    """One keep-alive GET: the request's bytes out, a 200 with its whole body (Content-Length or chunked) in."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head[9:12] == b"200", head[:200]
    headers = head.lower()
    at = headers.find(b"\r\ncontent-length:")
    if at >= 0:
        await reader.readexactly(int(headers[at + 17:headers.index(b"\r\n", at + 2)]))
        return
    assert b"transfer-encoding: chunked" in headers, head[:300]
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def _load(port: int, key: str, path: str, requests: int) -> float:
    """``requests`` GETs over CONNECTIONS keep-alive connections; requests per second.  A minimal HTTP/1.1 client
    on asyncio streams: aiohttp's client costs several times what the gateway spends on a request, so with it the
    bench measured its own client (the same client for both servers, either way)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Api-Key: {key}\r\nAccept: */*\r\n"
               f"User-Agent: zevents-bench\r\n\r\n").encode()
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    try:
        for reader, writer in connections:          # connection setup and a first answer are not measured
            await _get(reader, writer, request)
        left = requests

        async def worker(reader, writer):
            nonlocal left
            while left > 0:
                left -= 1
                await _get(reader, writer, request)
        started = time.perf_counter()
        await asyncio.gather(*(worker(*connection) for connection in connections))
        return requests / (time.perf_counter() - started)
    finally:
        for _reader, writer in connections:
            writer.close()


@pytest.mark.parametrize("path", ["/api/printer", "/api/job"])
def test_requests_per_second(benchmark, figures, gateway_node, octoprint_server, path):
    port, key, _directory, gateway_pid, _bus = gateway_node
    ours, theirs, cpu = [], [], []

    def round_():
        # alternate, so a busier minute of the shared machine weighs on both alike
        cpu_before = _cpu_seconds(gateway_pid)
        ours.append(asyncio.run(_load(port, key, path, REQUESTS)))
        cpu.append((_cpu_seconds(gateway_pid) - cpu_before) / REQUESTS)
        if octoprint_server is not None:
            theirs.append(asyncio.run(_load(octoprint_server, OCTOPRINT_KEY, path, REQUESTS)))

    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    rate = statistics.median(ours)
    baseline = statistics.median(theirs) if theirs else None
    benchmark.extra_info.update(gateway_rps=rate, octoprint_rps=baseline)
    figures.add("gateway", f"GET {path} ({CONNECTIONS} connections)", rate, "req/s", baseline,
                "OctoPrint 1.11.8")
    figures.add("gateway", f"GET {path}: gateway CPU per request", statistics.median(cpu) * 1e6, "µs")
    if baseline is None:
        pytest.skip("ZEVENTS_OCTOPRINT_PYTHON is not set: no OctoPrint baseline (the gateway's rate is recorded)")


# --- upload -------------------------------------------------------------------------------------------------------

def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _upload(port: int, key: str, source: Path, name: str) -> float:
    """POST /api/files/local as a slicer does (multipart: file then select/print), the body streamed from disk with
    its Content-Length; seconds until the answer."""
    import http.client
    import uuid

    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode()
    tail = (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="print"\r\n\r\nfalse\r\n'
            f'--{boundary}--\r\n').encode()
    length = len(head) + source.stat().st_size + len(tail)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    try:
        connection.putrequest("POST", "/api/files/local")
        connection.putheader("X-Api-Key", key)
        connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        connection.sock.sendall(head)
        with open(source, "rb") as stream:
            connection.sock.sendfile(stream)
        connection.sock.sendall(tail)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 201, (response.status, body[:500])
        return time.perf_counter() - started
    finally:
        connection.close()


def test_upload_500mb(benchmark, figures, gateway_node):
    port, key, directory, gateway_pid, _ = gateway_node
    source = directory / "big.gcode"
    block = b"".join(b"G1 X%d.%03d Y%d.%03d E0.04123\n" % (i % 200, i % 1000, (i * 7) % 200, i % 997)
                     for i in range(40_000))
    with open(source, "wb") as out:
        written = 0
        while written < UPLOAD_MB << 20:
            out.write(block)
            written += len(block)
    size_mb = source.stat().st_size / (1 << 20)
    uploads = directory / "data" / "uploads"
    upload_times, cp_times, growth_kb = [], [], []

    def round_():
        target = directory / "copy.gcode"
        started = time.perf_counter()
        subprocess.run(["cp", str(source), str(target)], check=True)
        cp_times.append(time.perf_counter() - started)
        target.unlink()

        before = _rss_kb(gateway_pid)
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kb(gateway_pid))
                done.wait(0.02)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            upload_times.append(_upload(port, key, source, "big.gcode"))
        finally:
            done.set()
            sampler.join()
        growth_kb.append(peak[0] - before)
        assert (uploads / "big.gcode").stat().st_size == source.stat().st_size
        (uploads / "big.gcode").unlink()            # each round stores it anew, not as an overwrite

    try:
        benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    finally:
        source.unlink()
    rate = size_mb / statistics.median(upload_times)
    baseline = size_mb / statistics.median(cp_times)
    growth_mb = max(growth_kb) / 1024
    benchmark.extra_info.update(upload_mb_s=rate, cp_mb_s=baseline, rss_growth_mb=growth_mb)
    figures.add("gateway", f"upload {size_mb:.0f} MB (POST /api/files/local)", rate, "MB/s", baseline, "cp")
    figures.add("gateway", "gateway RSS growth during the upload (max)", growth_mb, "MB")


# --- push latency -------------------------------------------------------------------------------------------------

PUBLISHER = """
import sys, time
from zevents import bus
from zevents.config import BusConfig
cfg = BusConfig(**__import__("json").loads(sys.argv[1]))
rate, seconds = int(sys.argv[2]), float(sys.argv[3])
with bus.Publisher(cfg, src="bench") as publisher:
    publisher.publish_confirmed("BenchPushStart", {})
    start = time.monotonic()
    for index in range(int(rate * seconds)):
        due = start + index / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        publisher.publish("BenchPush", {"i": index, "t": time.monotonic()})
    publisher.publish_confirmed("BenchPushEnd", {})
"""


async def _push_clients(port: int, key: str, count: int, expected: int) -> tuple:
    """``count`` raw-socket clients subscribed to the bench's events; prints ``ready`` once they are authenticated,
    returns (latencies in s, events missed) after ``BenchPushEnd``."""
    import aiohttp

    latencies: list = []
    missed = 0

    async with aiohttp.ClientSession() as http:
        sockets = [await raw_socket(http, port, key, {"events": ["BenchPush", "BenchPushEnd"], "state": False})
                   for _ in range(count)]

        async def read(ws):
            nonlocal missed
            got = 0
            while True:
                message = await ws.receive(timeout=120)
                received = time.monotonic()
                assert message.type == aiohttp.WSMsgType.TEXT, message
                event = json.loads(message.data).get("event")
                if event is None:
                    continue
                if event["type"] == "BenchPushEnd":
                    break
                if event["type"] == "BenchPush":
                    latencies.append(received - event["payload"]["t"])
                    got += 1
            missed += expected - got
            await ws.close()

        readers = [asyncio.ensure_future(read(ws)) for ws in sockets]
        await asyncio.sleep(1.0)        # every auth processed (a subscription is in place before the events)
        print("ready", flush=True)
        await asyncio.gather(*readers)
    return latencies, missed


def _client_process(argv: list) -> None:
    """``port key count expected out``: the clients of one process; latencies (float64) to ``out``, missed on
    stdout."""
    from array import array

    port, key, count, expected, out = argv
    latencies, missed = asyncio.run(_push_clients(int(port), key, int(count), int(expected)))
    Path(out).write_bytes(array("d", latencies).tobytes())
    print(missed, flush=True)


CLIENTS = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
import bench_gateway
bench_gateway._client_process(sys.argv[1:])
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")          # utime + stime


def _percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_push_latency_50_clients(benchmark, figures, gateway_node):
    port, key, directory, gateway_pid, bus_config = gateway_node
    expected = PUSH_RATE * PUSH_SECONDS
    config = json.dumps({"publish": bus_config.publish, "ingest": bus_config.ingest, "replay": bus_config.replay,
                         "node": bus_config.node})
    result = {}

    def run():
        from array import array

        ready = threading.Event()
        bus_latencies = []

        def direct():
            # the bus alone, in the same run: one plain Subscriber of the same events
            with bus.Subscriber(bus_config, groups=["custom"]) as subscriber:
                ready.wait(120)
                while True:
                    envelope = subscriber.recv(120)
                    assert envelope is not None
                    if envelope.name == "BenchPushEnd":
                        return
                    if envelope.name == "BenchPush":
                        bus_latencies.append(time.monotonic() - envelope.payload["t"])

        # the clients in processes of their own (the bench's process alone could not read 50 000 frames/s: its
        # own lateness would be measured), PUSH_PROCESSES of them
        outs = [directory / f"latencies{index}" for index in range(PUSH_PROCESSES)]
        clients = [subprocess.Popen([sys.executable, "-c", CLIENTS, str(port), key,
                                     str(PUSH_CLIENTS // PUSH_PROCESSES), str(expected), str(out)],
                                    stdout=subprocess.PIPE, text=True) for out in outs]
        subscriber = threading.Thread(target=direct)
        subscriber.start()
        try:
            for process in clients:
                assert process.stdout.readline().strip() == "ready"
            ready.set()
            subprocess.run([sys.executable, "-c", PUBLISHER, config, str(PUSH_RATE), str(PUSH_SECONDS)],
                           check=True, timeout=300)
            missed = sum(int(process.communicate(timeout=300)[0].strip() or 0) for process in clients)
            assert all(process.returncode == 0 for process in clients)
        finally:
            ready.set()
            for process in clients:
                stop(process)
            subscriber.join(300)
        latencies = array("d")
        for out in outs:
            latencies.frombytes(out.read_bytes())
        result["push"] = list(latencies), missed
        result["bus"] = bus_latencies

    cpu_before = _cpu_seconds(gateway_pid)
    started = time.monotonic()
    benchmark.pedantic(run, rounds=1, iterations=1)
    gateway_cpu = (_cpu_seconds(gateway_pid) - cpu_before) / (time.monotonic() - started)
    latencies, missed = result["push"]
    bus_latencies = result["bus"]
    p50, p99 = _percentile(latencies, 0.5) * 1e3, _percentile(latencies, 0.99) * 1e3
    bus_p50, bus_p99 = _percentile(bus_latencies, 0.5) * 1e3, _percentile(bus_latencies, 0.99) * 1e3
    benchmark.extra_info.update(p50_ms=p50, p99_ms=p99, bus_p50_ms=bus_p50, bus_p99_ms=bus_p99, missed=missed)
    figures.add("gateway", f"push bus→{PUSH_CLIENTS} sockets at {PUSH_RATE}/s p50", p50, "ms", bus_p50,
                "bus subscriber")
    figures.add("gateway", f"push bus→{PUSH_CLIENTS} sockets at {PUSH_RATE}/s p99", p99, "ms", bus_p99,
                "bus subscriber")
    figures.add("gateway", "push events missed (all clients)", missed, "events")
    figures.add("gateway", "gateway CPU during the push run", gateway_cpu * 100, "% of a core")
