"""The printer's config sections (``printer:`` and ``parser:``), registered with :mod:`zevents.config`."""
from zevents import config as zconfig
from zevents.config import NUMBER, OPT_STR, Key

PRINTER_SCHEMA = {
    "name": OPT_STR, "port": OPT_STR, "baudrate": int, "commands": OPT_STR, "allow_bus_commands": bool,
    "timeout": NUMBER, "window": int, "retries": int,
    "virtual": {"firmware": str, "speed": NUMBER, "tools": int},
    "scripts": dict,
    # link11: the longest command sent (the firmware's input buffer less room for line number and checksum)
    "max_line": Key(int, min=16, max=1 << 20),
    "reconnect": bool,
}
PARSER_SCHEMA = {"blocked_commands": list, "ignored_commands": list}

zconfig.register_section("printer", PRINTER_SCHEMA)
zconfig.register_section("parser", PARSER_SCHEMA)
