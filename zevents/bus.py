"""The bus API: Publisher (PUSH to the broker's ingest), Control (requests to the broker's ROUTER) and Subscriber
(SUB on whole groups, local filtering, and silent repair of gaps, tail loss and broker restarts through
REPLAY/SNAPSHOT).  Also the `zevents fire` and `zevents tail` commands.

A Subscriber delivers every event of its groups published after it started (or after the ``since`` it resumes
from), in seq order per group, exactly once.  What it cannot repair (events that fell out of the replay ring, a
broker that died with events unpublished) is counted in ``stats`` and logged; it is never hidden.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import os
import struct
import sys
import threading
import time
import types
import weakref

import zmq

from zevents import events as _events
from zevents import wire
from zevents.config import BusConfig

log = logging.getLogger("zevents.bus")
# Taken out of the environment as soon as a service starts, so that what it runs (hook programs) never inherits it.
_NODE_TOKEN = os.environ.pop(wire.NODE_TOKEN_ENV, None)

SNDMORE = zmq.SNDMORE
NOBLOCK = zmq.NOBLOCK
REPLAY_CHUNK = 10000


def fast_send(sock: zmq.Socket):
    """The socket's send without pyzmq's Python-level wrapper (≈1 µs a call less; the hot paths send a lot)."""
    return types.MethodType(zmq.backend.Socket.send, sock)


class BusError(RuntimeError):
    """The broker did not answer, or refused a request."""


def _curve_client(sock: zmq.Socket, bus: BusConfig):
    """CURVE client keys on a socket when the bus is encrypted (zevents.curve)."""
    if bus.curve:
        from zevents import curve

        curve.client(sock, bus.curve)


def _bus(bus) -> BusConfig:
    return bus.bus if hasattr(bus, "bus") and not isinstance(bus, BusConfig) else bus


class Publisher:
    """Sends events to the broker's ingest.  Cheap to call on a hot path: topics and meta frames are cached.

    Every event is numbered and kept in an outbox until the broker acknowledges that it sequenced (and journaled)
    it: after a broker crash and restart the unacknowledged ones are sent again, and the broker takes each number
    once, in order.  Acknowledgements are asked for as events are published (every ``ACK_INTERVAL`` seconds), by
    :meth:`flush` / :meth:`close`, and by a small watcher thread while events wait and the publisher is quiet.
    A Publisher may be shared by threads (a lock serialises its sockets).

    A publisher never blocks its caller for long: when the outbox (``hwm`` events) is full and the broker does
    not acknowledge any of it within ``send_timeout`` seconds, the event is refused, counted in ``dropped`` and
    logged.  :meth:`close` delivers what is queued within its linger, or counts and logs what it could not.
    """

    ACK_INTERVAL = 0.05      # seconds between acknowledgement requests while publishing
    ACK_TIMEOUT = 1.0        # an unanswered request is given up (the broker is away) and asked again
    STALL = 1.0              # sent events unacknowledged this long while the broker answers: sent again

    def __init__(self, bus, src: str = "user", printer: str | None = None, context: zmq.Context | None = None,
                 send_timeout: float = 1.0, linger: float = 10.0):
        self.bus = _bus(bus)
        self.context = context or zmq.Context.instance()
        self.src = src
        self.printer = printer
        self.dropped = 0
        self.send_timeout = send_timeout
        self.linger = linger
        self.sock = self.context.socket(zmq.PUSH)
        self.sock.sndhwm = self.bus.hwm
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
        self.sock.setsockopt(zmq.LINGER, 0)   # what is not acknowledged is in the outbox, not in ZeroMQ's hands
        _curve_client(self.sock, self.bus)
        self.sock.connect(self.bus.ingest)
        self._send = fast_send(self.sock)
        self._heads: dict = {}
        self._control: Control | None = None
        self.id = os.urandom(8)
        self._prefix = b"\x00" + self.id
        self._outbox: collections.deque = collections.deque()   # frames numbered acked+1 .. number
        self._capacity = max(1, self.bus.hwm)
        self._burst_capacity = max(self._capacity, min(16 * self._capacity, 200_000))
        self._answered = None    # when the broker last answered an ACK
        self.number = 0          # the last number given to an event
        self.acked = 0           # the broker sequenced every event up to this number
        self._sent = 0           # the last number handed to ZeroMQ
        self._acks: zmq.Socket | None = None
        self._asked = None       # (request id, when, number sent by then) of the request in flight
        self._progress = time.monotonic()   # when the broker last acknowledged something new
        self._run = None
        self._next_ask = 0.0
        self._ask_ids = itertools.count(1)
        # The caller's thread and the watcher below share the sockets: one at a time.
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=_watch_publisher, args=(weakref.ref(self), self._closing),
                                         name="zevents-publisher-acks", daemon=True)
        self._watcher.start()

    def head(self, name_or_topic: str, src: str | None = None) -> bytes:
        """The cached ingest head (topic and meta) of an event name, or of a ``group/Name`` topic."""
        key = (name_or_topic, src)
        head = self._heads.get(key)
        if head is None:
            topic = name_or_topic.encode() if "/" in name_or_topic else wire.topic_bytes(name_or_topic)
            # Only the node's children hold its token, and only sys/ events need it.
            token = node_token() if topic.startswith(b"sys/") else None
            head = self._heads[key] = wire.ingest_head(topic, wire.ingest_meta(src or self.src, self.printer,
                                                                                token))
        return head

    def publish(self, name: str, payload: dict | None = None, src: str | None = None) -> bool:
        """Publish a catalogue or custom event by name (``Dwelling`` is sent as ``Dwell``), or by topic.
        False when it was refused (counted in ``dropped``): the broker acknowledged nothing for too long."""
        head = self._heads.get((name, src)) or self.head(name, src)
        body = wire.pack(payload if payload is not None else {})
        with self._lock:
            return self._submit(head, body)

    def send_frame(self, frame: bytes) -> bool:
        """Number an ingest frame, keep it until acknowledged, send it."""
        with self._lock:
            return self._submit(b"", frame)

    def _submit(self, head: bytes, body: bytes, _clock=time.monotonic, _number=struct.Struct(">Q").pack) -> bool:
        # The hot path of every publisher: one join builds the numbered frame.
        outbox = self._outbox
        if len(outbox) >= self._capacity and not self._room():
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.warning("publisher: broker unreachable (nothing acknowledged for %g s, %d events wait): "
                            "dropped an event (%d dropped so far)", self.send_timeout, len(outbox), self.dropped)
            return False
        number = self.number = self.number + 1
        numbered = b"".join((self._prefix, _number(number), head, body))
        outbox.append(numbered)
        if self._sent == number - 1:
            try:
                # Blocking (up to send_timeout) while the socket's queue is full: ZeroMQ's I/O thread keeps
                # sending what it holds after publish() returns, which an outbox alone would not.
                self._send(numbered)
                self._sent = number
            except zmq.Again:
                pass   # the broker is away: the outbox keeps it, _pump sends it when there is room
        if _clock() >= self._next_ask:
            self._pump()
        return True

    def _room(self) -> bool:
        """Room in the outbox: ``hwm`` events while the broker is away, more (as its own queue used to take)
        while it answers and merely lags behind a burst; waits up to ``send_timeout`` for acknowledgements."""
        deadline = time.monotonic() + self.send_timeout
        while True:
            answering = self._answered is not None and time.monotonic() - self._answered < self.ACK_TIMEOUT
            if len(self._outbox) < (self._burst_capacity if answering else self._capacity):
                return True
            if time.monotonic() >= deadline:
                return False
            self._pump(wait=min(0.05, max(0.0, deadline - time.monotonic())))

    def _ack_socket(self) -> zmq.Socket:
        if self._acks is None:
            self._acks = self.context.socket(zmq.DEALER)
            self._acks.setsockopt(zmq.LINGER, 0)
            _curve_client(self._acks, self.bus)
            self._acks.connect(self.bus.replay)
        return self._acks

    def _pump(self, wait: float = 0.0):
        """Read acknowledgements, send what is unsent, ask again: the outbox's whole life, never blocking longer
        than ``wait`` seconds."""
        now = time.monotonic()
        self._next_ask = now + self.ACK_INTERVAL
        sock = self._ack_socket()
        if self._asked is not None and sock.poll(wait * 1000):
            while True:
                try:
                    frames = sock.recv_multipart(NOBLOCK)
                except zmq.Again:
                    break
                try:
                    ok, meta, _ = wire.parse_reply(frames)
                except wire.WireError:
                    continue
                if ok and self._asked is not None and meta.get("id") == self._asked[0]:
                    self._acknowledged(meta)
        self._send_unsent()
        if self._asked is not None and time.monotonic() - self._asked[1] > self.ACK_TIMEOUT:
            # The broker is away (or restarting): a fresh socket, so a late reply can't be taken for a new one.
            self._acks.close(linger=0)
            self._acks = None
            self._asked = None
            sock = self._ack_socket()
        if self._asked is None and self.number > self.acked:
            request_id = next(self._ask_ids)
            try:
                sock.send_multipart(wire.request(wire.CMD_ACK, {"id": request_id, "publisher": self.id}), NOBLOCK)
                self._asked = (request_id, time.monotonic(), self._sent)
            except zmq.Again:
                pass

    def _acknowledged(self, meta: dict):
        asked, self._asked = self._asked, None
        self._answered = time.monotonic()
        last = meta.get("last")
        if not isinstance(last, int):
            return
        restarted = self._run is not None and meta.get("run") != self._run
        self._run = meta.get("run")
        outbox = self._outbox
        now = time.monotonic()
        if last > self.acked or last >= asked[2]:
            self._progress = now
        if last > self.acked:
            done = min(last, self.number) - self.acked
            if done >= len(outbox):
                outbox.clear()
            else:
                for _ in range(done):
                    outbox.popleft()
            self.acked = min(last, self.number)
        # Sent events the broker has not sequenced while it answers and sequences nothing more for a while (a
        # broker that died with them queued before this publisher ever heard from it), like those it saw out of
        # order: send them again.  A broker merely behind in a burst makes progress and is left alone.
        stalled = now - self._progress > self.STALL
        if restarted or meta.get("gap") or stalled or last < self.acked:
            if last < self.acked:
                # The broker forgot this publisher (its journal was lost): everything kept goes again.
                self.acked = self.number - len(outbox)
            self._sent = self.acked
            self._progress = now

    def _send_unsent(self):
        if self._sent >= self.number:
            return
        send = self._send
        outbox = self._outbox
        start = self._sent - self.acked
        for frame in itertools.islice(outbox, start, None):
            try:
                send(frame, NOBLOCK)
            except zmq.Again:
                return
            self._sent += 1

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until the broker acknowledged every event (sending again what a restarted broker lacks), at most
        ``timeout`` seconds; returns how many are still unacknowledged."""
        deadline = time.monotonic() + timeout
        while self.number > self.acked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with self._lock:
                self._next_ask = 0.0
                self._pump(wait=min(0.05, remaining))
        return self.number - self.acked

    def publish_confirmed(self, name: str, payload: dict | None = None, src: str | None = None,
                          timeout: float = 5.0) -> dict:
        """Publish through the control socket and wait for the broker's ack ({epoch, seq, topic})."""
        if self._control is None:
            self._control = Control(self.bus, self.context)
        return self._control.request(wire.CMD_PUBLISH, {}, timeout,
                                     (self.head(name, src) + wire.pack(payload or {}),))[0]

    def close(self, linger: float | None = None) -> int:
        """Deliver what is queued within ``linger`` seconds (default: the publisher's ``linger``); returns how
        many events could not be delivered, which are also added to ``dropped`` and logged."""
        self._closing.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        undelivered = self.flush(self.linger if linger is None else linger) if self.number > self.acked else 0
        if undelivered:
            self.dropped += undelivered
            log.warning("publisher: closed with %d events the broker never acknowledged (lost; %d dropped in all)",
                        undelivered, self.dropped)
        self._outbox.clear()
        self.acked = self.number
        if self._control is not None:
            self._control.close()
        if self._acks is not None:
            self._acks.close(linger=0)
            self._acks = None
        self.sock.close(linger=0)
        return undelivered

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _watch_publisher(ref, closing: threading.Event, interval: float = 0.2):
    """A publisher that goes quiet still has its last events acknowledged, and sent again if the broker died and
    came back meanwhile.  Holds the publisher only weakly: a publisher nobody closes still goes away."""
    while not closing.wait(interval):
        publisher = ref()
        if publisher is None:
            return
        if publisher.number > publisher.acked and time.monotonic() >= publisher._next_ask:
            with publisher._lock:
                if not closing.is_set():
                    publisher._pump()
        del publisher


class Control:
    """Request/reply with the broker's ROUTER over a DEALER; stale replies of timed-out requests are discarded."""

    _ids = itertools.count(1)

    def __init__(self, bus, context: zmq.Context | None = None):
        self.bus = _bus(bus)
        self.context = context or zmq.Context.instance()
        self.sock = None

    def _socket(self):
        if self.sock is None:
            self.sock = self.context.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            _curve_client(self.sock, self.bus)
            self.sock.connect(self.bus.replay)
        return self.sock

    def request(self, command: bytes, args: dict | None = None, timeout: float = 5.0, frames: tuple = ()):
        """Send a request and return (meta, frames) of its reply; raises BusError on timeout or refusal."""
        sock = self._socket()
        request_id = next(self._ids)
        sock.send_multipart(wire.request(command, dict(args or {}, id=request_id), frames))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000):
                # The DEALER would deliver this request's reply to the next one: start afresh instead.
                self.close()
                raise BusError(f"no answer from the broker at {self.bus.replay} within {timeout:g} s "
                               "(is it running?)")
            ok, meta, rest = wire.parse_reply(sock.recv_multipart())
            if meta.get("id") != request_id:
                continue
            if not ok:
                raise BusError(f"broker refused {command.decode()}: {meta.get('error')}")
            return meta, rest

    def ping(self, timeout: float = 2.0) -> dict:
        return self.request(wire.CMD_PING, timeout=timeout)[0]

    def status(self, timeout: float = 2.0) -> dict:
        return self.request(wire.CMD_STATUS, timeout=timeout)[0]

    def close(self):
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


class SubscriberStats:
    __slots__ = ("received", "delivered", "gaps", "repaired", "lost", "duplicates", "epoch_changes", "bad_frames",
                 "unrepaired", "stale")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class Subscriber:
    """Events of whole groups, filtered locally, in order, with loss repaired.

    ``groups``: group names (``gcode``, ``print``, ...) or None for every group.  ``events``: event names to
    deliver (None: all of those groups).  ``since``/``epoch``: resume after a restart: {group: last seq seen}
    and the epoch they belong to; everything after is replayed from the broker's ring.
    """

    def __init__(self, bus, groups=None, events=None, context: zmq.Context | None = None,
                 since: dict | None = None, epoch: int | None = None, rcvhwm: int | None = None,
                 control_timeout: float = 2.0, compiled: bool | None = None):
        """``compiled``: decode and track events in the compiled twins (default: when they are built and not
        ZEVENTS_PUREPYTHON=1)."""
        self.bus = _bus(bus)
        self.context = context or zmq.Context.instance()
        self.groups = None if groups is None else set(groups)
        unknown = (self.groups or set()) - set(_events.GROUPS)
        if unknown:
            raise ValueError(f"unknown group(s): {', '.join(sorted(unknown))}; groups are {', '.join(_events.GROUPS)}")
        self.names = None if events is None else {_events.canonical(n) for n in events}
        self.stats = SubscriberStats()
        self.control = Control(self.bus, self.context)
        self.control_timeout = control_timeout
        self.compiled = wire.use_compiled(compiled, "subscriber")
        if self.compiled:
            self.decoder = wire.speedups.Decoder()
            self._accept = functools.partial(wire.speedups.accept, self)
        else:
            self.decoder = wire.PyDecoder()
        self.pending: collections.deque = collections.deque()
        self.last_heartbeat = None
        self.sock = self.context.socket(zmq.SUB)
        self.sock.rcvhwm = rcvhwm if rcvhwm is not None else self.bus.hwm
        self.sock.setsockopt(zmq.LINGER, 0)
        _curve_client(self.sock, self.bus)
        self.sock.connect(self.bus.publish)
        self._recv = self.sock.recv
        if self.groups is None:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            for group in sorted(self.groups):
                self.sock.setsockopt(zmq.SUBSCRIBE, group.encode() + b"/")
            if "sys" not in self.groups:
                self.sock.setsockopt(zmq.SUBSCRIBE, wire.HEARTBEAT_TOPIC)
        self.epoch = epoch
        self.last_seq: dict[str, int] = dict(since or {})
        if since is None:
            self._start_point()

    def _tracked(self, group: str) -> bool:
        return self.groups is None or group in self.groups

    def _start_point(self):
        """Events after this moment are ours: learn the broker's current seqs (if it is up)."""
        try:
            status = self.control.status(self.control_timeout)
        except BusError:
            return
        self.epoch = status["epoch"]
        self.last_seq = {g: s for g, s in status["streams"].items() if self._tracked(g)}

    # --- receiving --------------------------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> wire.Envelope | None:
        """The next event, or None when ``timeout`` seconds pass without one (None waits forever)."""
        if self.pending:
            return self.pending.popleft()
        recv = self._recv
        deadline = None
        while True:
            try:
                topic = recv(NOBLOCK)
            except zmq.Again:
                if timeout is None:
                    self.sock.poll()
                    continue
                if deadline is None:
                    deadline = time.monotonic() + timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.sock.poll(remaining * 1000):
                    return None
                continue
            envelope = self._accept(topic, recv(), recv())
            if envelope is not None:
                return envelope
            if self.pending:
                return self.pending.popleft()

    def __iter__(self):
        while True:
            yield self.recv()

    def _accept(self, topic: bytes, header: bytes, payload: bytes):
        """Track one received event; returns it when it is next in order and wanted, else queues or drops it.
        ``_speedups.accept`` is its compiled twin (the in-order case in C, everything else through ``_track``)."""
        try:
            envelope = self.decoder.decode(topic, header, payload)
        except wire.WireError as exc:
            return self._undecodable(topic, exc)
        return self._track(topic, envelope)

    def _bad_sys(self, problem: str):
        if self.stats.bad_frames <= 10 or self.stats.bad_frames % 1000 == 0:
            log.warning("subscriber: ignored a malformed sys event (%d bad so far): %s", self.stats.bad_frames,
                        problem)

    def _undecodable(self, topic: bytes, exc: Exception):
        self.stats.bad_frames += 1
        log.warning("subscriber: undecodable event on %r: %s", topic[:60], exc)

    def _track(self, topic: bytes, envelope: wire.Envelope):
        self.stats.received += 1
        if envelope.epoch != self.epoch:
            if self.epoch is not None and envelope.epoch < self.epoch:
                self.stats.stale += 1  # still queued from a broker run we already left: epochs only grow
                return None
            self._new_epoch(envelope.epoch)
        group = envelope.group
        if group == wire.SYS_GROUP:
            problem = wire.sys_problem(envelope.name, envelope.payload)
            if problem is not None:
                # Forged or broken: keep the stream's count, never act on it nor deliver it.
                self.stats.bad_frames += 1
                self._bad_sys(problem)
                if envelope.seq > self.last_seq.get(group, 0):
                    self.last_seq[group] = envelope.seq
                return None
        if topic == wire.HEARTBEAT_TOPIC:
            self.last_heartbeat = time.monotonic()
            self._check_tail(envelope.payload["streams"])
            if not self._tracked("sys"):
                return None
        # A group missing from last_seq had no event when we started (or since the epoch began): from seq 0.
        last = self.last_seq.get(group, 0)
        seq = envelope.seq
        if seq <= last:
            self.stats.duplicates += 1
            return None
        if seq != last + 1:
            self.stats.gaps += 1
            self._repair(group, last, seq)
        self.last_seq[group] = seq
        if self.names is not None and envelope.name not in self.names:
            return None
        self.stats.delivered += 1
        if self.pending:
            self.pending.append(envelope)
            return None
        return envelope

    def _deliver(self, envelope):
        if self.names is None or envelope.name in self.names:
            self.stats.delivered += 1
            self.pending.append(envelope)

    def _new_epoch(self, epoch: int):
        if self.epoch is not None:
            self.stats.epoch_changes += 1
            log.warning("subscriber: broker restarted (epoch %s → %s); resynchronising", self.epoch, epoch)
        # Everything of the new epoch is after our start point: replay it from seq 0 as gaps are found.
        self.epoch = epoch
        self.last_seq = {}

    def _check_tail(self, streams: dict):
        for group, last in streams.items():
            if group == "sys" or not self._tracked(group):
                continue
            mine = self.last_seq.get(group, 0)
            if last > mine:
                self.stats.gaps += 1
                self._repair(group, mine, None)

    def _repair(self, group: str, last: int, upto: int | None):
        """Fetch (last, upto) of a group from the replay ring into the pending queue, in order."""
        since = last
        while True:
            try:
                meta, frames = self.control.request(
                    wire.CMD_REPLAY, {"group": group, "since": since, "limit": REPLAY_CHUNK, "epoch": self.epoch},
                    self.control_timeout)
            except BusError as exc:
                self.stats.unrepaired += 1
                log.warning("subscriber: cannot repair a gap in %s after seq %d: %s", group, since, exc)
                return
            if meta.get("epoch") != self.epoch:
                return  # the broker restarted meanwhile; the new epoch's first event triggers a full resync
            if meta.get("lost"):
                self.stats.lost += meta["lost"]
                log.warning("subscriber: %d events of %s fell out of the broker's replay ring", meta["lost"], group)
            for i in range(0, len(frames), 3):
                try:
                    envelope = self.decoder.decode(frames[i], frames[i + 1], frames[i + 2], replayed=True)
                except wire.WireError:
                    self.stats.bad_frames += 1
                    continue
                if upto is not None and envelope.seq >= upto:
                    self.last_seq[group] = since
                    return
                if envelope.seq > since:
                    since = envelope.seq
                    self.stats.repaired += 1
                    self._deliver(envelope)
            self.last_seq[group] = since
            if not meta.get("more"):
                return

    def snapshot(self, groups=None, timeout: float = 2.0) -> list:
        """The last event of every topic (of the given groups, default: ours), from the broker's cache."""
        groups = list(groups) if groups is not None else (sorted(self.groups) if self.groups else None)
        meta, frames = self.control.request(wire.CMD_SNAPSHOT, {"groups": groups}, timeout)
        return [self.decoder.decode(frames[i], frames[i + 1], frames[i + 2], replayed=True)
                for i in range(0, len(frames), 3)]

    def broker_alive(self, factor: float = 3.0) -> bool:
        """False when no heartbeat came for ``factor`` heartbeat intervals."""
        return self.last_heartbeat is not None and time.monotonic() - self.last_heartbeat < factor * self.bus.heartbeat

    def close(self):
        self.sock.close(linger=0)
        self.control.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_node_token() -> str:
    """The node's token (created once, inherited by the broker and every service it starts): what lets them, and
    only them, publish sys/ events."""
    global _NODE_TOKEN
    if not _NODE_TOKEN:
        _NODE_TOKEN = os.urandom(16).hex()
    os.environ[wire.NODE_TOKEN_ENV] = _NODE_TOKEN
    return _NODE_TOKEN


def node_token() -> str | None:
    return _NODE_TOKEN


def announce_started(bus_config, service: str):
    """Tell the node supervisor (and anyone listening) that a service is up: sys/ServiceStarted.  Never blocks a
    service that runs without a broker for more than a moment."""
    import os

    publisher = Publisher(bus_config, src=service)
    try:
        publisher.publish("ServiceStarted", {"service": service, "pid": os.getpid()})
    finally:
        publisher.close(linger=2)


# --- commands ---------------------------------------------------------------------------------------------------

def near_miss(name: str, candidates) -> str | None:
    """The candidate ``name`` is a slip of: the same but for case, or one edit away (a letter added, dropped,
    changed or two swapped).  A wider net would refuse honest custom names."""
    lowered = name.lower()
    for candidate in candidates:
        if candidate != name and _one_edit(lowered, candidate.lower()):
            return candidate
    return None


def _one_edit(a: str, b: str) -> bool:
    """a == b, or one insertion, deletion, substitution or transposition apart."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] or (a[i:i + 2] == b[i:i + 2][::-1] and a[i + 2:] == b[i + 2:])
    return a[i + 1:] == b[i:] if len(a) > len(b) else a[i:] == b[i + 1:]


def _event_names() -> list:
    return [n for n in _events.EVENTS if n not in _events.SCRIPT_TEMPLATES] + list(_events.ALIASES)


def fire_name(event: str, custom: bool) -> tuple[str | None, str | None]:
    """(the name to publish, None) or (None, why not): a slip of a catalogue name would otherwise go out silently
    as a custom event (`fire printdone` → custom/printdone) that no subscriber of PrintDone ever sees."""
    if not event or "/" in event or len(event) > 128 or any(c.isspace() for c in event):
        return None, f"{event!r} is not an event name"
    if _events.is_known(event):
        if custom:
            return None, (f"{event!r} is a catalogue event ({_events.topic_of(event)}); --custom is for names of "
                          "your own")
        return _events.canonical(event), None
    near = None if custom else near_miss(event, _event_names())
    if near is not None:
        return None, (f"unknown event {event!r} (did you mean {near!r}?); --custom publishes it as "
                      f"custom/{event} anyway")
    return event, None


def run_fire(config, event: str, payload_json: str | None, src: str, timeout: float, custom: bool = False) -> int:
    """`zevents fire`: publish one event and wait for the broker's ack."""
    payload = {}
    if payload_json:
        try:
            payload = json.loads(payload_json)
        except json.JSONDecodeError as exc:
            print(f"zevents: --payload is not valid JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(payload, dict):
            print("zevents: --payload must be a JSON object", file=sys.stderr)
            return 2
    name, why = fire_name(event, custom)
    if name is None:
        print(f"zevents: {why}", file=sys.stderr)
        return 2
    publisher = Publisher(config, src=src, printer=config.get("printer", "name"))
    try:
        ack = publisher.publish_confirmed(name, _events.complete_payload(name, payload), timeout=timeout)
    except BusError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 1
    finally:
        publisher.close(linger=0)
    print(f"{ack['topic']} seq {ack['seq']}", file=sys.stderr)
    return 0


def format_line(envelope: wire.Envelope) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(envelope.ts / 1e6)) + f".{envelope.ts % 1_000_000 // 1000:03d}"
    payload = json.dumps(wire.jsonable(envelope.payload), ensure_ascii=False)
    return f"{stamp} {envelope.topic} #{envelope.seq} [{envelope.src}] {payload}"


HEARTBEAT_TOPIC_STR = wire.HEARTBEAT_TOPIC.decode()


class TailSelection:
    """What `zevents tail` shows: whole groups, topic prefixes (``group/Event``) and event names, which become
    their topics.  ``sys/Heartbeat`` (once a second) only when asked for by name or with ``heartbeats``."""

    def __init__(self, prefixes: list, heartbeats: bool = False):
        self.groups: set = set()           # groups to subscribe to
        self.whole: set = set()            # groups shown entirely
        self.topics: list = []             # topic prefixes shown
        for prefix in prefixes:
            if "/" in prefix:
                group = prefix.split("/", 1)[0]
                if group not in _events.GROUPS:
                    raise ValueError(f"unknown group {group!r} in {prefix!r}; groups: {', '.join(_events.GROUPS)}")
                self.topics.append(prefix)
            elif prefix in _events.GROUPS:
                group = prefix
                self.whole.add(group)
            elif _events.is_known(prefix):
                topic = _events.topic_of(prefix)
                group = topic.split("/", 1)[0]
                self.topics.append(topic)
            else:
                near = near_miss(prefix, list(_events.GROUPS) + _event_names())
                hint = f" (did you mean {near!r}?)" if near else ""
                raise ValueError(f"unknown group or event {prefix!r}{hint}; groups: {', '.join(_events.GROUPS)}; "
                                 "events: `zevents events`")
            self.groups.add(group)
        self.heartbeats = heartbeats or HEARTBEAT_TOPIC_STR in self.topics

    def shows(self, envelope: wire.Envelope) -> bool:
        if envelope.topic == HEARTBEAT_TOPIC_STR and not self.heartbeats:
            return False
        if not self.groups:
            return True
        return envelope.group in self.whole or any(envelope.topic.startswith(t) for t in self.topics)



def parse_since(values: list, groups) -> dict:
    """``--since`` values, ``SEQ`` (every tailed group) or ``GROUP:SEQ``, as {group: last seq already seen}: the
    replay starts AT the given seq."""
    resume = {}
    for value in values:
        group, _, seq = value.rpartition(":")
        try:
            first = int(seq)
        except ValueError:
            raise ValueError(f"--since {value!r}: give SEQ or GROUP:SEQ, e.g. 120 or print:120") from None
        if first < 0:
            raise ValueError(f"--since {value!r}: a seq is 0 or more")
        targets = [group] if group else list(groups or _events.GROUPS)
        for target in targets:
            if target not in _events.GROUPS:
                raise ValueError(f"--since {value!r}: unknown group {target!r}; groups: {', '.join(_events.GROUPS)}")
            if groups and target not in groups:
                raise ValueError(f"--since {value!r}: {target!r} is not among the tailed groups "
                                 f"({', '.join(sorted(groups))})")
            resume[target] = max(first - 1, 0)
    return resume


def run_tail(config, prefixes: list, as_json: bool, count: int | None, timeout: float | None,
             since: list | None = None, heartbeats: bool = False) -> int:
    """`zevents tail`: print events as they come; exit 0 after ``count`` events, 1 on timeout."""
    try:
        selection = TailSelection(prefixes, heartbeats)
        resume = parse_since(since or [], selection.groups)
    except ValueError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 2
    control = Control(config)
    try:
        control.ping(timeout=min(timeout or 3.0, 3.0))
    except BusError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 1
    finally:
        control.close()
    # Live events from now on; the groups given a --since are replayed from the ring first (the subscriber's
    # in-order tracking drops the live copies of what the replay already delivered).
    subscriber = Subscriber(config, groups=selection.groups or None)
    subscriber.last_seq.update(resume)
    for group, last in resume.items():
        subscriber._repair(group, last, None)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    out = sys.stdout
    try:
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            envelope = subscriber.recv(remaining)
            if envelope is None:
                break
            if not selection.shows(envelope):
                continue
            out.write(json.dumps(envelope.to_dict(), ensure_ascii=False) if as_json
                      else format_line(envelope))
            out.write("\n")
            out.flush()
            seen += 1
    except BrokenPipeError:
        return 0
    finally:
        subscriber.close()
    if count is not None and seen < count:
        print(f"zevents: timed out after {timeout:g} s with {seen} of {count} events", file=sys.stderr)
        return 1
    if count is None and timeout is not None:
        return 1 if seen == 0 else 0
    return 0
