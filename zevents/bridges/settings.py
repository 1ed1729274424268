"""The MQTT bridge's config section (``mqtt:``), registered with :mod:`zevents.config`.  Kept light: `config check`
imports it without paho."""
from __future__ import annotations

from urllib.parse import urlsplit

from zevents import config as zconfig
from zevents.config import NUMBER, OPT_STR, PATH, TEXT, Key

SCHEMES = {"mqtt": (1883, False, "tcp"), "mqtts": (8883, True, "tcp"), "ws": (80, False, "websockets"),
           "wss": (443, True, "websockets")}
SESSION_EXPIRY_MAX = 0xFFFFFFFF  # MQTT 5's largest Session Expiry Interval: the session never expires
COMMANDS = ("pause", "resume", "cancel", "connect", "disconnect", "gcode")


def parse_url(url: str) -> dict:
    """``mqtt://host[:port]``, ``mqtts://``, ``ws://host[:port]/path``, ``wss://`` → host, port, tls, transport,
    path; ValueError with the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    default_port, tls, transport = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return {"host": parts.hostname, "port": port, "tls": tls, "transport": transport,
            "path": parts.path or "/mqtt", "username": parts.username, "password": parts.password}


def _url_problem(value) -> str | None:
    try:
        parse_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def _topic_level_problem(value) -> str | None:
    if not value or any(c in value for c in "+#\0"):
        return f"must be a non-empty MQTT topic without wildcards, not {value!r}"
    return None


def _commands_problem(value) -> str | None:
    unknown = [c for c in value if c not in COMMANDS]
    if unknown:
        return f"unknown command(s) {', '.join(map(repr, unknown))}; commands are {', '.join(COMMANDS)}"
    return None


def _client_id(value) -> str | None:
    # MQTT 3.1.1 servers must accept 1-23 characters of [0-9a-zA-Z]; Mosquitto and others take more, not controls
    if isinstance(value, str) and (not value or len(value.encode()) > 65535 or any(ord(c) < 32 for c in value)):
        return f"must be 1 to 65535 bytes without control characters, not {value!r}"
    return None


def _password(value) -> str | None:
    if isinstance(value, str) and len(value.encode()) > 65535:
        return "must be at most 65535 bytes (MQTT's limit)"
    return None


def _event_names(value) -> str | None:
    if isinstance(value, list) and not all(isinstance(item, str) and item and "/" not in item for item in value):
        return "must be a list of event names (e.g. [ZChange, FirmwareData])"
    return None


MQTT_SCHEMA = {
    "enabled": bool,
    "url": Key(str, check=_url_problem),
    "client_id": Key(OPT_STR, check=_client_id),
    "username": TEXT,
    "password": Key(OPT_STR, check=_password),
    "tls": {"ca_certs": PATH, "certfile": PATH, "keyfile": PATH, "insecure": bool},
    "qos": Key(int, choices=(0, 1, 2)),
    "session_expiry": Key(int, min=0, max=SESSION_EXPIRY_MAX),
    "keepalive": Key(int, min=5, max=3600),
    "base_topic": Key(str, check=_topic_level_problem),
    "layouts": {"octoprint": bool, "zevents": bool},
    "octoprint": {
        "base_topic": Key(str, check=_topic_level_problem),
        "default_printer": TEXT,
        "retain_events": Key(list, check=_event_names),
        "temperature_threshold": Key(NUMBER, min=0, max=100),
    },
    "retain": bool,
    "homeassistant": {"discovery": bool, "prefix": Key(str, check=_topic_level_problem)},
    "max_pending": Key(int, min=100, max=10_000_000),
    "inflight": Key(int, min=1, max=65535),
    "reconnect_max": Key(NUMBER, min=0.5, max=3600),
    "commands": {"enabled": bool, "allowed": Key(list, check=_commands_problem)},
}


def _validate(config, section) -> list:
    problems = []
    if not section:
        return problems
    layouts = section.get("layouts") or {}
    if section.get("enabled") and not (layouts.get("octoprint") or layouts.get("zevents")):
        problems.append(config.error("at least one layout (octoprint, zevents) must be on", "mqtt", "layouts"))
    if (section.get("homeassistant") or {}).get("discovery") and not layouts.get("zevents", True):
        problems.append(config.error("Home Assistant discovery reads the zevents layout's state topics: turn "
                                     "layouts.zevents on or homeassistant.discovery off", "mqtt", "homeassistant",
                                     "discovery"))
    return problems


zconfig.register_section("mqtt", MQTT_SCHEMA, _validate)
