"""Configuration: YAML loading, merging over the embedded default, and validation that names file, line and key.

Every section is described by a schema (key → :class:`Key`: its types and its range, choices or check); every key
has one.  Validation collects *every* problem (``check``) or raises the first one (``load``, which every service
calls at start); each problem is a :class:`ConfigError` carrying the file, the line and the dotted key, so
``zevents config check`` can report them all.  Files are read by :mod:`zevents.safe_yaml` (size, depth and alias
limits, duplicate keys refused).
"""
from __future__ import annotations

import copy
import gc
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from zevents import safe_yaml

ENV_CONFIG = "ZEVENTS_CONFIG"


class ConfigError(Exception):
    #: A warning: `zevents config check` shows it, but the file is valid (``check(..., warnings=True)`` returns it).
    warning = False

    def __init__(self, message: str, file: str | None = None, line: int | None = None, key: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self):
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}"
        return f"{where}: {self.key + ': ' if self.key else ''}{self.message}"


ANY = object()
NUMBER = (int, float)
OPT_STR = (str, type(None))


@dataclass(frozen=True)
class Key:
    """One key's rule beyond its type: an inclusive range (``min``/``max``), an exclusive lower bound (``above``),
    a set of choices, or a check of its own (returning an error message, or ``(keys inside the value, message)``
    to name the list item or mapping key at fault, or None when the value is fine).  A plain
    type or tuple of types in a schema means Key(types).  A number is always refused when it is NaN or infinite:
    no key means anything by those (a hook's `timeout: .nan` spun the hooks service at 100 % CPU)."""
    types: object
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    check: object = None
    above: float | None = None

    def problem(self, value) -> str | None:
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, not {value!r}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                return "must be a number, not NaN"
            if value in (INF, -INF):
                return f"must be a finite number, not {value!r}"
            if (self.above is not None and value <= self.above or self.min is not None and value < self.min
                    or self.max is not None and value > self.max):
                return f"must be {self.range_text()}, not {value!r}"
        if self.check is not None:
            return self.check(value)
        return None

    def range_text(self) -> str:
        low = (f"> {_number_text(self.above)}" if self.above is not None else
               f"at least {_number_text(self.min)}" if self.min is not None else None)
        if self.min is not None and self.max is not None:
            return f"between {_number_text(self.min)} and {_number_text(self.max)}"
        high = f"at most {_number_text(self.max)}" if self.max is not None else None
        return " and ".join(part for part in (low, high) if part)

    def validate(self, value) -> str | None:
        """Why ``value`` is not right for this key (its type, then its range), or None."""
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            return f"must be {_type_name(self.types)}, not {value!r}"
        return self.problem(value)


INF = float("inf")


def _number_text(number) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def check_endpoint(value) -> str | None:
    """A ZeroMQ endpoint other processes can reach: ``ipc://PATH`` (a socket path fits in 107 bytes) or
    ``tcp://HOST:PORT`` (a port 1-65535; ``*`` as HOST binds every interface)."""
    if not isinstance(value, str):
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("ipc", "tcp"):
        return f"must be an ipc://PATH or tcp://HOST:PORT endpoint, not {value!r}"
    if scheme == "ipc":
        if not rest:
            return f"{value!r} has no socket path (ipc://PATH)"
        if len(os.fsencode(rest)) > 107:
            return (f"the socket path of {value!r} is {len(os.fsencode(rest))} bytes; at most 107 fit in a socket "
                    "address")
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return f"{value!r} needs a host and a port (tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555)"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{value!r}: the port must be a number from 1 to 65535, not {port!r}"
    if host.startswith("[") != host.endswith("]") or any(c.isspace() or c in "/?#" for c in host):
        return f"{value!r}: {host!r} is not a host name or address"
    return None


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def _check_node(value) -> str | None:
    if isinstance(value, str) and not _NODE_NAME.match(value):
        return (f"must be 1-64 letters, digits, '.', '_' or '-' (it names the node's socket directory and every "
                f"event header), not {value!r}")
    return None


def _check_path(value) -> str | None:
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        return f"must be a directory path, not {value!r}"
    return None


# The registry of sections: top-level key -> schema (key -> types, Key, or a nested schema dict).  The core owns
# `bus` and `data_dir`; every service registers its own sections (register_section) from the module that
# zevents.service.SECTION_OWNERS names, so this module imports no service.
def check_text(value) -> str | None:
    if isinstance(value, str) and (not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        return f"must be a non-empty text without control characters, not {value!r}"
    return None


def _check_url(value) -> str | None:
    if isinstance(value, str) and value and not re.match(r"(https?|rtsp|webrtc)://[^\s/]+|/[^\s]*\Z", value):
        return f"must be an http(s):// URL or a path on this server, not {value!r}"
    return None


ENDPOINT = Key(OPT_STR, check=check_endpoint)
PATH = Key(OPT_STR, check=_check_path)          # a file or directory path (null: the default)
TEXT = Key(OPT_STR, check=check_text)          # a name, id or host: non-empty, no control characters
URL = Key(OPT_STR, check=_check_url)            # empty: not set (OctoPrint's configs write "")
SCHEMA: dict = {
    "bus": {
        "node": Key(OPT_STR, check=_check_node),
        "publish": ENDPOINT, "ingest": ENDPOINT, "replay": ENDPOINT,
        "replay_ring": Key(int, min=1, max=100_000_000),
        # below 10 ms heartbeats are most of the traffic; above an hour a dead broker goes unnoticed
        "heartbeat": Key(NUMBER, min=0.01, max=3600),
        "max_payload": Key(int, min=1, max=256 * 1024 * 1024),
        "hwm": Key(int, min=0, max=100_000_000),     # 0: no limit (ZeroMQ's meaning)
        # the journal: null = <data_dir>/bus/, false = the ring in memory only, or a directory
        "journal": Key((str, bool, type(None)), check=lambda value: _check_path(value) if isinstance(value, str)
                       else None if value in (None, False) else "must be null, false or a directory"),
        "journal_flush": Key(NUMBER, min=0, max=3600),
        "curve": Key((dict, type(None)), check=lambda value: _curve_problem(value)),
    },
    "data_dir": PATH,
}

CURVE_KEYS = {"server_public": str, "server_secret": str, "client_public": str, "client_secret": str,
              "allowed_clients": list}


def _curve_problem(value: dict) -> str | None:
    """`bus.curve`: Z85 keys (40 characters) by name; allowed_clients a list of public keys."""
    for key, item in value.items():
        if key not in CURVE_KEYS:
            return f"unknown key {key!r} (keys: {', '.join(CURVE_KEYS)})"
        if item is None:
            continue
        if not isinstance(item, CURVE_KEYS[key]):
            return f"{key} must be {'a list of keys' if key == 'allowed_clients' else 'a Z85 key'}"
        for one in (item if isinstance(item, list) else [item]):
            if not isinstance(one, str) or len(one) != 40:
                return f"{key}: a CURVE key is 40 Z85 characters (zevents keys new makes a pair)"
    return None


# Extra validators per top-level section: fn(config, section_value) -> list[ConfigError], run once the schema
# holds (the hooks service validates events.subscriptions here) so that `config check` runs them all.
SECTION_VALIDATORS: dict = {}


def register_section(name: str, schema, validator=None) -> None:
    """A service's config section: its schema (a dict of keys, or the types of a scalar section) and optionally a
    validator run after the schema check.  Registering the same section again replaces it."""
    SCHEMA[name] = schema
    if validator is not None:
        SECTION_VALIDATORS[name] = validator


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    if int in types and float in types:
        types = tuple(t for t in types if t is not int)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "scripts":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_text() -> str:
    return resources.files("zevents").joinpath("data/default.yaml").read_text()


def runtime_dir() -> Path:
    """A per-user directory for ipc sockets and pid files, created with mode 0700 (and refused if others can use
    it, since a socket there is a way into the printer)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "zevents" if base and os.path.isdir(base) else Path(f"/tmp/zevents-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"runtime directory {path} belongs to another user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "zevents"


@dataclass
class BusConfig:
    node: str
    publish: str
    ingest: str
    replay: str
    replay_ring: int = 100_000
    heartbeat: float = 1.0
    max_payload: int = 1 << 20
    hwm: int = 100_000
    journal: str | None = None       # the broker's journal directory; None: the ring lives in memory only
    journal_flush: float = 1.0       # seconds between flushes of the journal to disk (0: every batch)
    curve: dict | None = None        # CURVE keys of the bus sockets (zevents.curve), None: no encryption

    @classmethod
    def for_dir(cls, directory, node: str = "test", **overrides) -> "BusConfig":
        """ipc endpoints inside one directory: what tests and embedded uses need."""
        directory = Path(directory)
        return cls(node=node, publish=f"ipc://{directory}/pub.sock", ingest=f"ipc://{directory}/ingest.sock",
                   replay=f"ipc://{directory}/control.sock", **overrides)


@dataclass
class Config:
    data: dict
    path: str | None = None
    marks: dict = field(default_factory=dict)

    def line_of(self, *keys) -> int | None:
        while keys:
            if keys in self.marks:
                return self.marks[keys]
            keys = keys[:-1]
        return None

    def error(self, message: str, *keys) -> ConfigError:
        return ConfigError(message, self.path, self.line_of(*keys), ".".join(str(k) for k in keys) or None)

    def get(self, *keys, default=None):
        value = self.data
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    @property
    def node(self) -> str:
        return self.data["bus"]["node"] or socket.gethostname().split(".")[0] or "zevents"

    @property
    def bus(self) -> BusConfig:
        section = self.data["bus"]
        node = self.node
        base = None

        def endpoint(key, filename):
            nonlocal base
            if section.get(key):
                return section[key]
            if base is None:
                base = runtime_dir() / node
                base.mkdir(mode=0o700, exist_ok=True)
            return f"ipc://{base}/{filename}"

        return BusConfig(node=node, publish=endpoint("publish", "pub.sock"), ingest=endpoint("ingest", "ingest.sock"),
                         replay=endpoint("replay", "control.sock"), replay_ring=section["replay_ring"],
                         heartbeat=float(section["heartbeat"]), max_payload=section["max_payload"],
                         hwm=section["hwm"], journal=self._journal_dir(section.get("journal")),
                         journal_flush=float(section.get("journal_flush", 1.0)), curve=section.get("curve") or None)

    def _journal_dir(self, value) -> str | None:
        """`bus.journal`: null or true: <data_dir>/bus; false: none (the ring only in memory); or a directory.
        A broker on configured endpoints journals in a subfolder named after its publish endpoint: two brokers
        that share a data dir (tests, several nodes per host) never share a journal."""
        if value is False:
            return None
        if value is None or value is True:
            publish = self.data["bus"].get("publish")
            if not publish:
                return str(self.data_dir / "bus")
            import hashlib

            return str(self.data_dir / "bus" / hashlib.sha1(publish.encode()).hexdigest()[:16])
        return os.path.expanduser(value)

    def endpoint(self, section: str, key: str, filename: str) -> str:
        """A service endpoint from the config, or an ipc socket in the node's runtime directory."""
        value = self.get(section, key)
        if value:
            return value
        base = runtime_dir() / self.node
        base.mkdir(mode=0o700, exist_ok=True)
        return f"ipc://{base}/{filename}"

    @property
    def data_dir(self) -> Path:
        value = self.data.get("data_dir")
        return Path(os.path.expanduser(value)) if value else default_data_dir()


def _parse(text: str, path: str | None):
    """(data, marks) of a config text; YAML problems and broken limits (size, depth, aliases) as ConfigError."""
    try:
        data, marks = safe_yaml.load(text)
    except safe_yaml.YamlProblem as exc:
        key = ".".join(str(k) for k in exc.key) or None
        raise ConfigError(exc.message, path, exc.line, key) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping (bus:, printer:, events:, ...)", path, 1)
    return data, marks


def _read(path: str) -> str:
    """A config file's text; ConfigError when it cannot be read or is too large to be a config (checked before
    reading it: a config path pointing at a huge file must not fill the memory)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                safe_yaml.check_size(size)
                data = handle.read(safe_yaml.MAX_BYTES + 1)  # a FIFO or /proc file has no size
                safe_yaml.check_size(len(data))
            except safe_yaml.YamlLimit as exc:
                raise ConfigError(exc.message, path) from None
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path) from None


def _validate_schema(config: Config, value, schema, path=()) -> list:
    problems = []
    for key, item in value.items():
        key_path = path + (key,)
        if key not in schema:
            import difflib

            near = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(map(str, schema))})"
            problems.append(config.error(f"unknown key{hint}", *key_path))
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(item, dict):
                problems.append(config.error(f"must be a mapping, not {type(item).__name__}", *key_path))
            else:
                problems.extend(_validate_schema(config, item, expected, key_path))
        elif expected is not ANY:
            rule = expected if isinstance(expected, Key) else Key(expected)
            message = rule.validate(item)
            if message:
                inner = ()
                if isinstance(message, tuple):  # a check that names the item inside the value (a list index)
                    inner, message = message
                problems.append(config.error(message, *key_path, *inner))
    return problems


def _build(text: str | None, path: str | None) -> tuple[Config, list]:
    enabled = gc.isenabled()
    # Checking a large config allocates 100 000s of objects that all live until the check ends: the generational
    # collector would walk them again and again (it tripled the time of a 5 MB config) and would find no garbage.
    gc.disable()
    try:
        return _build_config(text, path)
    finally:
        if enabled:
            gc.enable()


def _build_config(text: str | None, path: str | None) -> tuple[Config, list]:
    default_data, _ = _parse(default_text(), "<default>")
    if text is None:
        return Config(default_data, None, {}), []
    user_data, marks = _parse(text, path)
    config = Config(user_data, path, marks)
    problems = _validate_schema(config, user_data, SCHEMA)
    config.data = _merge(default_data, user_data) if not problems else _merge(default_data, {
        k: v for k, v in user_data.items() if k in SCHEMA})
    if not problems:
        for section, validator in SECTION_VALIDATORS.items():
            problems.extend(validator(config, config.data.get(section)))
    return config, problems


def _register_builtin_validators():
    """Services own their sections; zevents.service names the modules that register them."""
    from zevents.service import register_config_sections

    register_config_sections()


def check(path: str | os.PathLike, warnings: bool = False) -> list:
    """Every problem of a config file (an empty list when it is valid); with ``warnings``, the warnings too (their
    ``warning`` is true): what may be wrong but depends on the machine the node runs on (a program not on PATH)."""
    path = str(path)
    try:
        text = _read(path)
    except ConfigError as exc:
        return [exc]
    _register_builtin_validators()
    try:
        problems = _build(text, path)[1]
    except ConfigError as exc:
        return [exc]
    return problems if warnings else [problem for problem in problems if not problem.warning]


def load(path: str | os.PathLike | None = None, text: str | None = None) -> Config:
    """The configuration: a user's file (or text) merged over the embedded default; raises the first problem."""
    if path is None and text is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is not None:
        path = str(path)
        text = _read(path)
    _register_builtin_validators()
    config, problems = _build(text, path)
    # A problem marked `fatal = False` (one bad hook subscription) is for `config check` and its service to report;
    # it must not stop every other service from loading the file.
    fatal = [problem for problem in problems if getattr(problem, "fatal", True)]
    if fatal:
        raise fatal[0]
    return config


def from_bus(bus: BusConfig, **sections) -> Config:
    """A config for embedding and tests: the default, with the given bus endpoints and section overrides."""
    config = load(text="")
    data = copy.deepcopy(config.data)
    data["bus"].update(node=bus.node, publish=bus.publish, ingest=bus.ingest, replay=bus.replay,
                       replay_ring=bus.replay_ring, heartbeat=bus.heartbeat, max_payload=bus.max_payload, hwm=bus.hwm,
                       journal=bus.journal if bus.journal else False, journal_flush=bus.journal_flush, curve=bus.curve)
    for key, value in sections.items():
        data[key] = _merge(data.get(key) or {}, value) if isinstance(value, dict) else value
    config = Config(data)
    problems = _validate_schema(config, data, SCHEMA)  # an embedder's values get the ranges a file gets
    if problems:
        raise problems[0]
    return config
