"""The ``files:`` config section, registered with :mod:`zevents.config`."""
from zevents import config as zconfig
from zevents.config import NUMBER, OPT_STR, Key

FILES_SCHEMA = {
    "enabled": bool,
    "uploads": OPT_STR,
    "watch": bool,
    "watched": OPT_STR,
    "poll_watched": bool,
    "poll_interval": Key(NUMBER, min=0.05, max=3600),
    "stable_time": Key(NUMBER, min=0.1, max=3600),
    "commands": OPT_STR,
    "analysis": {
        "run_at": Key(str, choices=("idle", "always", "never")),
        "timeout": Key(NUMBER, min=1, max=86400),
    },
}

zconfig.register_section("files", FILES_SCHEMA)
