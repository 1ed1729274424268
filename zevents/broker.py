"""The broker: one per node, the single sequencer of the bus.

Publishers PUSH ingest messages (topic, meta, payload) to its PULL socket.  The broker validates them, stamps the
header (node, epoch, per-group seq, ts), keeps a replay ring and a last-value cache, and publishes on an XPUB.
A ROUTER answers control requests (REPLAY, SNAPSHOT, PUBLISH with an ack, STATUS, PING).  A ``sys/Heartbeat``
every ``heartbeat`` seconds carries the latest seq of every stream so subscribers see tail loss and a dead broker.

Garbage on the ingest never stops the broker: each bad frame is counted by reason and logged (rate-limited).

No silent loss across a broker crash: the ring is backed by an on-disk journal (``zevents.journal``), written
before a batch is published or acknowledged, so a broker started again after ``kill -9`` continues the same epoch
and sequence and still replays what it had.  Publishers number their events (``wire.numbered_frame``); the broker
sequences each publisher's numbers strictly in order, once each, and answers ACK with the last one it journaled,
so a publisher sends again exactly what a dead broker never sequenced.
"""
from __future__ import annotations

import collections
import fcntl
import functools
import gc
import logging
import os
import signal
import threading
import time
from pathlib import Path

import zmq

from zevents import curve as curve_mod
from zevents import journal as journal_mod
from zevents import wire
from zevents import bus as bus_mod
from zevents.bus import fast_send
from zevents.config import BusConfig
from zevents.service import freeze_startup_heap

log = logging.getLogger("zevents.broker")

INGEST_BATCH = 2000          # messages drained per poll wake-up, so control requests are never starved
COMMIT_BATCH = 256           # events journaled (one write) then published together: few system calls, and the
                             # subscribers get the first events while later ones are still being read
REPLAY_LIMIT_MAX = 20000
MAX_PUBLISHERS = 65536       # numbering publishers remembered (the oldest is forgotten first)


class BrokerError(RuntimeError):
    """The broker cannot start (endpoint in use, another node on the same endpoints, ...)."""


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


class _NodeLock:
    """An flock next to the publish socket: a second broker on the same ipc endpoints is refused, and a lock left
    by a killed broker is released by the kernel, so a restart after kill -9 just works."""

    def __init__(self, endpoint: str):
        path = _ipc_path(endpoint)
        self.path = path.with_name(path.name + ".lock") if path else None
        self._fd = None

    def acquire(self):
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() if self.path.exists() else "?"
            raise BrokerError(f"another zevents node (pid {holder or '?'}) already serves {self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self):
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class _RateLimitedLog:
    """Logs the first few problems of each kind, then one in every 1000, so a flood of garbage can't flood logs."""

    def __init__(self):
        self.counts = collections.Counter()

    def warn(self, reason: str, detail: str):
        n = self.counts[reason] = self.counts[reason] + 1
        if n <= 10 or n % 1000 == 0:
            log.warning("ingest: dropped a bad message (%s, #%d): %s", reason, n, detail)


class Broker:
    def __init__(self, bus: BusConfig, context: zmq.Context | None = None, compiled: bool | None = None):
        """``compiled``: use the compiled ingest loop (default: when it is built and not ZEVENTS_PUREPYTHON=1)."""
        self.bus = bus
        self.compiled = wire.use_compiled(compiled, "ingest loop")
        if self.compiled:
            self._drain_ingest = functools.partial(wire.speedups.drain_ingest, self, INGEST_BATCH, COMMIT_BATCH)
        # A ZAP handler serves a whole context: with CURVE the broker has one of its own (two brokers in one
        # process, as in tests, must not share it).
        self._own_context = context is None and bool(bus.curve)
        self.context = context or (zmq.Context() if self._own_context else zmq.Context.instance())
        self.epoch = wire.now_us()
        self.run = self.epoch    # this run of the broker: the epoch survives a restart (journal), the run does not
        self.started = time.monotonic()
        self.stamper = wire.HeaderStamper(bus.node, self.epoch)
        self.seqs: dict[str, int] = {}
        self.ring: collections.deque = collections.deque(maxlen=bus.replay_ring)
        self.last_values: dict[bytes, tuple] = {}
        self.counters = collections.Counter()
        self.bad = _RateLimitedLog()
        self.subscriptions: collections.Counter = collections.Counter()
        self.publishers: dict[bytes, int] = {}     # numbering publisher -> its last number sequenced
        self.gapped: set = set()                    # publishers whose frames arrived out of order since their ACK
        self.journal: journal_mod.Journal | None = None
        # sys/ events are the broker's and the node's: on ingest, only with the node's token (its children have it).
        self.node_token = bus_mod.node_token()
        self._topic_groups: dict[bytes, str] = {}
        self._heads: dict[bytes, tuple] = {}
        self._lock = _NodeLock(bus.publish)
        self._stop = threading.Event()
        self._wake_endpoint = f"inproc://zevents-broker-wake-{id(self)}"
        self._sockets: list = []
        self._auth = None
        self._ipc_files: list = []
        self._bound = False

    # --- lifecycle --------------------------------------------------------------------------------------------

    def bind(self):
        self._lock.acquire()
        try:
            self._check_not_served()
            self._open_journal()
            ctx = self.context
            self._secure()
            # The ingest never pushes back: a publisher closing while its messages wait behind a full receive
            # queue loses them (libzmq's linger drains the pipe, not the connection).  Publishers bound their
            # own queues with their send high-water mark.
            self.pull = self._socket(zmq.PULL, rcvhwm=0)
            self.pull.setsockopt(zmq.LINGER, 5000)
            self.xpub = self._socket(zmq.XPUB, sndhwm=self.bus.hwm)
            self.xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
            self._xsend = fast_send(self.xpub)
            self.router = self._socket(zmq.ROUTER)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.wake = self._socket(zmq.PAIR)
            if self.bus.curve:
                for sock in (self.pull, self.xpub, self.router):
                    curve_mod.server(sock, self.bus.curve)
            for sock, endpoint in ((self.pull, self.bus.ingest), (self.xpub, self.bus.publish),
                                   (self.router, self.bus.replay), (self.wake, self._wake_endpoint)):
                path = _ipc_path(endpoint)
                if path is not None:
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                try:
                    sock.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise BrokerError(f"cannot bind {endpoint}: {exc}") from None
                if path is not None:
                    self._ipc_files.append(path)
            del ctx
        except BaseException:
            self.close()
            raise
        self._bound = True
        log.info("broker %s epoch %d: ingest %s, publish %s, control %s (%s ingest loop)", self.bus.node, self.epoch,
                 self.bus.ingest, self.bus.publish, self.bus.replay, "compiled" if self.compiled else "Python")

    def _secure(self):
        """CURVE + ZAP when bus.curve is set; otherwise a warning for every endpoint the network can reach."""
        endpoints = (self.bus.ingest, self.bus.publish, self.bus.replay)
        if self.bus.curve:
            try:
                curve_mod._key(self.bus.curve, "server_secret")
            except curve_mod.CurveError as exc:
                raise BrokerError(str(exc)) from None
            self._auth = curve_mod.start_authenticator(self.context, self.bus.curve)
            return
        for endpoint in curve_mod.exposed_endpoints(endpoints):
            log.warning("bus endpoint %s is reachable beyond this machine without bus.curve: anyone on the network "
                        "may publish, subscribe and fire events that run hooks (see README, Bus security)", endpoint)

    def _open_journal(self):
        """Recover the ring, the epoch and the sequence from the journal, or start one."""
        if not self.bus.journal:
            return
        self.journal = journal_mod.Journal(self.bus.journal, self.bus.replay_ring, self.bus.journal_flush)
        try:
            found = self.journal.recover()
        except journal_mod.JournalError as exc:
            self.journal = None
            raise BrokerError(str(exc)) from None
        if found.epoch is None:
            self.journal.start(self.epoch, {}, {})
            return
        self.publishers = found.publishers
        if not found.clean and found.boot_id and found.boot_id != journal_mod.boot_id():
            # The machine restarted without a clean stop: the unflushed tail of the journal may be gone, and with
            # it seqs that subscribers saw.  Reusing them would hide events: a new epoch makes everyone resync.
            log.warning("journal %s: the machine restarted since the broker last wrote it (power cut?): the last "
                        "events may be lost; starting a new epoch", self.bus.journal)
            self.journal.discard()
            self.journal.start(self.epoch, {}, self.publishers)
            return
        self.epoch = found.epoch
        self.stamper = wire.HeaderStamper(self.bus.node, self.epoch)
        self.seqs = found.seqs
        self.ring.extend(found.entries)
        for entry in self.ring:
            self.last_values[entry[2]] = entry
        self.journal.mark(self.epoch, self.seqs, self.publishers)
        log.info("journal %s: continuing epoch %d with %d events in the ring (%s)", self.bus.journal, self.epoch,
                 len(self.ring), "clean stop" if found.clean else "after a crash")

    def _check_not_served(self):
        """For TCP the bind fails by itself; ipc sockets would be silently taken over, so ask whoever is there."""
        if _ipc_path(self.bus.replay) is None or not _ipc_path(self.bus.replay).exists():
            return
        probe = self.context.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        bus_mod._curve_client(probe, self.bus)
        try:
            probe.connect(self.bus.replay)
            probe.send_multipart(wire.request(wire.CMD_PING))
            if probe.poll(300):
                raise BrokerError(f"a broker already answers on {self.bus.replay}")
        finally:
            probe.close()

    def _socket(self, kind, **options):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            setattr(sock, name, value)
        self._sockets.append(sock)
        return sock

    def close(self):
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        # No stale sockets for the next node: a file left behind would look like a node to other tools.
        for path in self._ipc_files:
            try:
                path.unlink()
            except OSError:
                pass
        self._ipc_files.clear()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and not self.context.closed:
            self.context.term()
        self._lock.release()
        self._bound = False

    def stop(self):
        """Ask a running loop to stop (from any thread or a signal handler)."""
        self._stop.set()
        try:
            poke = self.context.socket(zmq.PAIR)
            poke.setsockopt(zmq.LINGER, 0)
            poke.connect(self._wake_endpoint)
            poke.send(b"", zmq.NOBLOCK)
            poke.close()
        except zmq.ZMQError:
            pass

    def serve(self):
        """The event loop; returns after stop()."""
        if not self._bound:
            self.bind()
        poller = zmq.Poller()
        for sock in (self.pull, self.router, self.xpub, self.wake):
            poller.register(sock, zmq.POLLIN)
        interval = self.bus.heartbeat
        next_beat = time.monotonic() + interval
        pull, router, xpub = self.pull, self.router, self.xpub
        if self.journal is not None:
            self.journal.start_flushing()
        while not self._stop.is_set():
            timeout = max(0.0, next_beat - time.monotonic())
            ready = dict(poller.poll(timeout * 1000))
            if pull in ready:
                self._drain_ingest()
            if router in ready:
                self._drain_control()
            if xpub in ready:
                self._drain_subscriptions()
            if self.wake in ready:
                self.wake.recv()
            if time.monotonic() >= next_beat:
                self.heartbeat()
                next_beat = time.monotonic() + interval

    # --- the hot path -----------------------------------------------------------------------------------------

    def _drain_ingest(self):
        # The hot path, inlined on purpose: each method call here costs more than the work it would name.
        # _speedups.drain_ingest is its compiled twin (used unless ZEVENTS_PUREPYTHON=1): change both together.
        # A batch is journaled before any of it is published: what subscribers saw, a restart still has.
        recv = self.pull.recv
        nb = zmq.NOBLOCK
        heads = self._heads
        seqs = self.seqs
        stamp = wire.seq_ts_tail
        validate = wire.unpack
        clock = time.time_ns
        max_payload = self.bus.max_payload
        batch = []
        add = batch.append
        for _ in range(INGEST_BATCH):
            try:
                frame = recv(nb)
            except zmq.Again:
                break
            publisher, number = wire.NO_PUBLISHER, 0
            try:
                if frame[0] == wire.NUMBERED:
                    numbered = self._numbered(frame)
                    if numbered is None:
                        continue
                    publisher, number, frame = numbered
                end = frame[0] + 2 + frame[frame[0] + 1]
            except IndexError:
                self._reject("frame", f"ingest frame of {len(frame)} bytes is too short for its lengths")
                continue
            known = heads.get(frame[:end]) or self._learn_head(frame)
            if known is None:
                continue
            payload = frame[end:]
            if len(payload) > max_payload or not payload or not (
                    0x80 <= payload[0] <= 0x8f or payload[0] == 0xde or payload[0] == 0xdf):
                self._payload_ok(payload)  # counts and logs the precise reason
                continue
            try:
                validate(payload)
            except Exception:
                self._payload_ok(payload)
                continue
            group = known[0]
            seq = seqs.get(group, 0) + 1
            seqs[group] = seq
            add(((group, seq, known[1], known[2] + stamp(seq, clock() // 1000), payload), publisher, number))
            if len(batch) >= COMMIT_BATCH:
                self._commit(batch)
                batch = []
                add = batch.append
        if batch:
            self._commit(batch)

    def _numbered(self, frame: bytes):
        """(publisher, number, v1 frame) of a numbered frame that is next from its publisher; None (counted) for a
        duplicate, a frame ahead of a missing one (the publisher sends again from its last ACK), or a torn one."""
        try:
            publisher, number, rest = wire.split_numbered(frame)
        except wire.WireError as exc:
            self._reject("frame", str(exc))
            return None
        last = self.publishers.get(publisher)
        if last is None:
            if len(self.publishers) >= MAX_PUBLISHERS:
                del self.publishers[next(iter(self.publishers))]
        elif number != last + 1:
            if number <= last:
                self.counters["ingest_duplicate"] += 1
            else:
                self.counters["ingest_out_of_order"] += 1
                self.gapped.add(publisher)
            return None
        # The number is used up even if the frame turns out bad: a bad frame must not block its successors.
        self.publishers[publisher] = number
        return publisher, number, rest

    def _commit(self, batch: list):
        """Journal a batch of ((group, seq, topic, header, payload), publisher, number), then publish and remember
        it.  ``_speedups.drain_ingest`` does the same inline: change both together."""
        if self.journal is not None:
            record = journal_mod.event_record
            self.journal.append([record(e[2], e[3], e[4], publisher, number) for e, publisher, number in batch],
                                len(batch))
        send = self._xsend
        more = zmq.SNDMORE
        remember = self.ring.append
        last_values = self.last_values
        for entry, _, _ in batch:
            send(entry[2], more)
            send(entry[3], more)
            send(entry[4])
            remember(entry)
            last_values[entry[2]] = entry
        if self.journal is not None and self.journal.full():
            self.journal.start(self.epoch, self.seqs, self.publishers)

    def ingest(self, frame: bytes) -> int | None:
        """Validate, stamp, publish, remember one ingest frame.  Returns the seq, or None when it was bad."""
        known = self._learn_head(frame)
        if known is None:
            return None
        payload = frame[len(known[3]):]
        if not self._payload_ok(payload):
            return None
        return self._publish(known[0], known[1], known[2], payload)

    def _learn_head(self, frame: bytes):
        """Validate the topic and meta of an ingest frame; cache them by the frame's head bytes."""
        try:
            topic, meta, _ = wire.split_ingest(frame)
        except wire.WireError as exc:
            self._reject("frame", str(exc))
            return None
        group = self._learn_topic(topic)
        if group is None:
            self._reject("topic", f"topic {topic[:60]!r} is not <group>/<Event> with a known group")
            return None
        try:
            prefix = self.stamper.prefix(meta)
        except wire.WireError as exc:
            self._reject("meta", str(exc))
            return None
        if group == wire.SYS_GROUP and not self._node_signed(meta):
            self._reject("sys", f"{topic[:60]!r}: sys/ events are the broker's and the node's")
            return None
        head = wire.ingest_head(topic, meta)
        if len(self._heads) >= 10000:
            self._heads.clear()
        entry = self._heads[head] = (group, topic, prefix, head)
        return entry

    def _node_signed(self, meta: bytes) -> bool:
        if self.node_token is None:
            return False
        try:
            return wire.unpack_map(meta, "ingest meta").get("token") == self.node_token
        except wire.WireError:
            return False

    def _payload_ok(self, payload: bytes) -> bool:
        if len(payload) > self.bus.max_payload:
            self._reject("payload", f"payload of {len(payload)} bytes exceeds the limit of {self.bus.max_payload}")
            return False
        if not payload or not (0x80 <= payload[0] <= 0x8f or payload[0] in (0xde, 0xdf)):
            self._reject("payload", "payload is not a msgpack map")
            return False
        try:
            wire.unpack(payload)
        except Exception as exc:
            self._reject("payload", f"payload is not valid msgpack ({type(exc).__name__})")
            return False
        return True

    def _publish(self, group: str, topic: bytes, prefix: bytes, payload: bytes) -> int:
        seq = self.seqs.get(group, 0) + 1
        self.seqs[group] = seq
        self._commit([((group, seq, topic, prefix + wire.seq_ts_tail(seq, wire.now_us()), payload),
                       wire.NO_PUBLISHER, 0)])
        return seq

    def _learn_topic(self, topic: bytes) -> str | None:
        if len(topic) > wire.MAX_TOPIC:
            return None
        try:
            group, _ = wire.split_topic(topic)
        except wire.WireError:
            return None
        if len(self._topic_groups) > 10000:
            self._topic_groups.clear()
        self._topic_groups[topic] = group
        return group

    def _reject(self, reason: str, detail: str):
        self.counters["bad"] += 1
        self.counters["bad_" + reason] += 1
        self.bad.warn(reason, detail)

    def publish_local(self, name_or_topic: str, payload: dict, src: str = "broker") -> int:
        """Publish an event generated by the broker itself (heartbeats)."""
        topic = name_or_topic.encode() if "/" in name_or_topic else wire.topic_bytes(name_or_topic)
        group = self._learn_topic(topic)
        prefix = self.stamper.prefix(wire.ingest_meta(src, None))
        return self._publish(group, topic, prefix, wire.pack(payload))

    def heartbeat(self):
        streams = dict(self.seqs)
        streams["sys"] = streams.get("sys", 0) + 1
        self.publish_local(wire.HEARTBEAT_TOPIC.decode(), {
            "streams": streams, "epoch": self.epoch, "uptime": round(time.monotonic() - self.started, 3),
            "interval": self.bus.heartbeat})

    # --- control ----------------------------------------------------------------------------------------------

    def _drain_control(self):
        for _ in range(100):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            envelope = [identity]
            if rest and rest[0] == b"":  # a REQ socket puts an empty delimiter first
                envelope.append(b"")
                rest = rest[1:]
            try:
                reply = self.control(rest)
            except Exception as exc:  # a bad request must not kill the broker
                log.warning("control: bad request: %s: %s", type(exc).__name__, exc)
                self.counters["bad_control"] += 1
                reply = wire.reply(False, {"id": None, "error": f"{type(exc).__name__}: {exc}".rstrip(": ")})
            try:
                self.router.send_multipart(envelope + reply, zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["control_unroutable"] += 1

    def control(self, frames: list) -> list:
        if len(frames) < 2:
            raise wire.WireError("control request needs a command and an argument map")
        command, args = frames[0], wire.unpack(frames[1])
        if not isinstance(args, dict):
            raise wire.WireError("control arguments are not a map")
        request_id = args.get("id")
        if command == wire.CMD_ACK:
            return self._ack(args, request_id)
        if command == wire.CMD_PING:
            return wire.reply(True, {"id": request_id, "node": self.bus.node, "epoch": self.epoch, "run": self.run})
        if command == wire.CMD_STATUS:
            return wire.reply(True, dict(self.status(), id=request_id))
        if command == wire.CMD_REPLAY:
            return self._replay(args, request_id)
        if command == wire.CMD_SNAPSHOT:
            return self._snapshot(args, request_id)
        if command == wire.CMD_PUBLISH:
            if len(frames) != 3:
                raise wire.WireError("PUBLISH carries one ingest frame")
            seq = self.ingest(frames[2])
            if seq is None:
                return wire.reply(False, {"id": request_id, "error": "rejected: see the broker log"})
            topic, _, _ = wire.split_ingest(frames[2])
            return wire.reply(True, {"id": request_id, "epoch": self.epoch, "seq": seq, "topic": topic.decode()})
        raise wire.WireError(f"unknown command {command[:20]!r}")

    def _ack(self, args: dict, request_id):
        """How far a numbering publisher's events are sequenced (and journaled), and whether some arrived out of
        order since it last asked; ``run`` tells it the broker restarted (send again what is not acknowledged)."""
        publisher = args.get("publisher")
        if not isinstance(publisher, bytes) or len(publisher) != 8:
            raise wire.WireError("ACK needs the publisher's 8-byte id")
        gap = publisher in self.gapped
        self.gapped.discard(publisher)
        return wire.reply(True, {"id": request_id, "epoch": self.epoch, "run": self.run,
                                 "last": self.publishers.get(publisher, 0), "gap": gap})

    def _replay(self, args: dict, request_id):
        group = args.get("group")
        since = int(args.get("since") or 0)
        limit = max(1, min(int(args.get("limit") or REPLAY_LIMIT_MAX), REPLAY_LIMIT_MAX))
        found = []
        oldest_seen = None
        for entry in reversed(self.ring):
            if entry[0] != group:
                continue
            if entry[1] <= since:
                oldest_seen = entry[1]
                break
            found.append(entry)
            oldest_seen = entry[1]
        found.reverse()
        # Events between `since` and the oldest one still in the ring are gone for good: say so, never hide it.
        first = found[0][1] if found else None
        lost = max(0, first - since - 1) if first is not None and oldest_seen == first else 0
        more = len(found) > limit
        found = found[:limit]
        frames = []
        for _, _, topic, header, payload in found:
            frames += (topic, header, payload)
        self.counters["replayed"] += len(found)
        return wire.reply(True, {"id": request_id, "epoch": self.epoch, "group": group,
                                 "last": self.seqs.get(group, 0), "count": len(found), "more": more,
                                 "lost": lost}, frames)

    def _snapshot(self, args: dict, request_id):
        groups = args.get("groups")
        frames = []
        for topic, (group, _, _, header, payload) in self.last_values.items():
            if groups is None or group in groups:
                frames += (topic, header, payload)
        return wire.reply(True, {"id": request_id, "epoch": self.epoch, "streams": dict(self.seqs),
                                 "count": len(frames) // 3}, frames)

    def status(self) -> dict:
        return {
            "node": self.bus.node, "epoch": self.epoch, "run": self.run, "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "streams": dict(self.seqs), "counters": dict(self.counters),
            "ring": {"size": len(self.ring), "capacity": self.ring.maxlen},
            "heartbeat": self.bus.heartbeat, "max_payload": self.bus.max_payload,
            "subscriptions": sum(self.subscriptions.values()), "topics": len(self.last_values),
            "endpoints": {"publish": self.bus.publish, "ingest": self.bus.ingest, "control": self.bus.replay},
            "journal": None if self.journal is None else {
                "directory": str(self.journal.directory), "flush": self.journal.flush, "segment": self.journal.segment,
                "events": self.journal.count, "written": self.journal.written},
            "publishers": len(self.publishers),
            "gc": {"frozen": gc.get_freeze_count(), "collections": [g["collections"] for g in gc.get_stats()]},
        }

    def _drain_subscriptions(self):
        for _ in range(1000):
            try:
                message = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self.subscriptions[message[1:]] += 1
            elif message[:1] == b"\x00":
                self.subscriptions[message[1:]] -= 1
                if self.subscriptions[message[1:]] <= 0:
                    del self.subscriptions[message[1:]]


def serve_in_thread(bus: BusConfig, context: zmq.Context | None = None,
                    compiled: bool | None = None) -> tuple[Broker, threading.Thread]:
    """A bound broker serving on a daemon thread (for embedding and tests); stop with broker.stop()."""
    broker = Broker(bus, context, compiled)
    broker.bind()
    thread = threading.Thread(target=broker.serve, name="zevents-broker", daemon=True)
    thread.start()
    return broker, thread


def run(config) -> int:
    """`zevents broker`: serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker = Broker(config.bus)
    try:
        broker.bind()
    except BrokerError as exc:
        log.error("%s", exc)
        return 1

    def on_signal(signum, frame):
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    freeze_startup_heap()
    try:
        broker.serve()
    finally:
        broker.close()
    log.info("broker stopped")
    return 0
