"""The ``files:`` config section, registered with :mod:`zevents.config`."""
from zevents import config as zconfig
from zevents.config import ENDPOINT, NUMBER, PATH, Key

FILES_SCHEMA = {
    "enabled": bool,
    "uploads": PATH,
    "watch": bool,
    "watched": PATH,
    "poll_watched": bool,
    "poll_interval": Key(NUMBER, min=0.05, max=3600),
    "stable_time": Key(NUMBER, min=0.1, max=3600),
    "commands": ENDPOINT,
    "analysis": {
        "run_at": Key(str, choices=("idle", "always", "never")),
        "timeout": Key(NUMBER, min=1, max=86400),
    },
}

zconfig.register_section("files", FILES_SCHEMA)
