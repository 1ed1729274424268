"""The ``gateway:`` config section and OctoPrint's ``server.onlineCheck``, registered with :mod:`zevents.config`."""
from zevents import config as zconfig
from zevents.config import check_text as config_text
from zevents.config import ENDPOINT, NUMBER, TEXT, URL, Key


def _listen(value) -> str | None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        return f"must be HOST:PORT (e.g. 127.0.0.1:5000), not {value!r}"
    return None


GATEWAY_SCHEMA = {
    "enabled": bool,
    "listen": Key(str, check=_listen),
    "commands": ENDPOINT,
    "max_upload": Key(int, min=1),
    "cors": bool,
    "trust_forwarded": bool,
    "sd_support": bool,
    "rate_limit": bool,
    "session_stale_after": Key(NUMBER, min=10, max=86400 * 30),
    "socket_heartbeat": Key(NUMBER, min=1, max=3600),
    "webcam": {"stream": URL, "snapshot": URL},
}

SERVER_SCHEMA = {
    "onlineCheck": {
        "enabled": (bool, type(None)),
        "interval": Key(NUMBER, min=1, max=86400 * 7),
        "host": Key(str, check=config_text),
        "port": Key(int, min=1, max=65535),
        "name": TEXT,
    },
}

zconfig.register_section("gateway", GATEWAY_SCHEMA)
zconfig.register_section("server", SERVER_SCHEMA)
