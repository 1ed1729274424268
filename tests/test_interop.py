"""Interop: subscribers written in C and in Node, from PROTOCOL.md alone, decode every event of a live broker;
a publisher written in C, from the same document, reaches Python subscribers.

The clients live in tests/interop/ (c_subscriber.c is compiled here with gcc; node_subscriber.mjs needs
`npm ci --prefix tests/interop`).  Both print one JSON object per delivered event, "READY" on stderr once their
start point is known and "STATS ..." at exit.  Events reach the broker the way PROTOCOL.md section 3 says a foreign
publisher sends them (PUSH, one frame per event), so these tests check the document as much as the broker.

When gcc, libzmq3-dev, libmsgpack-dev, node or the npm packages are missing the tests skip, except under CI=true,
where CI installs them and a missing piece is a failure.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from zevents import bus, events
from zevents.broker import serve_in_thread
from zevents.config import BusConfig

INTEROP = Path(__file__).resolve().parent / "interop"
C_SOURCE = INTEROP / "c_subscriber.c"
C_PUBLISHER = INTEROP / "c_publisher.c"
NODE_SCRIPT = INTEROP / "node_subscriber.mjs"
IN_CI = os.environ.get("CI") == "true"

#: Varied values for payload keys: UTF-8 beyond the BMP, ints of every msgpack width (uint64/int64 extremes
#: included), floats that are not integral (a JavaScript number cannot tell 2.0 from 2), nested containers, bytes.
VALUES = [
    "Bénchy 🐰", 42, 0.1, True, None, [1, "two", 3.5, None, False, b"\x00\xff"],
    {"nested": {"deep": [True, {"x": -1.25}]}, "ünï": "✓", "n": None}, b"\x00\x01\xfe\xff", -7, 2**40 + 1,
    -273.15, False, 2**64 - 1, -(2**63), "", 'line\nbreak "quoted" \\ tab\t', 6.02e23, 1e-300, [], {},
]
SOURCES = ["gcode", "firmware", "user", "hook", "timelapse", "job"]
PRINTERS = ["p1", None, "Prüsa MK3 🐰"]


def unavailable(reason: str):
    """Skip on a developer machine without the toolchain; fail in CI, which installs it."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, where .ci/run installs it)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------- building clients


def _c_flags() -> list[str]:
    if shutil.which("pkg-config"):
        for msgpack_pc in ("msgpack-c", "msgpack"):  # msgpack-c >= 6 renamed its pkg-config file
            result = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq", msgpack_pc],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                return result.stdout.split()
    return ["-lzmq", "-lmsgpackc"]


@pytest.fixture(scope="session")
def c_toolchain(tmp_path_factory) -> tuple[Path, list[str]]:
    """A build directory and the compiler flags, once gcc, libzmq and msgpack-c are known to work together."""
    if not shutil.which("gcc"):
        unavailable("gcc is not installed")
    build = tmp_path_factory.mktemp("c_clients")
    flags = _c_flags()
    probe = build / "probe.c"
    probe.write_text("#include <zmq.h>\n#include <msgpack.h>\n"
                     "int main(void) { msgpack_sbuffer b; msgpack_sbuffer_init(&b); zmq_ctx_term(zmq_ctx_new());"
                     " msgpack_sbuffer_destroy(&b); return 0; }\n")
    result = subprocess.run(["gcc", str(probe), "-o", str(build / "probe"), *flags], capture_output=True, text=True)
    if result.returncode != 0:
        unavailable(f"libzmq3-dev / libmsgpack-dev are not usable: {result.stderr.strip()[:300]}")
    return build, flags


def _compile(toolchain: tuple[Path, list[str]], source: Path) -> Path:
    build, flags = toolchain
    binary = build / source.stem
    # e.g. ZEVENTS_INTEROP_CFLAGS="-g -fsanitize=address,undefined" to run the tests against a checked build
    extra = os.environ.get("ZEVENTS_INTEROP_CFLAGS", "").split()
    result = subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", *extra, str(source), "-o",
                             str(binary), *flags], capture_output=True, text=True)
    assert result.returncode == 0, f"{source.name} does not compile cleanly:\n{result.stderr}"
    return binary


@pytest.fixture(scope="session")
def c_subscriber(c_toolchain) -> Path:
    return _compile(c_toolchain, C_SOURCE)


@pytest.fixture(scope="session")
def c_publisher(c_toolchain) -> Path:
    return _compile(c_toolchain, C_PUBLISHER)


@pytest.fixture(scope="session")
def node_subscriber() -> list[str]:
    node = shutil.which("node")
    if not node:
        unavailable("node is not installed")

    def check():
        return subprocess.run([node, "--input-type=module", "-e",
                               'await import("zeromq"); await import("@msgpack/msgpack");'],
                              cwd=INTEROP, capture_output=True, text=True, timeout=60)

    # Like the C client's build, the Node client's packages are set up by the test itself (from the lock file).
    if check().returncode != 0 and shutil.which("npm") and not (INTEROP / "node_modules").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=INTEROP,
                       capture_output=True, text=True, timeout=600)
    check = check()
    if check.returncode != 0:
        reason = next((line for line in check.stderr.splitlines() if "Error" in line), check.stderr.strip()[:200])
        unavailable(f"the npm packages are not installed: run `npm ci --prefix tests/interop` ({reason})")
    return [node, str(NODE_SCRIPT)]


@pytest.fixture(params=["c", "node"])
def client(request) -> list[str]:
    """argv prefix of one subscriber implementation."""
    if request.param == "c":
        return [str(request.getfixturevalue("c_subscriber"))]
    return request.getfixturevalue("node_subscriber")


# ---------------------------------------------------------------------------------------------- processes


class SubscriberProcess:
    """A subscriber client run as a real process; its stdout and stderr are read on threads as they come."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=INTEROP)
        self.out: list[str] = []
        self.err: list[str] = []
        self._open = 2
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list):
        for raw in stream:
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_until(self, predicate, timeout: float, what: str):
        """Wait until predicate() holds (checked whenever output arrives); fail with the client's stderr."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate() or self._open == 0, timeout):
                pytest.fail(f"timed out after {timeout} s waiting for {what}; stderr:\n" + "\n".join(self.err[-20:]))
            if not predicate():
                pytest.fail(f"the client exited before {what}; stderr:\n" + "\n".join(self.err[-20:]))

    def wait_ready(self, timeout: float = 30) -> int:
        self.wait_until(lambda: any(line.startswith("READY ") for line in self.err), timeout, "READY")
        line = next(line for line in self.err if line.startswith("READY "))
        return int(line.split("epoch=")[1])

    def wait_lines(self, count: int, timeout: float = 30):
        self.wait_until(lambda: len(self.out) >= count, timeout, f"{count} output lines")

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the client did not exit within {timeout} s; stderr:\n" + "\n".join(self.err[-20:]))
        for reader in self._readers:
            reader.join(10)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must run to die cleanly
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out]

    def stats(self) -> dict:
        lines = [line for line in self.err if line.startswith("STATS ")]
        assert lines, "no STATS line on stderr:\n" + "\n".join(self.err[-20:])
        return {key: int(value) for key, value in (item.split("=") for item in lines[-1].split()[1:])}


@pytest.fixture
def run_client():
    started: list[SubscriberProcess] = []

    def run(argv: list[str]) -> SubscriberProcess:
        started.append(SubscriberProcess(argv))
        return started[-1]

    yield run
    for process in started:
        process.kill()


def client_argv(prefix: list[str], bus: BusConfig, *topics: str, count: int, timeout: float = 60,
                extra: tuple = ()) -> list[str]:
    return [*prefix, "--publish", bus.publish, "--control", bus.replay, "--count", str(count), "--timeout",
            str(timeout), *extra, *topics]


# ---------------------------------------------------------------------------------------------- broker side


@pytest.fixture
def brokers(monkeypatch):
    """Starts real brokers on threads (a second start on the same endpoints is a restart), holding the node token
    as under `zevents run`; stops them all."""
    from zevents import bus as bus_module

    monkeypatch.setattr(bus_module, "_NODE_TOKEN", NODE_TOKEN)
    running = []

    def start(bus: BusConfig):
        broker, thread = serve_in_thread(bus)
        running.append((broker, thread))
        return broker

    def stop(broker):
        for entry in running:
            if entry[0] is broker:
                entry[0].stop()
                entry[1].join(10)
                entry[0].close()
                running.remove(entry)
                return

    start.stop = stop
    yield start
    for broker, thread in running:
        broker.stop()
        thread.join(10)
        broker.close()


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.term()


NODE_TOKEN = "interop-node-token"


def ingest_frame(topic: str, payload: dict, src: str = "user", printer: str | None = None) -> bytes:
    """One ingest frame built by hand as PROTOCOL.md section 3 describes it (not with zevents.wire)."""
    topic_bytes = topic.encode()
    # sys/ events are the node's: a broker takes them only with its token (the node gives it to its children).
    meta = msgpack.packb({"src": src, "printer": printer, **({"token": NODE_TOKEN} if topic.startswith("sys/") else {})})
    return (bytes([len(topic_bytes)]) + topic_bytes + bytes([len(meta)]) + meta
            + msgpack.packb(payload, use_bin_type=True))


class IngestPublisher:
    """Publishes as PROTOCOL.md section 3 tells a foreign program to: PUSH one frame per event to the ingest."""

    def __init__(self, context: zmq.Context, bus: BusConfig):
        self.sock = context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(bus.ingest)

    def publish(self, topic: str, payload: dict, src: str = "user", printer: str | None = None):
        self.sock.send(ingest_frame(topic, payload, src, printer))

    def close(self):
        self.sock.close()


def control_request(context: zmq.Context, bus: BusConfig, command: bytes, args: dict, *frames: bytes,
                    timeout: float = 30) -> dict:
    """One control request (PROTOCOL.md section 5) on a DEALER of its own; returns the OK reply's map."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(bus.replay)
    try:
        dealer.send_multipart([command, msgpack.packb({"id": 1, **args}), *frames])
        assert dealer.poll(timeout * 1000), f"no reply to {command!r}"
        status, reply = dealer.recv_multipart()[:2]
        reply = msgpack.unpackb(reply)
        assert status == b"OK" and reply["id"] == 1, reply
        return reply
    finally:
        dealer.close()


def wait_sequenced(context: zmq.Context, bus: BusConfig, group: str, seq: int, timeout: float = 60):
    """Ask STATUS until the broker has sequenced `seq` events of `group` (each answer takes a round trip)."""
    deadline = time.monotonic() + timeout
    while control_request(context, bus, b"STATUS", {})["streams"].get(group, 0) < seq:
        if time.monotonic() > deadline:
            pytest.fail(f"the broker did not sequence {seq} events of {group} within {timeout} s")


def acknowledged_publish(context: zmq.Context, bus: BusConfig, topic: str, payload: dict, src: str = "user") -> dict:
    """PUBLISH on the control socket: returns once the broker has sequenced the event."""
    return control_request(context, bus, b"PUBLISH", {}, ingest_frame(topic, payload, src))


# ---------------------------------------------------------------------------------------------- comparing


def as_json(value):
    """A Python payload as the clients render it (bytes are tagged, the rest is plain JSON)."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bin": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def typed(value):
    """A comparable form that keeps types apart (1 != 1.0 != True), unlike Python's ==."""
    if isinstance(value, dict):
        return ("map", tuple(sorted((k, typed(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("list", tuple(typed(v) for v in value))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value)


def catalogue_names() -> list[str]:
    names = []
    for name in events.EVENTS:
        if name in events.SCRIPT_TEMPLATES:
            name = name.replace("${ScriptName}", "AfterPrintDone")
        elif name == "Heartbeat":
            continue  # the broker's own: a forged one would carry a meaningless `streams`
        names.append(name)
    return names


def varied_payload(index: int, name: str) -> dict:
    keys = events.lookup(name).payload
    return events.complete_payload(name, {key: VALUES[(3 * index + j) % len(VALUES)] for j, key in enumerate(keys)})


# ---------------------------------------------------------------------------------------------- tests


def test_client_decodes_every_catalogue_event(client, brokers, short_tmp, zmq_context, run_client):
    bus = BusConfig.for_dir(short_tmp, heartbeat=0.2)
    broker = brokers(bus)
    names = catalogue_names()
    groups = sorted({events.group_of(name) for name in names} - {"sys"})
    # The sys group is asked for by topic, so the client subscribes to sys/ and filters locally (no heartbeats).
    sys_topics = [events.topic_of(name) for name in names if events.group_of(name) == "sys"]
    subscriber = run_client(client_argv(client, bus, *groups, *sys_topics, count=len(names)))
    assert subscriber.wait_ready() == broker.epoch

    # Published right after READY: whatever the SUB misses while its subscription propagates, it must repair.
    sent = {}
    publisher = IngestPublisher(zmq_context, bus)
    try:
        for index, name in enumerate(names):
            topic = events.topic_of(name)
            sent[topic] = (varied_payload(index, name), SOURCES[index % len(SOURCES)], PRINTERS[index % len(PRINTERS)])
            publisher.publish(topic, *sent[topic])
        assert subscriber.finish() == 0, "\n".join(subscriber.err)
    finally:
        publisher.close()

    received = subscriber.events()
    assert sorted(event["topic"] for event in received) == sorted(sent)
    seqs: dict[str, list[int]] = {}
    for event in received:
        payload, src, printer = sent[event["topic"]]
        assert typed(event["payload"]) == typed(as_json(payload)), event["topic"]
        assert (event["node"], event["printer"], event["src"], event["epoch"]) == ("test", printer, src, broker.epoch)
        assert isinstance(event["ts"], int) and 0 < event["ts"] < 2**53
        seqs.setdefault(event["topic"].split("/")[0], []).append(event["seq"])
    for group, got in seqs.items():
        if group == "sys":
            assert got == sorted(got), got  # heartbeats share the sys counter
        else:
            assert got == list(range(1, len(got) + 1)), (group, got)
    stats = subscriber.stats()
    assert stats["lost"] == 0 and stats["missing"] == 0
    assert stats["bad_frames"] == stats["bad_header"] == stats["bad_payload"] == 0


def test_client_repairs_events_its_socket_dropped(client, brokers, short_tmp, zmq_context, run_client):
    # A small broker-side queue and a client that is frozen (SIGSTOP) while 20 000 events flow: the XPUB drops
    # most of them for this subscriber, deterministically, with no sleep.
    bus = BusConfig.for_dir(short_tmp, heartbeat=0.2, hwm=1000)
    brokers(bus)
    total = 20_000
    subscriber = run_client(client_argv(client, bus, "gcode", count=total, extra=("--rcvhwm", "100")))
    subscriber.wait_ready()
    subscriber.proc.send_signal(signal.SIGSTOP)
    publisher = IngestPublisher(zmq_context, bus)
    try:
        for i in range(1, total + 1):
            publisher.publish("gcode/ZChange", {"new": i, "old": i - 1, "note": "layer ✓"}, src="gcode")
        wait_sequenced(zmq_context, bus, "gcode", total)
    finally:
        publisher.close()
        subscriber.proc.send_signal(signal.SIGCONT)
    assert subscriber.finish(120) == 0, "\n".join(subscriber.err[-20:])

    received = subscriber.events()
    assert [event["payload"]["new"] for event in received] == list(range(1, total + 1))
    assert [event["seq"] for event in received] == list(range(1, total + 1))
    stats = subscriber.stats()
    assert stats["replayed"] > 0 and stats["gaps"] > 0, stats  # the socket did drop, and REPLAY filled it in
    assert stats["lost"] == 0 and stats["missing"] == 0


def test_client_notices_a_broker_restart_and_resyncs(client, brokers, short_tmp, zmq_context, run_client):
    bus = BusConfig.for_dir(short_tmp, heartbeat=0.2)
    first = brokers(bus)
    subscriber = run_client(client_argv(client, bus, "print", count=3))
    assert subscriber.wait_ready() == first.epoch
    publisher = IngestPublisher(zmq_context, bus)
    try:
        publisher.publish("print/PrintStarted", {"name": "a.gcode"})
        subscriber.wait_lines(1)
    finally:
        publisher.close()
    brokers.stop(first)
    second = brokers(bus)
    assert second.epoch != first.epoch
    # Sent while the client may still be reconnecting: the new epoch's heartbeat makes it replay from 0.
    assert acknowledged_publish(zmq_context, bus, "print/PrintDone", {"name": "a.gcode", "time": 12.5})["seq"] == 1
    assert acknowledged_publish(zmq_context, bus, "print/PrintStarted", {"name": "b.gcode"})["seq"] == 2
    assert subscriber.finish() == 0, "\n".join(subscriber.err)

    received = subscriber.events()
    assert [(e["epoch"], e["seq"], e["topic"]) for e in received] == [
        (first.epoch, 1, "print/PrintStarted"), (second.epoch, 1, "print/PrintDone"),
        (second.epoch, 2, "print/PrintStarted")]
    assert received[1]["payload"] == {"name": "a.gcode", "time": 12.5}
    assert subscriber.stats()["epochs"] == 1


# --- against a hand-driven peer: what a real broker never sends, or only in a race ------------------------------


class Peer:
    """The broker's side of the protocol driven by hand: an XPUB and a ROUTER sending exactly the given frames."""

    def __init__(self, context: zmq.Context, directory: Path):
        self.publish, self.control = f"ipc://{directory}/peer-pub.sock", f"ipc://{directory}/peer-control.sock"
        self.xpub = context.socket(zmq.XPUB)
        self.router = context.socket(zmq.ROUTER)
        for sock, endpoint in ((self.xpub, self.publish), (self.router, self.control)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)

    def argv(self, prefix: list[str], *topics: str, count: int) -> list[str]:
        return [*prefix, "--publish", self.publish, "--control", self.control, "--count", str(count), "--timeout",
                "60", *topics]

    def wait_subscribed(self, expected: set):
        subscriptions = set()
        while subscriptions != expected:
            assert self.xpub.poll(30_000), f"subscriptions so far: {subscriptions}"
            message = self.xpub.recv()
            if message[:1] == b"\x01":
                subscriptions.add(message[1:])

    def request(self, command: bytes) -> tuple[bytes, dict]:
        assert self.router.poll(30_000), f"no {command.decode()} request"
        identity, got, args = self.router.recv_multipart()
        assert got == command, (got, args)
        return identity, msgpack.unpackb(args)

    def reply(self, identity: bytes, *frames: bytes):
        self.router.send_multipart([identity, *frames])

    def send(self, *frames: bytes):
        self.xpub.send_multipart(list(frames))

    def close(self):
        self.xpub.close()
        self.router.close()


@pytest.fixture
def peer(zmq_context, short_tmp):
    peer = Peer(zmq_context, short_tmp)
    yield peer
    peer.close()


def _header(seq: int, epoch: int = 7, **changes) -> bytes:
    header = {"v": 1, "node": "peer", "printer": None, "epoch": epoch, "src": "test", "seq": seq,
              "ts": 1_700_000_000}
    header.update(changes)
    return msgpack.packb({k: v for k, v in header.items() if v is not ...})


def _map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A msgpack map from already-encoded keys and values (to put in what msgpack.packb would refuse or fix)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(key + value for key, value in pairs)


def _nested_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


def test_client_follows_epochs_and_reports_lost_events(client, peer, run_client):
    """A REPLAY answered from a newer broker run, stragglers of the old run, and events gone from the ring."""
    subscriber = run_client(peer.argv(client, "print", count=5))
    peer.wait_subscribed({b"print/", b"sys/Heartbeat"})
    identity, args = peer.request(b"STATUS")
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"], "epoch": 7, "streams": {"print": 0}}))
    subscriber.wait_ready()

    def event(epoch: int, seq: int) -> list[bytes]:
        return [b"print/PrintProgress", _header(seq, epoch), msgpack.packb({"progress": seq, "run": epoch})]

    peer.send(*event(7, 1))
    peer.send(*event(7, 3))  # hole at 2: the client asks, but the broker has restarted meanwhile
    identity, args = peer.request(b"REPLAY")
    assert (args["group"], args["since"], args["epoch"]) == ("print", 1, 7)
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"], "epoch": 8, "group": "print", "last": 1, "count": 0,
                                               "more": False, "lost": 0}))
    identity, args = peer.request(b"REPLAY")  # so it starts again from 0 in the new run
    assert (args["since"], args["epoch"]) == (0, 8)
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"], "epoch": 8, "group": "print", "last": 1, "count": 1,
                                               "more": False, "lost": 0}), *event(8, 1))
    peer.send(*event(7, 4))  # a straggler of the old run: stale, not another restart
    peer.send(*event(8, 2))
    peer.send(*event(8, 10))  # hole 3..9, of which only 9 is still in the ring
    identity, args = peer.request(b"REPLAY")
    assert (args["since"], args["epoch"]) == (2, 8)
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"], "epoch": 8, "group": "print", "last": 10, "count": 1,
                                               "more": False, "lost": 6}), *event(8, 9))
    assert subscriber.finish() == 0, "\n".join(subscriber.err)
    assert not peer.router.poll(0), "an unexpected request"

    assert [(e["epoch"], e["seq"], e["payload"]["run"]) for e in subscriber.events()] == [
        (7, 1, 7), (8, 1, 8), (8, 2, 8), (8, 9, 8), (8, 10, 8)]
    stats = subscriber.stats()
    assert (stats["epochs"], stats["stale"], stats["lost"], stats["missing"], stats["replays"]) == (1, 2, 6, 6, 3)
    assert any("6 events already left the ring" in line for line in subscriber.err)


def test_c_client_survives_odd_input(c_subscriber, peer, run_client):
    subscriber = run_client(peer.argv([str(c_subscriber)], "gcode", count=2))
    peer.wait_subscribed({b"gcode/", b"sys/Heartbeat"})
    identity, args = peer.request(b"STATUS")
    peer.reply(identity, b"OK")  # malformed: no map
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"] + 100, "epoch": 1}))  # a late reply to another id
    peer.reply(identity, b"OK", msgpack.packb({"id": args["id"], "epoch": 7, "streams": {"gcode": 0}}))
    subscriber.wait_ready()

    good = msgpack.packb({"new": 0.4, "old": 0.2})
    odd_but_valid = _map(
        (msgpack.packb("nan"), msgpack.packb(float("nan"))),
        (msgpack.packb("inf"), msgpack.packb(float("inf"))),
        (msgpack.packb("-inf"), msgpack.packb(float("-inf"))),
        (msgpack.packb(1), msgpack.packb("int key")),
        (msgpack.packb(None), msgpack.packb("nil key")),
        (msgpack.packb("bad_utf8"), b"\xa3\xff\xfeA"),
        (msgpack.packb("ext"), msgpack.packb(msgpack.ExtType(5, b"\x01\x02"))),
        (msgpack.packb("ctrl"), msgpack.packb('tab\tnl\n\x01 "quote" back\\ \x7f é')),
        (msgpack.packb("f32"), msgpack.packb(1.5, use_single_float=True)),
        (msgpack.packb("deep"), _nested_arrays(31)),  # 32 levels with the payload map: the most accepted
        (msgpack.packb("extremes"), msgpack.packb([2**64 - 1, -(2**63), -1, 0, 1e-300])),
        (msgpack.packb("empties"), msgpack.packb([{}, [], "", b""], use_bin_type=True)),
    )
    messages = [
        [b"gcode/ZChange"],                                                       # bad_frames
        [b"gcode/ZChange", _header(1), good, b"extra"],                           # bad_frames
        [b"gcode/", _header(1), good],                                        # bad_topic: no name
        [b"gcode/ZChange", b"\xc1", good],                                        # bad_header: not msgpack
        [b"gcode/ZChange", msgpack.packb([1, 2]), good],                          # bad_header: not a map
        [b"gcode/ZChange", _header(..., node=7), good],                       # bad_header: no seq, node
        [b"gcode/ZChange", _header(1, v=2), good],                                # bad_header: version
        [b"gcode/ZChange", _header(1) + b"\x00", good],                           # bad_header: trailing
        [b"gcode/ZChange", _header(1), b"\x93\x01"],                              # bad_payload: truncated
        [b"gcode/ZChange", _header(2), msgpack.packb([1, 2, 3])],                 # bad_payload: not a map
        [b"gcode/ZChange", _header(3), b"\x81\xa1d" + _nested_arrays(32)],        # bad_payload: too deep
        [b"gcode/ZChange", _header(4), b"\x81\xa1x\xdd\xff\xff\xff\xff"],         # bad_payload: 4G elements
        [b"gcode/ZChange", _header(5), odd_but_valid],                            # delivered
        [b"gcode/ZChange", _header(5), good],                                     # dupes
        [b"gcode/ZChange", _header(6, printer="p1"), good],                       # delivered
    ]
    for frames in messages:
        peer.send(*frames)
    assert subscriber.finish() == 0, "\n".join(subscriber.err)
    assert not peer.router.poll(0), "the client asked for a REPLAY although no seq was missing"

    first, second = subscriber.events()
    assert first["payload"] == {
        "nan": {"$float": "NaN"}, "inf": {"$float": "Infinity"}, "-inf": {"$float": "-Infinity"},
        "1": "int key", "null": "nil key", "bad_utf8": "\ufffd\ufffdA", "ext": {"$ext": 5, "data": "AQI="},
        "ctrl": 'tab\tnl\n\x01 "quote" back\\ \x7f é', "f32": 1.5, "deep": json.loads("[" * 31 + "1" + "]" * 31),
        "extremes": [2**64 - 1, -(2**63), -1, 0, 1e-300], "empties": [{}, [], "", {"$bin": ""}]}
    assert (first["seq"], first["epoch"], first["node"], first["printer"]) == (5, 7, "peer", None)
    assert typed(second["payload"]) == typed({"new": 0.4, "old": 0.2}) and second["printer"] == "p1"
    stats = subscriber.stats()
    assert {key: stats[key] for key in ("bad_frames", "bad_topic", "bad_header", "bad_payload", "dupes",
                                        "bad_replies", "late_replies", "delivered", "replays")} == {
        "bad_frames": 2, "bad_topic": 1, "bad_header": 5, "bad_payload": 4, "dupes": 1, "bad_replies": 1,
        "late_replies": 1, "delivered": 2, "replays": 0}
    assert any("bad payload on gcode/ZChange seq 4" in line for line in subscriber.err)


# --- the clients' own errors: one clear line and a distinct exit status ------------------------------------------


def test_client_without_broker_says_so(client, short_tmp, run_client):
    bus = BusConfig.for_dir(short_tmp)
    subscriber = run_client(client_argv(client, bus, "print", count=1, extra=("--control-timeout", "0.5")))
    assert subscriber.finish() == 3
    assert any(line.startswith("ERROR broker did not answer STATUS") for line in subscriber.err), subscriber.err
    assert subscriber.out == []


def test_client_times_out_with_non_zero_status(client, brokers, short_tmp, run_client):
    bus = BusConfig.for_dir(short_tmp, heartbeat=0.2)
    brokers(bus)
    subscriber = run_client(client_argv(client, bus, "print", count=1, timeout=0.5))
    assert subscriber.finish() == 1
    assert any(line.startswith("TIMEOUT") for line in subscriber.err), subscriber.err
    assert subscriber.stats()["delivered"] == 0


@pytest.mark.parametrize("args, message", [
    (["--publish", "ipc:///nowhere", "print"], "--publish and --control are required"),
    (["--publish", "ipc:///a", "--control", "ipc:///b"], "give at least one PREFIX"),
    (["--publish", "ipc:///a", "--control", "ipc:///b", "--count", "many", "print"], "bad value for --count"),
    (["--publish", "ipc:///a", "--control", "ipc:///b", "--colour", "red", "print"], "unknown option --colour"),
])
def test_client_rejects_bad_arguments(client, run_client, args, message):
    subscriber = run_client([*client, *args])
    assert subscriber.finish() == 2
    assert any(message in line for line in subscriber.err), subscriber.err


def test_a_c_publisher_reaches_python_subscribers(c_publisher, brokers, short_tmp):
    """c_publisher.c builds ingest frames from PROTOCOL.md section 3 with msgpack-c: every event arrives, stamped,
    in order, with its src, printer and payload (UTF-8 beyond the BMP, uint64's top, a float, nil) intact."""
    config = BusConfig.for_dir(short_tmp, node="interop", heartbeat=0.2)
    broker = brokers(config)
    subscriber = bus.Subscriber(config, groups=["gcode", "custom"])
    try:
        for topic, src, printer, count in (("gcode/Home", "firmware", "Prüsa MK3 🐰", 300),
                                           ("custom/MyPlugin_Thing", "user", "-", 5)):
            result = subprocess.run([str(c_publisher), config.ingest, topic, src, printer, str(count)],
                                    capture_output=True, text=True, timeout=60)
            assert (result.returncode, result.stdout.strip()) == (0, f"SENT {count}"), result.stderr
            got = [subscriber.recv(10) for _ in range(count)]
            assert None not in got, f"only {got.index(None)} of {count} events of {topic} arrived"
            assert [e.payload for e in got] == [
                {"i": k, "name": "Bénchy 🐰", "x": k / 4, "big": 2**64 - 1 - k, "none": None} for k in range(count)]
            assert {(e.topic, e.src, e.printer, e.node, e.epoch) for e in got} == {
                (topic, src, None if printer == "-" else printer, "interop", broker.epoch)}
            assert [e.seq for e in got] == list(range(1, count + 1))
        assert broker.counters["bad"] == 0
    finally:
        subscriber.close()


def test_the_c_publisher_refuses_bad_arguments(c_publisher):
    result = subprocess.run([str(c_publisher), "ipc:///nowhere", "NoGroup", "user", "-", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "TOPIC <group>/<Event>" in result.stderr
