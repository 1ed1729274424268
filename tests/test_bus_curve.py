"""CURVE + ZAP on the bus: a client with the right key is served on every socket (ingest, publish, control); one
with a wrong key, or none, is refused on each; TCP beyond loopback without CURVE is warned about at start."""
from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess


import pytest

from conftest import collect, wait_for
from zevents import broker as broker_mod
from zevents import bus, curve
from zevents.config import BusConfig


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tcp(host: str, **overrides) -> BusConfig:
    ports = [_free_port() for _ in range(3)]
    return BusConfig(node="n", publish=f"tcp://{host}:{ports[0]}", ingest=f"tcp://{host}:{ports[1]}",
                     replay=f"tcp://{host}:{ports[2]}", heartbeat=0.2, **overrides)


@pytest.fixture
def keys():
    server, node, friend, stranger = (curve.new_keypair() for _ in range(4))
    server_side = {"server_public": server[0], "server_secret": server[1], "client_public": node[0],
                   "client_secret": node[1], "allowed_clients": [friend[0]]}
    return server_side, server, friend, stranger


def _client(config: BusConfig, server, pair) -> BusConfig:
    return dataclasses.replace(config, curve={"server_public": server[0], "client_public": pair[0],
                                              "client_secret": pair[1]})


@pytest.fixture
def curve_broker(keys):
    server_side = keys[0]
    config = _tcp("127.0.0.1", curve=server_side)
    brk, thread = broker_mod.serve_in_thread(config)
    yield config
    brk.stop()
    thread.join(5)
    brk.close()


def test_a_client_with_an_allowed_key_is_served(curve_broker, keys):
    _, server, friend, _ = keys
    config = _client(curve_broker, server, friend)
    control = bus.Control(config)
    try:
        assert control.ping(timeout=10)["node"] == "n"
        with bus.Subscriber(config, groups=["gcode"]) as sub, bus.Publisher(config, src="friend") as pub:
            wait_for(lambda: control.status()["subscriptions"] >= 1, message="the subscription")
            pub.publish("Home", {"x": 1})
            assert pub.flush(10) == 0
            got = collect(sub, 1, timeout=10)
            assert got[0].payload == {"x": 1} and got[0].src == "friend"
    finally:
        control.close()


@pytest.mark.parametrize("who", ["wrong key", "no CURVE"])
def test_a_client_with_a_wrong_key_is_refused_on_every_socket(curve_broker, keys, who, caplog):
    server_side, server, friend, stranger = keys
    config = _client(curve_broker, server, stranger) if who == "wrong key" else curve_broker.__class__(
        **{**dataclasses.asdict(curve_broker), "curve": None})
    trusted = bus.Control(_client(curve_broker, server, friend))
    control = bus.Control(config)
    sub = bus.Subscriber(config, groups=["gcode"], control_timeout=0.5)
    pub = bus.Publisher(config, src="stranger")
    try:
        with pytest.raises(bus.BusError):
            control.ping(timeout=1.5)
        pub.publish("Home", {"from": "stranger"})
        assert pub.close(linger=1.5) == 1      # never acknowledged: the broker did not take it
        # A trusted client publishes; the stranger's subscriber never sees it, and nothing of the stranger's
        # reached the stream.
        with bus.Publisher(_client(curve_broker, server, friend)) as friendly:
            friendly.publish("Home", {"from": "friend"})
            assert friendly.flush(10) == 0
        assert trusted.status(timeout=10)["streams"].get("gcode") == 1
        assert sub.recv(1.0) is None
        if who == "wrong key":
            assert any("refused a client" in r.getMessage() for r in caplog.records)
    finally:
        for closeable in (sub, control, trusted):
            closeable.close()


def test_tcp_beyond_loopback_without_curve_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="zevents.broker")
    for host, exposed in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        brk, thread = broker_mod.serve_in_thread(_tcp(host))
        brk.stop()
        thread.join(5)
        brk.close()
        warned = any("reachable beyond this machine without bus.curve" in r.getMessage() for r in caplog.records)
        assert warned == exposed, host


def test_exposed_endpoints():
    assert curve.exposed_endpoints(["tcp://127.0.0.1:1", "tcp://localhost:2", "tcp://[::1]:3", "ipc:///x"]) == []
    assert curve.exposed_endpoints(["tcp://*:1", "tcp://0.0.0.0:2", "tcp://192.168.1.5:3", "tcp://eth0:4"]) == [
        "tcp://*:1", "tcp://0.0.0.0:2", "tcp://192.168.1.5:3", "tcp://eth0:4"]


def test_keys_new_prints_a_pair_that_config_check_accepts(tmp_path, zevents_cmd):
    out = subprocess.run([*zevents_cmd, "keys", "new"], capture_output=True, text=True, timeout=60, check=True)
    import yaml

    pair = yaml.safe_load(out.stdout)
    assert len(pair["public"]) == len(pair["secret"]) == 40 and pair["public"] != pair["secret"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"bus": {"curve": {"server_public": pair["public"],
                                                        "server_secret": pair["secret"],
                                                        "allowed_clients": [pair["public"]]}}}))
    check = subprocess.run([*zevents_cmd, "config", "check", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    config.write_text(yaml.safe_dump({"bus": {"curve": {"server_public": "short"}}}))
    check = subprocess.run([*zevents_cmd, "config", "check", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode != 0 and "bus.curve" in check.stdout + check.stderr

