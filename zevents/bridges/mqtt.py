"""The MQTT bridge: the node's events on an MQTT broker, in OctoPrint-MQTT's topics and in zevents' own, with
retained per-printer state, Home Assistant discovery, and (off by default) a few commands back to the printers.

It owns:

* the topic layouts (``reference-behaviour.md`` section 5.5 for OctoPrint-MQTT's):

  - ``octoprint``: ``octoPrint/event/<Name>`` (payload + ``_event`` + ``_timestamp``, retained only for
    ``octoprint.retain_events``), ``octoPrint/progress/printing`` and ``octoPrint/temperature/<tool>`` (retained,
    on change), last will ``octoPrint/mqtt`` = ``connected``/``disconnected``.  The node's default printer keeps
    these topics; any other printer gets ``octoPrint/<printer>/...``.
  - ``zevents``: ``zevents/<node>/<printer>/<group>/<Event>`` = ``{seq, epoch, ts, src, node, printer, group,
    event, payload}``; retained state per printer: ``.../state`` (everything in one JSON) and ``.../state/<field>``
    (state, job, progress, layer, time_left, temperature/<tool>); ``zevents/<node>/status`` = ``online`` /
    ``offline`` (last will).  Events whose header names no printer are node-wide (``zevents/<node>/_node/...``),
    except the printer groups, which belong to the node's default printer (a node of one printer leaves the
    header's printer empty).
* Home Assistant discovery (:func:`discovery_messages`): a device per printer, from the zevents layout's state.
* delivery: every event is turned into messages in an outbox that feeds paho at most ``mqtt.inflight`` at a time.
  A message is done when the broker acks it (QoS 1); an event is *handed* when all its messages are; the last
  handed seq of every group is the **cursor**, saved to ``<data_dir>/mqtt/cursor-<node>.json`` (temp + rename).
  A restarted bridge resumes after the cursor from the broker's replay ring.  While the MQTT broker is away the
  outbox holds up to ``mqtt.max_pending`` messages; at the bound the bridge stops reading the bus (its ring keeps
  the rest, repaired on resume) and says so.  Telemetry (temperatures) and retained state are *conflated*: a newer
  value replaces one still waiting; events never are.
* commands (:class:`Commands`): ``zevents/<node>/<printer>/command/<name>`` when ``mqtt.commands.enabled``, only
  those in ``mqtt.commands.allowed``, through the printer link's command channel (never the bus), G-code that moves
  the printer refused unless ``printer.allow_bus_commands``; each one becomes a ``custom/MqttCommand`` event
  (src ``mqtt``) saying what was asked, from where, and whether it was done.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import zmq

from zevents import bus as zbus
from zevents.bridges.settings import parse_url

log = logging.getLogger("zevents.mqtt")

PRINTER_GROUPS = frozenset({"comm", "file", "print", "gcode", "timelapse"})
NODE_WIDE = "_node"
TELEMETRY = frozenset({"Temperature"})
# The events that change a printer's state beyond its last event (PrinterState.apply).
STATE_EVENTS = frozenset({"PrinterStateChanged", "Disconnected", "FileSelected", "FileDeselected", "PrintStarted",
                          "PrintProgress", "LayerChanged", "PrintDone", "PrintFailed", "PrintCancelled",
                          "PrintPaused", "PrintResumed", "Temperature"})
# Events with a topic of their own in the octoprint layout (progress/printing, temperature/<tool>): OctoPrint
# fires no such event, so they are not repeated under event/.
OCTOPRINT_NOT_EVENTS = frozenset({"Temperature", "PrintProgress", "Heartbeat"})
PRINTING_STATES = frozenset({"PRINTING", "PAUSED", "PAUSING", "RESUMING", "FINISHING", "CANCELLING", "STARTING"})
COMMAND_EVENT = "MqttCommand"
SAVE_INTERVAL = 0.2     # seconds between cursor saves while events flow
READ_BATCH = 256        # bus events handled before the outbox is fed again
LOOP_TICK = 0.2


def topic_level(name) -> str:
    """A name as one MQTT topic level: no separators, no wildcards."""
    return re.sub(r"[/+#\x00]", "_", str(name)) or "_"


def to_json(value) -> bytes:
    return json.dumps(value, default=_jsonable, separators=(",", ":"), ensure_ascii=False).encode()


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def tool_name(key: str) -> str:
    """The link's temperature keys (``T0``, ``T``) as OctoPrint names them (``tool0``)."""
    if key.startswith("T"):
        return f"tool{key[1:] or 0}"
    return key


# --- per-printer state ----------------------------------------------------------------------------------------

class PrinterState:
    """What a dashboard wants to see of one printer, kept from its events."""

    FIELDS = ("state", "job", "progress", "layer", "time_left")

    def __init__(self, node: str, printer: str):
        self.node = node
        self.printer = printer
        self.state_id = "OFFLINE"
        self.state_string = "Offline"
        self.file = self.path = self.origin = None
        self.printing = False
        self.paused = False
        self.progress = None
        self.layer = None
        self.layers = None
        self.elapsed = None
        self.time_left = None
        self.time_left_origin = None
        self.temperatures: dict = {}
        self.last_event = None
        self.last_event_ts = None

    def apply(self, name: str, payload: dict, ts: int) -> set:
        """Update from one event; returns the fields that changed (FIELDS, ``temperature/<tool>``, ``last_event``)."""
        if name not in STATE_EVENTS:
            self.last_event, self.last_event_ts = name, ts
            return {"last_event"}
        before = self.fields()
        temps_before = dict(self.temperatures)
        if name == "PrinterStateChanged":
            self.state_id = payload.get("state_id") or self.state_id
            self.state_string = payload.get("state_string") or self.state_id
            if self.state_id in PRINTING_STATES:
                self.printing = True
            elif self.state_id in ("OPERATIONAL", "OFFLINE", "CLOSED", "ERROR", "CLOSED_WITH_ERROR"):
                self.printing = False
            self.paused = self.state_id == "PAUSED"
        elif name == "Disconnected":
            self.state_id, self.state_string, self.printing, self.paused = "OFFLINE", "Offline", False, False
        elif name == "FileSelected":
            self.file, self.path, self.origin = payload.get("name"), payload.get("path"), payload.get("origin")
        elif name == "FileDeselected":
            self.file = self.path = self.origin = None
        elif name == "PrintStarted":
            self.file, self.path, self.origin = payload.get("name"), payload.get("path"), payload.get("origin")
            self.printing, self.paused = True, False
            self.progress, self.layer, self.layers, self.elapsed = 0, 0, None, 0.0
            self.time_left, self.time_left_origin = None, None
            self._time_left_from(payload)
        elif name == "PrintProgress":
            self.progress = payload.get("progress")
            self.elapsed = payload.get("time")
            self._time_left_from(payload)
        elif name == "LayerChanged":
            self.layer = payload.get("layer")
            if payload.get("total") is not None:
                self.layers = payload.get("total")
        elif name == "PrintDone":
            self.printing, self.paused, self.progress, self.time_left = False, False, 100, 0
            self.elapsed = payload.get("time", self.elapsed)
        elif name in ("PrintFailed", "PrintCancelled"):
            self.printing, self.paused, self.time_left = False, False, None
        elif name == "PrintPaused":
            self.paused = True
        elif name == "PrintResumed":
            self.paused = False
        elif name == "Temperature":
            self._temperatures(payload)
        changed = {field for field, value in self.fields().items() if before[field] != value}
        changed.update(f"temperature/{tool}" for tool, reading in self.temperatures.items()
                       if temps_before.get(tool) != reading)
        if name not in TELEMETRY:
            self.last_event, self.last_event_ts = name, ts
            changed.add("last_event")
        return changed

    def _time_left_from(self, payload: dict):
        # analysis14's estimate when the payload has it (OctoPrint's key), else a linear one from the elapsed time.
        if payload.get("printTimeLeft") is not None:
            self.time_left, self.time_left_origin = int(payload["printTimeLeft"]), "analysis"
        elif self.progress and self.elapsed:
            self.time_left = int(self.elapsed * (100 - self.progress) / self.progress)
            self.time_left_origin = "linear"

    def _temperatures(self, payload: dict):
        readings = dict((payload.get("tools") or {}))
        for key in ("bed", "chamber"):
            if payload.get(key) is not None:
                readings[key] = payload[key]
        for key, reading in readings.items():
            if not isinstance(reading, (list, tuple)) or not reading:
                continue
            actual = reading[0]
            target = reading[1] if len(reading) > 1 else None
            if actual is None and target is None:
                continue
            self.temperatures[tool_name(key)] = {"actual": actual, "target": target}

    def fields(self) -> dict:
        return {
            "state": {"state_id": self.state_id, "state_string": self.state_string, "printing": self.printing,
                      "paused": self.paused},
            "job": {"file": self.file, "path": self.path, "origin": self.origin},
            "progress": self.progress,
            "layer": {"layer": self.layer, "total": self.layers},
            "time_left": {"time_left": self.time_left, "origin": self.time_left_origin, "elapsed": self.elapsed},
        }

    def as_dict(self) -> dict:
        layer_text = None
        if self.layer is not None:
            layer_text = f"{self.layer}/{self.layers}" if self.layers is not None else str(self.layer)
        return {"node": self.node, "printer": self.printer, "state": self.state_id,
                "state_string": self.state_string, "printing": self.printing, "paused": self.paused,
                "file": self.file, "path": self.path, "origin": self.origin, "progress": self.progress,
                "layer": self.layer, "layers": self.layers, "layer_text": layer_text, "time_left": self.time_left,
                "time_left_origin": self.time_left_origin, "elapsed": self.elapsed,
                "temperatures": self.temperatures, "last_event": self.last_event,
                "last_event_ts": self.last_event_ts}


def _render_field(state: PrinterState, field: str) -> bytes:
    return to_json(state.fields()[field])


def _render_temperature(state: PrinterState, tool: str) -> bytes:
    return to_json(state.temperatures.get(tool))


# --- Home Assistant discovery -----------------------------------------------------------------------------------

def _ha_id(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(str(p) for p in parts))


def discovery_messages(prefix: str, base: str, node: str, printer: str, tools, buttons, version: str) -> list:
    """(topic, payload dict or None) of every discovery config of one printer: its sensors, the printing binary
    sensor, one temperature sensor (and its target) per known tool, and a button per allowed command (None, an
    empty retained payload, removes a button whose command is not allowed)."""
    device_id = _ha_id("zevents", node, printer)
    root = f"{base}/{node}/{printer}/"
    availability = [{"t": f"{base}/{node}/status", "pl_avail": "online", "pl_not_avail": "offline"}]
    device = {"ids": [device_id], "name": f"{printer} ({node})", "mf": "zevents", "mdl": "zevents printer",
              "sw": version}

    def entity(component, key, name, **extra):
        config = {"~": root, "name": name, "uniq_id": f"{device_id}_{key}",
                  "avty": availability, "dev": device, **extra}
        return f"{prefix}/{component}/{device_id}/{key}/config", config

    state = {"stat_t": "~state", "json_attr_t": "~state"}
    messages = [
        entity("sensor", "state", "State", val_tpl="{{ value_json.state_string }}", ic="mdi:printer-3d", **state),
        entity("sensor", "progress", "Progress", val_tpl="{{ value_json.progress }}", unit_of_meas="%",
               stat_cla="measurement", ic="mdi:progress-clock", stat_t="~state"),
        entity("sensor", "file", "Current file", val_tpl="{{ value_json.file }}", ic="mdi:file", stat_t="~state"),
        entity("sensor", "layer", "Layer", val_tpl="{{ value_json.layer_text }}", ic="mdi:layers",
               stat_t="~state"),
        entity("sensor", "time_left", "Time left", val_tpl="{{ value_json.time_left }}", unit_of_meas="s",
               dev_cla="duration", stat_t="~state"),
        entity("binary_sensor", "printing", "Printing",
               val_tpl="{{ 'ON' if value_json.printing else 'OFF' }}", dev_cla="running", stat_t="~state"),
    ]
    for tool in sorted(tools):
        label = tool.capitalize().replace("Tool", "Tool ")
        for field, suffix in (("actual", ""), ("target", " target")):
            messages.append(entity("sensor", _ha_id(tool, field), f"{label}{suffix}",
                                   stat_t=f"~state/temperature/{tool}", val_tpl=f"{{{{ value_json.{field} }}}}",
                                   unit_of_meas="°C", dev_cla="temperature", stat_cla="measurement"))
    for command in ("pause", "resume", "cancel"):
        topic, config = entity("button", command, command.capitalize(), cmd_t=f"~command/{command}",
                               pl_prs="PRESS", ic={"pause": "mdi:pause", "resume": "mdi:play",
                                                   "cancel": "mdi:stop"}[command])
        messages.append((topic, config if command in buttons else None))
    return messages


# --- the outbox -------------------------------------------------------------------------------------------------

class Handed:
    """One event on its way: handed to the MQTT broker when ``remaining`` of its messages are acked."""
    __slots__ = ("group", "seq", "epoch", "remaining")

    def __init__(self, group, seq, epoch):
        self.group, self.seq, self.epoch, self.remaining = group, seq, epoch, 0


class Message:
    """One MQTT message; a conflatable one (``key``) may carry a function that renders its payload when sent."""
    __slots__ = ("topic", "payload", "qos", "retain", "record", "key")

    def __init__(self, topic, payload, qos, retain, record=None, key=None):
        self.topic, self.payload, self.qos, self.retain, self.record, self.key = topic, payload, qos, retain, record, key


class Outbox:
    """Messages not yet handed to paho, in order; conflatable ones (``key`` set) replaced in place by newer ones."""

    def __init__(self):
        self.queue: collections.deque = collections.deque()
        self.waiting: dict = {}        # conflation key -> its Message still in the queue
        self.conflated = 0

    def __len__(self):
        return len(self.queue)

    def add(self, message: Message):
        if message.key is not None:
            older = self.waiting.get(message.key)
            if older is not None:
                older.payload, older.retain = message.payload, message.retain
                self.conflated += 1
                return
            self.waiting[message.key] = message
        elif message.record is not None:
            message.record.remaining += 1
        self.queue.append(message)

    def add_first(self, messages: list):
        """Messages that go before everything waiting (what a (re)connection announces)."""
        for message in reversed(messages):
            if message.key is not None:
                older = self.waiting.pop(message.key, None)
                if older is not None:
                    self.queue.remove(older)
                self.waiting[message.key] = message
            self.queue.appendleft(message)

    def pop(self) -> Message:
        message = self.queue.popleft()
        if message.key is not None:
            if self.waiting.get(message.key) is message:
                del self.waiting[message.key]
            if callable(message.payload):
                message.payload = message.payload()  # state is rendered when it leaves, not per event
        return message

    def push_back(self, message: Message):
        """A message paho refused (not connected, QoS 0): first again."""
        if message.key is not None:
            if message.key in self.waiting:
                return  # a newer value is already waiting
            self.waiting[message.key] = message
        self.queue.appendleft(message)


# --- the cursor -------------------------------------------------------------------------------------------------

class Cursor:
    """The last seq of every group handed to the MQTT broker, and its epoch; saved atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.epoch = None
        self.since: dict = {}
        self.dirty = False
        self.saved_at = 0.0

    def load(self) -> bool:
        try:
            data = json.loads(self.path.read_text())
            self.epoch = int(data["epoch"])
            self.since = {str(g): int(s) for g, s in data["since"].items()}
            return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("mqtt: ignoring unreadable cursor %s (%s); starting from now", self.path, exc)
            return False

    def advance(self, record: Handed):
        if record.epoch != self.epoch:
            self.epoch, self.since = record.epoch, {}
        self.since[record.group] = record.seq
        self.dirty = True

    def save(self):
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text(json.dumps({"epoch": self.epoch, "since": self.since}))
        os.replace(temp, self.path)
        self.dirty = False
        self.saved_at = time.monotonic()


# --- paho ---------------------------------------------------------------------------------------------------------

def make_client(section: dict, client_id: str, will: tuple | None, protocol=paho.MQTTv311):
    """A paho 2.x client configured from the ``mqtt:`` section (URL, TLS, credentials, will); not connected.
    MQTT 3.1.1 clients get a clean session; an MQTT 5 client chooses its session when it connects
    (:func:`session_connect_args`)."""
    url = parse_url(section["url"])
    session = {"clean_session": True} if protocol != paho.MQTTv5 else {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, transport=url["transport"],
                         protocol=protocol, **session)
    if url["transport"] == "websockets":
        client.ws_set_options(path=url["path"])
    if url["tls"]:
        tls = section.get("tls") or {}
        client.tls_set(ca_certs=tls.get("ca_certs"), certfile=tls.get("certfile"), keyfile=tls.get("keyfile"))
        client.tls_insecure_set(bool(tls.get("insecure")))
    username = section.get("username") or url["username"]
    if username:
        client.username_pw_set(username, section.get("password") or url["password"])
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=0.2, max_delay=max(0.5, float(section.get("reconnect_max") or 30)))
    return client, url


def session_connect_args(session_expiry: int) -> dict:
    """MQTT 5 connect arguments of the bridge's session: kept by the broker for ``session_expiry`` seconds after a
    disconnection and resumed on every reconnection, never a clean start (Mosquitto 2.0 does not persist a
    session that started clean, whatever its expiry); with 0, a clean session that ends with the connection."""
    return {"clean_start": not session_expiry,
            "properties": session_expiry_property(PacketTypes.CONNECT, session_expiry)}


def session_expiry_property(packet_type, seconds: int) -> Properties:
    properties = Properties(packet_type)
    properties.SessionExpiryInterval = seconds
    return properties


def printer_endpoints(config) -> dict:
    """The command channel of every printer of this node, by name (``printer:``, or each of ``printers:``)."""
    from zevents.printer.settings import printer_sections

    return {section["name"]: section["commands"] for section in printer_sections(config)}


def default_printer(config) -> str:
    return config.get("printer", "name") or "printer"


class Waker:
    """A pipe that makes the bridge's poll return now (paho's thread has news: an ack, a connection change)."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self, *_):
        with contextlib.suppress(OSError):  # a full pipe already says "wake up"
            os.write(self.write_fd, b"\0")

    def drain(self):
        with contextlib.suppress(OSError):
            os.read(self.read_fd, 4096)

    def close(self):
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


# --- the bridge -------------------------------------------------------------------------------------------------

class MqttBridge:
    """Everything `zevents mqtt` runs, startable in-process (tests run it on a thread): ``start()``, ``serve()``
    until ``stop()``, ``close()``."""

    def __init__(self, config, context: zmq.Context | None = None, cursor_path: Path | None = None):
        self.config = config
        self.section = config.get("mqtt") or {}
        self.context = context or zmq.Context.instance()
        self.node = config.node
        self.base = self.section.get("base_topic", "zevents").rstrip("/")
        layouts = self.section.get("layouts") or {}
        self.octoprint = bool(layouts.get("octoprint", True))
        self.zevents = bool(layouts.get("zevents", True))
        octo = self.section.get("octoprint") or {}
        self.octo_base = octo.get("base_topic", "octoPrint/")
        self.octo_default = octo.get("default_printer") or default_printer(config)
        self.octo_retained = frozenset(octo.get("retain_events") or ())
        self.threshold = float(octo.get("temperature_threshold", 0.1))
        self.qos = int(self.section.get("qos", 2))
        self.session_expiry = int(self.section.get("session_expiry", 86400))
        self.retain = bool(self.section.get("retain", True))
        ha = self.section.get("homeassistant") or {}
        self.discovery = bool(ha.get("discovery", True)) and self.zevents
        self.ha_prefix = ha.get("prefix", "homeassistant")
        self.max_pending = int(self.section.get("max_pending", 100_000))
        self.window = self.configured_window = int(self.section.get("inflight", 100))
        self.default_printer = default_printer(config)
        commands = self.section.get("commands") or {}
        self.commands_enabled = bool(commands.get("enabled"))
        self.allowed = tuple(commands.get("allowed") or ()) if self.commands_enabled else ()
        self.cursor = Cursor(cursor_path or Path(config.data_dir) / "mqtt" / f"cursor-{topic_level(self.node)}.json")
        self.states: dict = {}
        self.octo_progress: dict = {}
        self.octo_temps: dict = {}
        self.discovered_tools: dict = {}
        self.outbox = Outbox()
        self.records: collections.deque = collections.deque()
        self.inflight: dict = {}
        self.acks: queue.SimpleQueue = queue.SimpleQueue()
        self.connection_changes: queue.SimpleQueue = queue.SimpleQueue()
        self.connected = False
        self.holding = False
        self.resending = False
        self.stats = collections.Counter()
        self.subscriber = None
        self.client = None
        self.session_ender = None
        self._address = None
        self._connecting = threading.Lock()
        self._connect_started = False
        self.will_keeper = None
        self.commands = None
        self._stop = threading.Event()
        self.waker = Waker()

    # --- topics ------------------------------------------------------------------------------------------------

    def printer_of(self, envelope) -> str:
        if envelope.printer:
            return envelope.printer
        return self.default_printer if envelope.group in PRINTER_GROUPS else NODE_WIDE

    def root(self, node: str, printer: str) -> str:
        return f"{self.base}/{topic_level(node)}/{topic_level(printer)}/"

    def octo_root(self, printer: str) -> str:
        if printer in (self.octo_default, NODE_WIDE):
            return self.octo_base
        return f"{self.octo_base}{topic_level(printer)}/"

    @property
    def status_topic(self) -> str:
        return f"{self.base}/{topic_level(self.node)}/status"

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self):
        """Subscribe to the bus (resuming after the saved cursor), seed the state, start connecting to MQTT."""
        resumed = self.cursor.load()
        self.subscriber = zbus.Subscriber(self.config, groups=None, context=self.context,
                                          since=self.cursor.since if resumed else None,
                                          epoch=self.cursor.epoch if resumed else None)
        self._seed_state()
        if resumed:
            self._resume()
        client_id = self.section.get("client_id") or f"zevents-{self.node}"
        will = (self.status_topic, b"offline") if self.zevents else (self.octo_base + "mqtt", b"disconnected")
        # MQTT 5 with a session that outlives a connection: after a reconnection (to a broker that kept the session,
        # across its own restart with persistence) paho finishes the QoS 2 exchanges that were in flight, so the
        # broker releases each message exactly once.  Without the session (_on_connect) we send them again.
        self.client, url = make_client(self.section, client_id, will, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(self.window)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        if self.octoprint and self.zevents:
            # MQTT gives a connection one will: OctoPrint-MQTT's topic gets its own small connection.
            self.will_keeper, _ = make_client(self.section, client_id + "-will",
                                              (self.octo_base + "mqtt", b"disconnected"))
            self.will_keeper.on_connect = lambda c, *a: c.publish(self.octo_base + "mqtt", b"connected", 1, True)
            self.will_keeper.connect_async(url["host"], url["port"], int(self.section.get("keepalive", 60)))
            self.will_keeper.loop_start()
        if self.commands_enabled:
            self.commands = Commands(self)
            self.client.on_message = self.commands.on_message
        self._address = (url["host"], url["port"], int(self.section.get("keepalive", 60)))
        if self.session_expiry:
            self._end_previous_session(client_id)
        else:
            self._connect()
        log.info("mqtt: bridging node %s to %s (layouts: %s)", self.node, self.section["url"],
                 ", ".join(n for n, on in (("octoprint", self.octoprint), ("zevents", self.zevents)) if on))

    def _connect(self):
        with self._connecting:
            if self.client is None or self._stop.is_set() or self._connect_started:
                return
            self._connect_started = True
            self.client.connect_async(*self._address, **session_connect_args(self.session_expiry))
            self.client.loop_start()

    def _end_previous_session(self, client_id: str):
        """A previous process's session may hold QoS 2 messages half exchanged that this process cannot finish (and
        a stale packet id there would swallow the new message that reuses it): a first short connection with a
        clean start and no expiry ends it; the bridge's own connection starts once that one has ended."""
        self.session_ender, _ = make_client(self.section, client_id, None, protocol=paho.MQTTv5)
        ended = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                log.warning("mqtt: the broker refused the connection: %s", reason_code)
                return
            ended.set()
            client.disconnect()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            if ended.is_set():
                self._connect()

        self.session_ender.on_connect = on_connect
        self.session_ender.on_disconnect = on_disconnect
        self.session_ender.connect_async(*self._address, clean_start=True,
                                         properties=session_expiry_property(PacketTypes.CONNECT, 0))
        self.session_ender.loop_start()

    def _seed_state(self):
        """The printers' state as the broker's snapshot has it, so that retained topics are right from the start."""
        try:
            events = self.subscriber.snapshot(groups=sorted(PRINTER_GROUPS))
        except zbus.BusError as exc:
            log.warning("mqtt: no snapshot from the broker (%s); state starts empty", exc)
            return
        for envelope in sorted(events, key=lambda e: e.ts):
            printer = self.printer_of(envelope)
            self._state(envelope.node, printer).apply(envelope.name, envelope.payload or {}, envelope.ts)

    def _resume(self):
        """Replay what the MQTT broker has not been handed yet, from the bus's ring."""
        subscriber = self.subscriber
        try:
            status = subscriber.control.status(subscriber.control_timeout)
        except zbus.BusError as exc:
            log.warning("mqtt: cannot resume after the cursor now (%s); the first event will repair", exc)
            return
        if status["epoch"] != self.cursor.epoch:
            log.warning("mqtt: the bus broker restarted since the cursor was saved: resuming from the start of its "
                        "current run; events of the previous run after the cursor are not in its ring")
            subscriber.epoch, subscriber.last_seq = status["epoch"], {}
        for group, last in sorted(status["streams"].items()):
            since = subscriber.last_seq.get(group, 0)
            if last > since:
                subscriber._repair(group, since, None)
        log.info("mqtt: resumed after the cursor: %d events to hand over", len(subscriber.pending))

    def _state(self, node: str, printer: str) -> PrinterState:
        key = (node, printer)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = PrinterState(node, printer)
        return state

    def stop(self):
        self._stop.set()
        self.waker.wake()

    def close(self, timeout: float = 5.0):
        """Hand over what can be handed within ``timeout``, say offline, save the cursor, release everything."""
        self._stop.set()
        if self.session_ender is not None:
            self.session_ender.disconnect()
            self.session_ender.loop_stop()
        with self._connecting:
            self._connect_started = True  # no connection starts from now on
        if self.client is not None:
            deadline = time.monotonic() + timeout
            while (self.outbox or self.inflight) and self.connected and time.monotonic() < deadline:
                self._step(wait=0.05, read_bus=False)
            if self.connected:
                offline = []
                if self.zevents:
                    offline.append(self.client.publish(self.status_topic, b"offline", 1, True))
                for info in offline:
                    try:
                        info.wait_for_publish(timeout=2.0)
                    except (RuntimeError, ValueError):
                        pass
            # Nothing will resume this session (the next process starts a clean one): the broker may drop it now.
            self.client.disconnect(properties=session_expiry_property(PacketTypes.DISCONNECT, 0))
            self.client.loop_stop()
            self._take_acks()
        if self.will_keeper is not None:
            try:
                self.will_keeper.publish(self.octo_base + "mqtt", b"disconnected", 1, True).wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
            self.will_keeper.disconnect()
            self.will_keeper.loop_stop()
        if self.commands is not None:
            self.commands.close()
        self.cursor.save()
        if self.subscriber is not None:
            self.subscriber.close()
        self.waker.close()

    # --- paho callbacks (paho's thread: hand over to the loop) --------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("mqtt: the broker refused the connection: %s", reason_code)
            return
        # Called before paho resends what was in flight.  Without our session (first connection, a broker that
        # restarted without persistence, an expired session) its PUBRELs would name packets the broker never
        # stored and be "completed" unsent: drop paho's state, the loop publishes those messages again (at least
        # once, seq tells a repeat).
        lost = [] if flags.session_present else [message.mid for message in client.drop_out_messages()]
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self.connection_changes.put((True, flags.session_present, lost, receive_maximum))
        if self.commands is not None:
            client.subscribe(f"{self.base}/{topic_level(self.node)}/+/command/+", qos=1)
        self.waker.wake()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connection_changes.put((False, False, [], None))
        self.waker.wake()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks.put((mid, reason_code))
        self.waker.wake()

    # --- the loop ----------------------------------------------------------------------------------------------

    def serve(self):
        self._wake_poller = zmq.Poller()
        self._wake_poller.register(self.waker.read_fd, zmq.POLLIN)
        self._bus_poller = zmq.Poller()
        self._bus_poller.register(self.waker.read_fd, zmq.POLLIN)
        self._bus_poller.register(self.subscriber.sock, zmq.POLLIN)
        while not self._stop.is_set():
            self._step(wait=LOOP_TICK)

    def _step(self, wait: float, read_bus: bool = True):
        self._take_connection_changes()
        self._take_acks()
        if read_bus:
            self._read_bus()
        self._feed()
        if self.cursor.dirty and time.monotonic() - self.cursor.saved_at >= SAVE_INTERVAL:
            self.cursor.save()
        if read_bus and self.subscriber.pending and not self.holding:
            return
        poller = self._bus_poller if read_bus and not self.holding else self._wake_poller
        if poller.poll(wait * 1000):
            self.waker.drain()

    def _take_connection_changes(self):
        while True:
            try:
                up, session_present, lost, receive_maximum = self.connection_changes.get_nowait()
            except queue.Empty:
                return
            if up and not self.connected:
                log.info("mqtt: connected to %s (%s)", self.section["url"],
                         "session resumed" if session_present else "new session")
                self.stats["connects"] += 1
                self.stats["sessions_resumed"] += bool(session_present)
                # The broker's Receive Maximum: past it, MQTT 5 brokers refuse QoS 1/2 messages (quota exceeded).
                self.window = min(self.configured_window, receive_maximum or self.configured_window)
                self._publish_again(lost)
                self.outbox.add_first(self._announcements())
                # paho resends what was in flight itself, after telling us it is connected: anything we publish
                # before those are acknowledged could overtake them.
                self.resending = bool(self.inflight)
            elif not up and self.connected:
                log.warning("mqtt: lost the broker; holding events (at most mqtt.max_pending = %d messages)",
                            self.max_pending)
            self.connected = up

    def _publish_again(self, mids: list):
        """Messages paho had in flight for a session the broker no longer has: first in the outbox again, in the
        order they were published."""
        dropped = set(mids)
        again = [mid for mid in self.inflight if mid in dropped]
        if again:
            log.warning("mqtt: the broker has no session of ours (restarted without persistence, or expired): "
                        "publishing the %d messages in flight again (a consumer may see them twice; seq tells)",
                        len(again))
            self.stats["published_again"] += len(again)
        for mid in reversed(again):
            self.outbox.push_back(self.inflight.pop(mid))

    def _announcements(self) -> list:
        """What every (re)connection publishes first: online, then each printer's retained state and discovery
        (the broker may have restarted without them)."""
        messages = []
        if self.zevents:
            messages.append(Message(self.status_topic, b"online", 1, True))
        if self.octoprint and self.will_keeper is None:
            messages.append(Message(self.octo_base + "mqtt", b"connected", 1, True))
        self.octo_progress.clear()
        self.octo_temps.clear()
        for state in self.states.values():
            messages.extend(self._state_messages(state, set(PrinterState.FIELDS) | {
                f"temperature/{tool}" for tool in state.temperatures}))
            if self.octoprint:
                messages.extend(self._octoprint_state(state, int(time.time())))
            messages.extend(self._discovery(state, force=True))
        return messages

    def _read_bus(self):
        if len(self.outbox) >= self.max_pending:
            if not self.holding:
                self.stats["held"] += 1
                log.warning("mqtt: %d messages wait for the MQTT broker (mqtt.max_pending): reading no more events "
                            "for now; they wait in the bus's replay ring (%d events)", len(self.outbox),
                            self.subscriber.bus.replay_ring)
                self.holding = True
            return
        if self.holding:
            self.holding = False
            log.info("mqtt: the MQTT broker takes messages again; reading the bus")
        recv = self.subscriber.recv
        for _ in range(READ_BATCH):
            envelope = recv(0)
            if envelope is None:
                return
            self.handle(envelope)
            if len(self.outbox) >= self.max_pending:
                return

    def _feed(self):
        if not self.connected:
            return
        if self.resending:
            if self.inflight:
                return
            self.resending = False
        publish = self.client.publish
        outbox, inflight = self.outbox, self.inflight
        while outbox and len(inflight) < self.window:
            message = outbox.pop()
            info = publish(message.topic, message.payload, message.qos, message.retain)
            if message.qos == 0:
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    outbox.push_back(message)
                    return
                self._done(message)
                continue
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                log.error("mqtt: paho refused a message on %s: %s", message.topic, paho.error_string(info.rc))
                outbox.push_back(message)
                return
            inflight[info.mid] = message  # paho keeps a QoS 1/2 message it could not send and resends it

    def _take_acks(self):
        acks = self.acks
        while True:
            try:
                mid, reason_code = acks.get_nowait()
            except queue.Empty:
                return
            message = self.inflight.pop(mid, None)
            if message is None:
                continue
            if reason_code.is_failure:
                # The broker will never take it (not authorized, bad topic, ...): said, and not retried, or it
                # would hold every event behind it.
                self.stats["refused"] += 1
                log.error("mqtt: the broker refused a message on %s: %s", message.topic, reason_code)
            self._done(message)

    def _done(self, message: Message):
        self.stats["sent"] += 1
        record = message.record
        if record is None or message.key is not None:
            return
        record.remaining -= 1
        records = self.records
        while records and records[0].remaining <= 0:
            self.cursor.advance(records.popleft())

    # --- events → messages -----------------------------------------------------------------------------------

    def handle(self, envelope):
        """Turn one bus event into its messages in the outbox."""
        name = envelope.name
        if name == "Heartbeat":
            return
        self.stats["events"] += 1
        printer = self.printer_of(envelope)
        payload = envelope.payload or {}
        record = Handed(envelope.group, envelope.seq, envelope.epoch)
        self.records.append(record)
        add = self.outbox.add
        telemetry = name in TELEMETRY
        if self.zevents:
            root = self.root(envelope.node, printer)
            body = to_json({"seq": envelope.seq, "epoch": envelope.epoch, "ts": envelope.ts, "src": envelope.src,
                            "node": envelope.node, "printer": envelope.printer, "group": envelope.group,
                            "event": name, "payload": payload})
            topic = f"{root}{envelope.group}/{topic_level(name)}"
            add(Message(topic, body, self.qos, False, record, topic if telemetry else None))
        if self.octoprint and name not in OCTOPRINT_NOT_EVENTS:
            data = dict(payload)
            data["_event"] = name
            data["_timestamp"] = envelope.ts // 1_000_000
            add(Message(f"{self.octo_root(printer)}event/{topic_level(name)}", to_json(data), self.qos,
                        self.retain and name in self.octo_retained, record))
        if printer != NODE_WIDE:
            state = self._state(envelope.node, printer)
            changed = state.apply(name, payload, envelope.ts)
            if changed:
                for message in self._state_messages(state, changed):
                    add(message)
                for message in self._discovery(state):
                    add(message)
            if self.octoprint:
                for message in self._octoprint_state(state, envelope.ts // 1_000_000):
                    add(message)
        if not record.remaining and self.records[0] is record:
            # Nothing of this event needs an ack (telemetry, a layout that skips it): handed already.
            while self.records and self.records[0].remaining <= 0:
                self.cursor.advance(self.records.popleft())

    def _state_messages(self, state: PrinterState, changed: set) -> list:
        """Retained state topics (conflated: only the latest value matters)."""
        if not self.zevents:
            return []
        root = self.root(state.node, state.printer)
        messages = [Message(root + "state", lambda: to_json(state.as_dict()), self.qos, self.retain,
                            key=root + "state")]
        for field in changed:
            if field in PrinterState.FIELDS:
                render = functools.partial(_render_field, state, field)
            elif field.startswith("temperature/"):
                render = functools.partial(_render_temperature, state, field[len("temperature/"):])
            else:
                continue
            topic = f"{root}state/{field}"
            messages.append(Message(topic, render, self.qos, self.retain, key=topic))
        return messages

    def _octoprint_state(self, state: PrinterState, timestamp: int) -> list:
        """OctoPrint-MQTT's progress/printing (on change) and temperature/<tool> (past the threshold)."""
        messages = []
        root = self.octo_root(state.printer)
        progress = {"location": state.origin or "", "path": state.path or "",
                    "progress": int(state.progress or 0)}
        if self.octo_progress.get(root) != progress:
            self.octo_progress[root] = progress
            topic = root + "progress/printing"
            messages.append(Message(topic, to_json(dict(progress, _timestamp=timestamp)), self.qos, self.retain,
                                    key=topic))
        for tool, reading in state.temperatures.items():
            actual, target = reading["actual"], reading["target"]
            if not actual and not target:
                continue  # OctoPrint-MQTT skips entries with both 0/None
            key = root + "temperature/" + topic_level(tool)
            last = self.octo_temps.get(key)
            if last is not None and abs((actual or 0) - (last[0] or 0)) < self.threshold and \
                    abs((target or 0) - (last[1] or 0)) < 0.1:
                continue
            self.octo_temps[key] = (actual, target)
            messages.append(Message(key, to_json({"actual": actual, "target": target, "_timestamp": timestamp}),
                                    self.qos, self.retain, key=key))
        return messages

    def _discovery(self, state: PrinterState, force: bool = False) -> list:
        if not self.discovery:
            return []
        key = (state.node, state.printer)
        tools = frozenset(state.temperatures)
        if not force and self.discovered_tools.get(key) == tools:
            return []
        self.discovered_tools[key] = tools
        from zevents import __version__

        buttons = [c for c in ("pause", "resume", "cancel") if c in self.allowed] if state.node == self.node else []
        return [Message(topic, to_json(config) if config is not None else b"", self.qos, True, key=topic)
                for topic, config in discovery_messages(self.ha_prefix, self.base, topic_level(state.node),
                                                        topic_level(state.printer), tools, buttons, __version__)]


# --- commands from MQTT ------------------------------------------------------------------------------------------

class Commands:
    """``<base>/<node>/<printer>/command/<name>`` → the printer link's command channel, on a thread of its own (a
    pause waits for the printer; the bridge's loop must not).  Results go to ``.../command/<name>/result`` and to
    the bus as ``custom/MqttCommand`` (src ``mqtt``)."""

    CHANNEL = {"pause": "PAUSE", "resume": "RESUME", "cancel": "CANCEL", "connect": "CONNECT",
               "disconnect": "DISCONNECT", "gcode": "GCODE"}
    MAX_PAYLOAD = 4096

    def __init__(self, bridge: MqttBridge):
        self.bridge = bridge
        self.allowed = bridge.allowed
        self.allow_motion = bool(bridge.config.get("printer", "allow_bus_commands"))
        self.endpoints = printer_endpoints(bridge.config)
        self.requests: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="zevents-mqtt-commands", daemon=True)
        self.thread.start()

    def on_message(self, client, userdata, message):
        self.requests.put((message.topic, bytes(message.payload)))

    def close(self):
        self.requests.put(None)
        self.thread.join(70)

    def _work(self):
        publisher = zbus.Publisher(self.bridge.config, src="mqtt", context=self.bridge.context)
        clients: dict = {}
        try:
            while True:
                item = self.requests.get()
                if item is None:
                    return
                topic, payload = item
                result = self.execute(topic, payload, clients)
                publisher.publish(COMMAND_EVENT, result)
                self.bridge.client.publish(topic + "/result", to_json(result), 1, False)
        finally:
            for client in clients.values():
                client.close()
            publisher.close(linger=2)

    def execute(self, topic: str, payload: bytes, clients: dict) -> dict:
        from zevents.printer import channel
        from zevents.printer.service import moves_the_printer

        parts = topic.split("/")
        printer, command = parts[-3], parts[-1]
        result = {"command": command, "printer": printer, "topic": topic, "accepted": False, "error": None,
                  "reply": None}
        if command not in self.allowed:
            result["error"] = (f"command {command!r} is not allowed (mqtt.commands.allowed: "
                               f"{', '.join(self.allowed) or 'none'})")
            return result
        endpoint = self.endpoints.get(printer)
        if endpoint is None:
            result["error"] = f"no printer {printer!r} on this node (printers: {', '.join(self.endpoints)})"
            return result
        if len(payload) > self.MAX_PAYLOAD:
            result["error"] = f"payload over {self.MAX_PAYLOAD} bytes"
            return result
        args = {"user": "mqtt"}
        if command == "gcode":
            lines = _gcode_lines(payload)
            if not lines:
                result["error"] = "no G-code lines (send text, or JSON {\"lines\": [...]})"
                return result
            moving = [line for line in lines if moves_the_printer(line)]
            if moving and not self.allow_motion:
                result["error"] = (f"refused {moving[0].strip()!r}: G-code from MQTT may not move the printer "
                                   "unless printer.allow_bus_commands is true")
                return result
            args = {"lines": lines, "src": "user"}
        client = clients.get(printer)
        if client is None:
            client = clients[printer] = channel.CommandClient(endpoint, self.bridge.context)
        try:
            reply = client.request(self.CHANNEL[command], args, timeout=60.0)
        except channel.ChannelError as exc:
            result["error"] = str(exc)
            return result
        reply.pop("id", None)
        result["accepted"], result["reply"] = True, reply
        log.info("mqtt: %s on %s from MQTT: done", command, printer)
        return result


def _gcode_lines(payload: bytes) -> list:
    text = payload.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            lines = json.loads(text).get("lines")
        except (ValueError, AttributeError):
            return []
        return [str(line) for line in lines] if isinstance(lines, list) else []
    return [line for line in text.splitlines() if line.strip()]

