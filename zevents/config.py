"""Configuration: YAML loading, merging over the embedded default, and validation that names file, line and key.

Every section is described by a schema (key → expected type and default).  Validation collects *every* problem
(``check``) or raises the first one (``load``); each problem is a :class:`ConfigError` carrying the file, the line
and the dotted key, so ``zevents config check`` can report them all.
"""
from __future__ import annotations

import copy
import os
import socket
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

ENV_CONFIG = "ZEVENTS_CONFIG"


class ConfigError(Exception):
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
    """One key's rule beyond its type: an inclusive range, a set of choices, or a check of its own (returning an
    error message, or None when the value is fine).  A plain type or tuple of types in a schema means Key(types)."""
    types: object
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    check: object = None

    def problem(self, value) -> str | None:
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, not {value!r}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:
                return "must be a number, not NaN"
            if self.min is not None and value < self.min:
                return f"must be at least {self.min}, not {value!r}"
            if self.max is not None and value > self.max:
                return f"must be at most {self.max}, not {value!r}"
        if self.check is not None:
            return self.check(value)
        return None


# The registry of sections: top-level key -> schema (key -> types, Key, or a nested schema dict).  The core owns
# `bus` and `data_dir`; every service registers its own sections (register_section) from the module that
# zevents.service.SECTION_OWNERS names, so this module imports no service.
SCHEMA: dict = {
    "bus": {
        "node": OPT_STR, "publish": OPT_STR, "ingest": OPT_STR, "replay": OPT_STR,
        "replay_ring": int, "heartbeat": NUMBER, "max_payload": int, "hwm": int,
        "journal": (str, bool, type(None)), "journal_flush": Key(NUMBER, min=0, max=3600),
        "curve": Key((dict, type(None)), check=lambda value: _curve_problem(value)),
    },
    "data_dir": OPT_STR,
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


def _marks(node, path=(), out=None) -> dict:
    """Line numbers (1-based) of every key and list item in a composed YAML tree, by key path."""
    if out is None:
        out = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            out[key_path] = key_node.start_mark.line + 1
            _marks(value_node, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[path + (index,)] = item.start_mark.line + 1
            _marks(item, path + (index,), out)
    return out


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
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML: {problem}", path, mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping (bus:, printer:, events:, ...)", path, 1)
    return data, _marks(node) if node is not None else {}


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
            types = rule.types if isinstance(rule.types, tuple) else (rule.types,)
            if isinstance(item, bool) and bool not in types:
                ok = False
            else:
                ok = isinstance(item, types)
            if not ok:
                problems.append(config.error(f"must be {_type_name(rule.types)}, not {item!r}", *key_path))
            else:
                message = rule.problem(item)
                if message:
                    problems.append(config.error(message, *key_path))
    return problems


def _build(text: str | None, path: str | None) -> tuple[Config, list]:
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


def check(path: str | os.PathLike) -> list:
    """Every problem of a config file (an empty list when it is valid)."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [ConfigError(f"cannot read: {exc}", path)]
    _register_builtin_validators()
    try:
        return _build(text, path)[1]
    except ConfigError as exc:
        return [exc]


def load(path: str | os.PathLike | None = None, text: str | None = None) -> Config:
    """The configuration: a user's file (or text) merged over the embedded default; raises the first problem."""
    if path is None and text is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is not None:
        path = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("no such file", path) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", path) from None
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
    return Config(data)
