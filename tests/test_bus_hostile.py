"""Hostile events: sys/ refused on ingest from anyone but the node; malformed sys events (forged heartbeats and
service events) and a fuzz of hostile payloads for every catalogue event leave every subscriber kind running:
``bus.Subscriber`` compiled and pure, ``zevents tail`` (plain and --json) and the hooks service."""
from __future__ import annotations

import json
import math
import os
import subprocess
import threading
from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for
from zevents import broker as broker_mod
from zevents import bus, events, wire
from zevents.config import BusConfig

TOKEN = "test-node-token"

MALFORMED_SYS = [
    ("Heartbeat", {"streams": [1, 2]}),
    ("Heartbeat", {"streams": {"gcode": "x"}}),
    ("Heartbeat", {"streams": {1: 2}}),
    ("Heartbeat", {"streams": None}),
    ("Heartbeat", {"streams": {"gcode": -5}}),
    ("Heartbeat", {"streams": {"gcode": 1.5}}),
    ("Heartbeat", {"streams": {"gcode": True}}),
    ("Heartbeat", {"epoch": "x"}),
    ("Heartbeat", {"streams": {}, "interval": "soon"}),
    ("Heartbeat", {"streams": {"gcode": {"deep": [1]}}, "uptime": [None]}),
    ("ServiceStarted", {"service": 7, "pid": "x"}),
    ("ServiceStarted", {"service": ["hooks"], "pid": None}),
    ("ServiceRestarted", {"service": {}, "restarts": "many"}),
    ("ServiceFailed", {"service": None, "returncode": "x"}),
    ("Whatever", {"streams": {"gcode": 1}}),
]

# Values of every msgpack kind, and the awkward ones of each (sizes, signs, NaN, control characters, deep nesting).
HOSTILE_VALUES = [
    None, True, 0, -1, 2 ** 63, -(2 ** 63), 2 ** 64 - 1, 1.5, math.nan, math.inf, -math.inf, "", "x" * 5000,
    "\x00\n\r\x1b[31m;$(rm -rf /)`id`", "-o/tmp/x", "{__json}", "%s%n", "\ud7ff\U0010ffff", b"\x00\xff", [], {},
    [[[[[[[[[[1]]]]]]]]]], {"a": {"b": {"c": [None, {"d": b"x"}]}}}, [1, "a", None, [b""]], {1: 2, b"k": "v"},
    msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 2),
]


def hostile_payloads(name: str, keys: tuple) -> list:
    """For one event: each key given each hostile value, all keys missing, unknown and non-string keys."""
    payloads = [{}, {"unexpected": 1}, {1: "int key"}, {b"bytes": "bin key"}, {None: None}]
    for value in HOSTILE_VALUES:
        payloads.append({key: value for key in keys} or {"value": value})
    return payloads


def _frame(name: str, payload: dict, src: str = "fuzz", token: str | None = None) -> bytes:
    topic = f"sys/{name}".encode() if token else wire.topic_bytes(name)
    return wire.ingest_frame(topic, wire.ingest_meta(src, "p1", token),
                             msgpack.packb(payload, use_bin_type=True, strict_types=False))


@pytest.fixture
def node_broker(short_tmp, monkeypatch):
    """A broker that holds a node token, as under `zevents run`."""
    monkeypatch.setattr(bus, "_NODE_TOKEN", TOKEN)
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=0.2)
    brk, thread = broker_mod.serve_in_thread(config)
    yield config, brk
    brk.stop()
    thread.join(5)
    brk.close()


def test_sys_events_are_refused_on_ingest_from_anyone_but_the_node(node_broker, monkeypatch):
    config, brk = node_broker
    control = bus.Control(config)
    try:
        for token in (None, "wrong"):
            with pytest.raises(bus.BusError, match="rejected"):
                control.request(wire.CMD_PUBLISH, {}, 5, (_frame("ServiceStarted", {"service": "x", "pid": 1},
                                                                 token=token),))
        stranger = bus.Publisher(config)
        monkeypatch.setattr(bus, "_NODE_TOKEN", None)     # a process the node did not start
        stranger.publish("Heartbeat", {"streams": {"gcode": 99}})
        stranger.publish("ServiceStarted", {"service": "x", "pid": 1})
        assert stranger.flush(10) == 0
        stranger.close()
        counters = control.status()["counters"]
        assert counters["bad_sys"] == 4 and "sys" not in brk.seqs or brk.seqs["sys"] == 0 or \
            all(e[2] == wire.HEARTBEAT_TOPIC for e in brk.ring if e[0] == "sys")
        # The node's own children carry the token and are served.
        monkeypatch.setattr(bus, "_NODE_TOKEN", TOKEN)
        meta, _ = control.request(wire.CMD_PUBLISH, {}, 5, (_frame("ServiceStarted", {"service": "x", "pid": 1},
                                                                   token=TOKEN),))
        assert meta["topic"] == "sys/ServiceStarted"
    finally:
        control.close()


def _tail(zevents_cmd, config_path, *args):
    return subprocess.Popen([*zevents_cmd, "tail", "-c", str(config_path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _write_config(short_tmp: Path, config: BusConfig, hooks: bool) -> Path:
    data = {"bus": {"node": config.node, "publish": config.publish, "ingest": config.ingest, "replay": config.replay,
                    "heartbeat": config.heartbeat, "journal": False},
            "printer": {"commands": f"ipc://{short_tmp}/printer.sock"}}
    if hooks:
        names = [spec.name for spec in events.EVENTS.values() if spec.group not in ("sys", "hook")]
        data["events"] = {"enabled": True, "subscriptions": [
            {"event": names, "type": "system", "name": "fuzz",
             "command": ["true", "{__eventname}", "{__json}", "{__data}", "{__filename}", "{__progress}",
                         "{__currentZ}", "{name}", "{path}", "{file}", "{progress}", "{z}", "{reason}"]}]}
    path = short_tmp / ("hooks.yaml" if hooks else "tail.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def test_malformed_sys_events_and_hostile_payloads_leave_every_subscriber_running(node_broker, short_tmp,
                                                                                    zevents_cmd):
    config, brk = node_broker
    tail_config = _write_config(short_tmp, config, hooks=False)
    hooks_config = _write_config(short_tmp, config, hooks=True)
    subscribers = [bus.Subscriber(config, compiled=compiled) for compiled in (False, None)]
    log = open(short_tmp / "hooks.log", "w+")
    env = {k: v for k, v in os.environ.items() if k != wire.NODE_TOKEN_ENV}
    hooks = subprocess.Popen([*zevents_cmd, "hooks", "-c", str(hooks_config)], stdout=log, stderr=log, env=env)
    tails = [_tail(zevents_cmd, tail_config), _tail(zevents_cmd, tail_config, "--json")]
    control = bus.Control(config)
    count = [0] * len(subscribers)
    done = threading.Event()

    def drain(k):
        while not done.is_set():
            if subscribers[k].recv(0.2) is not None:
                count[k] += 1

    readers = [threading.Thread(target=drain, args=(k,)) for k in range(len(subscribers))]
    try:
        wait_for(lambda: "hooks service ready" in Path(log.name).read_text() or hooks.poll() is not None, 30,
                 message="the hooks service to subscribe")
        for reader in readers:
            reader.start()
        sent = 0
        # The forged sys events come from a node child gone wrong: it holds the token.
        for name, payload in MALFORMED_SYS:
            control.request(wire.CMD_PUBLISH, {}, 5, (_frame(name, payload, src="node", token=TOKEN),))
            sent += 1
        for spec in events.EVENTS.values():
            if spec.group == "sys":
                continue
            for payload in hostile_payloads(spec.name, tuple(spec.payload)):
                control.request(wire.CMD_PUBLISH, {}, 5, (_frame(spec.name, payload),))
                sent += 1
        # Every one of them still answers: a last, ordinary event reaches each.
        control.request(wire.CMD_PUBLISH, {}, 5, (_frame("Home", {"sentinel": True}),))
        for tail in tails:
            wait_for(lambda: tail.poll() is not None or _saw_sentinel(tail), 60,
                     message="the sentinel in zevents tail")
            assert tail.poll() is None, tail.stderr.read()
        wait_for(lambda: all(c >= sent + 1 - len(MALFORMED_SYS) for c in count), 60,
                 message=f"every event in both subscribers ({count} of {sent + 1})")
        for subscriber in subscribers:
            assert subscriber.stats.bad_frames == len(MALFORMED_SYS)
            assert subscriber.stats.lost == 0
        wait_for(lambda: "fuzz" in Path(log.name).read_text() or hooks.poll() is not None, 30,
                 message="the hooks service to run the fuzz hook")
        assert hooks.poll() is None, Path(log.name).read_text()[-3000:]
        assert "Traceback" not in Path(log.name).read_text()
    finally:
        done.set()
        for reader in readers:
            if reader.is_alive():
                reader.join(5)
        for process in (*tails, hooks):
            process.terminate()
            process.wait(10)
            if process.stdout:
                process.stdout.close()
                process.stderr.close()
        log.close()
        control.close()
        for subscriber in subscribers:
            subscriber.close()


def _saw_sentinel(tail) -> bool:
    """Whether tail printed the sentinel yet.  Reads the pipe's bytes directly: a readline() on the text wrapper
    would leave lines in its buffer, where select() on the descriptor no longer sees them."""
    fd = tail.stdout.fileno()
    os.set_blocking(fd, False)
    seen = getattr(tail, "seen_output", b"")
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            seen = (seen + chunk)[-4096:]
            if b"sentinel" in seen:
                break
    except BlockingIOError:
        pass
    tail.seen_output = seen
    return b"sentinel" in seen
