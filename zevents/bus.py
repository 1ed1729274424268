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
import sys
import time
import types

import zmq

from zevents import events as _events
from zevents import wire
from zevents.config import BusConfig

log = logging.getLogger("zevents.bus")

SNDMORE = zmq.SNDMORE
NOBLOCK = zmq.NOBLOCK
REPLAY_CHUNK = 10000


def fast_send(sock: zmq.Socket):
    """The socket's send without pyzmq's Python-level wrapper (≈1 µs a call less; the hot paths send a lot)."""
    return types.MethodType(zmq.backend.Socket.send, sock)


class BusError(RuntimeError):
    """The broker did not answer, or refused a request."""


def _bus(bus) -> BusConfig:
    return bus.bus if hasattr(bus, "bus") and not isinstance(bus, BusConfig) else bus


class Publisher:
    """Sends events to the broker's ingest.  Cheap to call on a hot path: topics and meta frames are cached.

    A publisher never blocks its caller for long: if the broker is gone and the queue (``hwm`` messages) is
    full, ``publish`` waits ``send_timeout`` seconds, then counts the event in ``dropped`` and logs it.
    """

    def __init__(self, bus, src: str = "user", printer: str | None = None, context: zmq.Context | None = None,
                 send_timeout: float = 1.0):
        self.bus = _bus(bus)
        self.context = context or zmq.Context.instance()
        self.src = src
        self.printer = printer
        self.dropped = 0
        self.sock = self.context.socket(zmq.PUSH)
        self.sock.sndhwm = self.bus.hwm
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
        # On close, queued events still go out for this long; past it they are discarded (ZeroMQ cannot say how
        # many), so it is generous.
        self.sock.setsockopt(zmq.LINGER, 10_000)
        self.sock.connect(self.bus.ingest)
        self._send = fast_send(self.sock)
        self._heads: dict = {}
        self._control: Control | None = None

    def head(self, name_or_topic: str, src: str | None = None) -> bytes:
        """The cached ingest head (topic and meta) of an event name, or of a ``group/Name`` topic."""
        key = (name_or_topic, src)
        head = self._heads.get(key)
        if head is None:
            topic = name_or_topic.encode() if "/" in name_or_topic else wire.topic_bytes(name_or_topic)
            head = self._heads[key] = wire.ingest_head(topic, wire.ingest_meta(src or self.src, self.printer))
        return head

    def publish(self, name: str, payload: dict | None = None, src: str | None = None):
        """Publish a catalogue or custom event by name (``Dwelling`` is sent as ``Dwell``), or by topic."""
        self.send_frame(self.head(name, src) + wire.pack(payload if payload is not None else {}))

    def send_frame(self, frame: bytes):
        try:
            self._send(frame)
        except zmq.Again:
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.warning("publisher: broker unreachable, dropped an event (%d dropped so far)", self.dropped)

    def publish_confirmed(self, name: str, payload: dict | None = None, src: str | None = None,
                          timeout: float = 5.0) -> dict:
        """Publish through the control socket and wait for the broker's ack ({epoch, seq, topic})."""
        if self._control is None:
            self._control = Control(self.bus, self.context)
        return self._control.request(wire.CMD_PUBLISH, {}, timeout,
                                     (self.head(name, src) + wire.pack(payload or {}),))[0]

    def close(self, linger: float | None = None):
        if self._control is not None:
            self._control.close()
        if linger is not None:
            self.sock.setsockopt(zmq.LINGER, int(linger * 1000))
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
        if topic == wire.HEARTBEAT_TOPIC:
            self.last_heartbeat = time.monotonic()
            self._check_tail(envelope.payload.get("streams") or {})
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
    payload = json.dumps(envelope.payload, default=repr, ensure_ascii=False)
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
            out.write(json.dumps(envelope.to_dict(), default=repr, ensure_ascii=False) if as_json
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
