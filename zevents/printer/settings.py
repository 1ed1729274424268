"""The printer's config sections (``printer:`` and ``parser:``), registered with :mod:`zevents.config`."""
import re

from zevents import config as zconfig
from zevents.config import NUMBER, OPT_STR, Key


def _check_name(value):
    if isinstance(value, str) and not _PRINTER_NAME.match(value):
        return (f"must be 1-64 characters without '/', '#', '+' or control characters (it names the printer in "
                f"every event header and topic), not {value!r}")
    return None


def _check_port(value):
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        return f"must be VIRTUAL, AUTO, a device path or a pyserial URL, not {value!r}"
    return None


def _check_baudrate(value):
    if isinstance(value, int) and 0 < value < 300:
        return f"must be 0 (auto) or a serial speed of at least 300, not {value}"
    return None


def _check_firmware(value):
    from zevents.printer.virtual.firmware import PROFILES  # only when set: its module is the firmware itself

    if isinstance(value, str) and value.lower() not in PROFILES:
        return f"must be one of {', '.join(PROFILES)}, not {value!r}"
    return None


def _check_scripts(value):
    for name, script in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name):
            return (name,), f"{name!r} is not a script name (e.g. afterPrintDone)"
        if not isinstance(script, str):
            return (name,), f"a script is G-code text (lines in one string), not {script!r}"
    return None


def _command_names(value):
    from zevents._parser._rules import MAX_SUPPRESSED, command_key

    for index, item in enumerate(value):
        try:
            command_key(item)
        except ValueError as exc:
            return (index,), str(exc)
    if len(value) > MAX_SUPPRESSED:
        return f"at most {MAX_SUPPRESSED} commands, not {len(value)}"
    return None


_PRINTER_NAME = re.compile(r"[^/#+\x00-\x1f\x7f]{1,64}\Z")
# The link's window and retries are counts of commands; its timeout is how long a silent printer is waited for.
PRINTER_SCHEMA = {
    "name": Key(OPT_STR, check=_check_name),
    "port": Key(OPT_STR, check=_check_port),
    "baudrate": Key(int, min=0, max=4_000_000, check=_check_baudrate),
    "commands": zconfig.ENDPOINT,
    "allow_bus_commands": bool,
    "timeout": Key(NUMBER, above=0, max=3600),
    "window": Key(int, min=1, max=64),
    "retries": Key(int, min=0, max=100),
    "virtual": {
        "firmware": Key(str, check=_check_firmware),
        "speed": Key(NUMBER, min=0, max=1_000_000),     # 0: instant
        "tools": Key((int, type(None)), min=1, max=8),   # null: the printer profile's extruders
    },
    "scripts": Key(dict, check=_check_scripts),
    "profile": zconfig.TEXT,                         # a printer profile id (zevents profile ls)
    # the longest command sent (the firmware's input buffer less room for line number and checksum)
    "max_line": Key(int, min=16, max=1 << 20),
    "reconnect": bool,
}
PARSER_SCHEMA = {
    "blocked_commands": Key(list, check=_command_names),
    "ignored_commands": Key(list, check=_command_names),
}

zconfig.register_section("printer", PRINTER_SCHEMA)
zconfig.register_section("parser", PARSER_SCHEMA)
