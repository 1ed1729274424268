"""A real Mosquitto for the MQTT tests and benchmark (on a free loopback port, its config and persistence in a
directory of the test's), and a recording paho subscriber.  Tests skip when /usr/sbin/mosquitto is missing."""
from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import struct
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

    def __init__(self, directory: Path, port: int | None = None, persistence: bool = True, tls: bool = False,
                 websockets: bool = False):
        """``tls``: a second listener with a self-signed certificate for 127.0.0.1 (``tls_url``, ``cafile``);
        ``websockets``: a second listener for MQTT over websockets (``ws_url``).  With ``persistence``, the
        database (retained messages, sessions and their queues) is saved when Mosquitto stops cleanly."""
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = self.directory / "mosquitto.conf"
        # `user`: run as whoever runs the tests (as root, Mosquitto would switch to the `mosquitto` user, which
        # cannot write its persistence file here).
        # `max_queued_messages 0`: a persistent subscriber's queue unbounded while it is away.  `max_inflight_messages`
        # not 0 (unbounded): Mosquitto 2.0.11 then restores the QoS 2 messages that were in flight to a subscriber at
        # a restart as new PUBLISHes (seen after PUBREL: the subscriber gets them twice).
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "max_queued_messages 0",
                 "max_inflight_messages 1000", "log_dest stderr", "log_type error", "log_type warning"]
        if tls:
            self.cafile, keyfile = self.directory / "cert.pem", self.directory / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-keyout", str(keyfile),
                            "-out", str(self.cafile)], check=True, capture_output=True, timeout=60)
            self.tls_port = free_port()
            self.tls_url = f"mqtts://127.0.0.1:{self.tls_port}"
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {self.cafile}", f"keyfile {keyfile}"]
        if websockets:
            self.ws_port = free_port()
            self.ws_url = f"ws://127.0.0.1:{self.ws_port}/mqtt"
            # Debian's Mosquitto 2.0.11 has websockets (libwebsockets 4.1); without `socket_domain ipv4` that
            # listener binds every interface whatever its address (and alone, without a TCP listener, it does not
            # start).
            lines += [f"listener {self.ws_port} 127.0.0.1", "protocol websockets", "socket_domain ipv4"]
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


class Relay:
    """A TCP relay on a free loopback port in front of a broker, for losing packets in transit as a real network
    does when a connection breaks: ``hold()`` keeps what the broker sends (acks) from reaching the client, ``cut()``
    drops every connection and what it held; new connections are relayed normally again (refused, closed at once,
    while ``refusing``)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.lock = threading.Condition()
        self.holding = False
        self.holding_upstream = False
        self.refusing = False
        self.held = 0                 # bytes from the broker kept back since hold()
        self.pairs: list = []
        self.closed = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the broker is down: the client retries
                continue
            pair = (client, upstream)
            with self.lock:
                if self.refusing and not self.closed:
                    client.close()
                    upstream.close()
                    continue
                if self.closed:
                    client.close()
                    upstream.close()
                    return
                self.pairs.append(pair)
            thread = threading.Thread(target=self._pump, args=pair, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, client, upstream):
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while True:
                for key, _ in selector.select(timeout=0.5):
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(client, upstream)
                        return
                    with self.lock:
                        if key.fileobj is upstream and self.holding:
                            self.held += len(data)
                            self.lock.notify_all()
                            continue
                        if key.fileobj is client and self.holding_upstream:
                            continue
                    try:
                        key.data.sendall(data)
                    except OSError:
                        self._drop(client, upstream)
                        return
                with self.lock:
                    if (client, upstream) not in self.pairs:
                        return

    def _drop(self, *sockets):
        with self.lock:
            for pair in list(self.pairs):
                if pair[0] in sockets:
                    self.pairs.remove(pair)
        for sock in sockets:
            with contextlib.suppress(OSError):
                # RST, not FIN: whatever was in flight is gone, as when a network link breaks
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def hold(self, from_broker: bool = True, from_client: bool = False):
        """Keep back what the broker sends, what the client sends, or both."""
        with self.lock:
            self.holding, self.holding_upstream, self.held = from_broker, from_client, 0

    def wait_held(self, nbytes: int, timeout: float = 60.0):
        with self.lock:
            if not self.lock.wait_for(lambda: self.held >= nbytes, timeout):
                pytest.fail(f"the broker sent {self.held} bytes within {timeout} s, not {nbytes}")

    def cut(self):
        with self.lock:
            pairs, self.pairs, self.holding, self.holding_upstream = list(self.pairs), [], False, False
        for pair in pairs:
            self._drop(*pair)

    def close(self):
        with self.lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)
