"""A real Mosquitto for the MQTT tests and benchmark (on a free loopback port, its config and persistence in a
directory of the test's), and a recording paho subscriber.  Tests skip when /usr/sbin/mosquitto is missing."""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """One Mosquitto process; ``restart()`` keeps its port and its persistence file (sessions, retained)."""

    def __init__(self, directory: Path, port: int | None = None, persistence: bool = True, tls: bool = False):
        """``tls``: a second listener with a self-signed certificate for 127.0.0.1 (``tls_url``, ``cafile``)."""
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = self.directory / "mosquitto.conf"
        # `user`: run as whoever runs the tests (as root, Mosquitto would switch to the `mosquitto` user, which
        # cannot write its persistence file here).
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "max_queued_messages 0",
                 "max_inflight_messages 0", "log_dest stderr", "log_type error", "log_type warning"]
        if tls:
            self.cafile, keyfile = self.directory / "cert.pem", self.directory / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-keyout", str(keyfile),
                            "-out", str(self.cafile)], check=True, capture_output=True, timeout=60)
            self.tls_port = free_port()
            self.tls_url = f"mqtts://127.0.0.1:{self.tls_port}"
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {self.cafile}", f"keyfile {keyfile}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/", "autosave_interval 0"]
        self.config.write_text("\n".join(lines) + "\n")
        self.process = None
        self.log = self.directory / "mosquitto.log"

    def start(self, timeout: float = 20.0) -> "Mosquitto":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self):
        self.stop()
        self.start()


class Recorder:
    """A paho client that records every message of its subscriptions: ``messages`` as (topic, payload, retain)."""

    def __init__(self, url: str, topics, client_id: str | None = None, clean: bool = True, qos: int = 1):
        import paho.mqtt.client as paho

        from zevents.bridges.settings import parse_url

        self.parsed = parse_url(url)
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.probe = f"probe/{uuid.uuid4().hex}"
        self.topics.append(self.probe)
        self.qos = qos
        self.messages: list = []
        self.lock = threading.Condition()
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean,
                                  protocol=paho.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.connect(self.parsed["host"], self.parsed["port"], 30)
        self.client.loop_start()
        if not self.subscribed.wait(20):
            raise RuntimeError("the recorder did not subscribe")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe([(topic, self.qos) for topic in self.topics])

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), message.retain))
            self.lock.notify_all()

    def wait(self, predicate, timeout: float = 60.0, message: str = "messages"):
        """Wait until predicate(messages) is truthy; returns its value, or fails the test."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate(self.messages)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = [(t, p[:120]) for t, p, _ in self.messages[-15:]]
                    pytest.fail(f"timed out after {timeout} s waiting for {message}; last: {tail}")
                self.lock.wait(min(remaining, 0.5))

    def retained(self, timeout: float = 30.0) -> dict:
        """Every retained message the broker had for our subscriptions, by topic: the broker delivers a probe we
        publish after subscribing only after those (one connection's packets are handled in order)."""
        self.client.publish(self.probe, b"probe", qos=1)
        self.wait(lambda m: any(t == self.probe for t, _, _ in m), timeout, message="the probe")
        retained = {}
        for topic, payload, retain in self.snapshot():
            if topic == self.probe:
                break
            if retain:
                retained.setdefault(topic, payload)
        return retained

    def snapshot(self) -> list:
        with self.lock:
            return list(self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
