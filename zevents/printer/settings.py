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
    "abort_heatup_on_cancel": bool,
}
PARSER_SCHEMA = {
    "blocked_commands": Key(list, check=_command_names),
    "ignored_commands": Key(list, check=_command_names),
}

zconfig.register_section("printer", PRINTER_SCHEMA)
zconfig.register_section("parser", PARSER_SCHEMA)


# --- several printers on one node -------------------------------------------------------------------------------
# `printers:` is a list of printer sections (the keys of `printer:`), each with its own name.  Every item is merged
# over the `printer:` section (itself merged over the default), so what the printers share is written once.
# Without `printers:` the node has one printer, `printer:` itself, exactly as before.

DEFAULT_NAME = "printer"     # the header's printer when printer.name is null


def _check_printers(value):
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            return (index,), f"a printer is a mapping (name:, port:, ...), not {item!r}"
    return None


def _validate_printers(config, items) -> list:
    """Each item against the printer schema (file, line and key of each problem), then what only the list can
    break: a name per printer, unique, and command channels that are distinct."""
    if not items:
        return []
    problems = []
    for index, item in enumerate(items):
        problems.extend(zconfig._validate_schema(config, item, PRINTER_SCHEMA, ("printers", index)))
        if not item.get("name"):
            problems.append(config.error("each of several printers needs a name (it names the printer in every "
                                         "event header and in --printer)", "printers", index, *(
                                             ("name",) if "name" in item else ())))
    if problems:
        return problems
    seen_names, seen_endpoints = {}, {}
    for index, item in enumerate(items):
        name = item["name"]
        if name in seen_names:
            problems.append(config.error(f"printer name {name!r} is used twice (also printers[{seen_names[name]}]); "
                                         "names must be unique", "printers", index, "name"))
            continue
        seen_names[name] = index
        endpoint = _commands_endpoint(config, item, several=True)
        if endpoint in seen_endpoints:
            problems.append(config.error(f"command channel {endpoint} is also printers[{seen_endpoints[endpoint]}]'s;"
                                         " each printer needs its own", "printers", index, "commands"))
        else:
            seen_endpoints[endpoint] = index
            problem = zconfig.check_endpoint(endpoint)
            if problem:
                problems.append(config.error(problem, "printers", index, "name"))
    return problems


def _commands_endpoint(config, section: dict, several: bool) -> str:
    """A printer's command channel: its ``commands``, else ``printer.sock`` (one printer, as always) or
    ``printer-<name>.sock`` in the node's runtime directory (several)."""
    if section.get("commands"):
        return section["commands"]
    filename = f"printer-{section['name']}.sock" if several else "printer.sock"
    base = zconfig.runtime_dir() / config.node
    base.mkdir(mode=0o700, exist_ok=True)
    return f"ipc://{base}/{filename}"


class PrinterChoiceError(ValueError):
    """No such printer on this node, or several and none named."""


def printer_sections(config) -> list:
    """Every printer of the node: its effective section (``printer:`` merged under each ``printers:`` item), with
    ``name`` and ``commands`` resolved."""
    base = dict(config.get("printer") or {})
    items = config.get("printers")
    if not items:
        base["name"] = base.get("name") or DEFAULT_NAME
        base["commands"] = _commands_endpoint(config, base, several=False)
        return [base]
    sections = []
    for item in items:
        section = zconfig._merge(base, item)
        section["commands"] = _commands_endpoint(config, section, several=len(items) > 1)
        sections.append(section)
    return sections


def several_printers(config) -> bool:
    return len(config.get("printers") or ()) > 1


def printer_section(config, name: str | None = None) -> dict:
    """The section of the printer called ``name``; ``name`` may be left out only when the node has one printer.
    Raises PrinterChoiceError naming the printers otherwise."""
    sections = printer_sections(config)
    names = [section["name"] for section in sections]
    if name is None:
        if len(sections) == 1:
            return sections[0]
        raise PrinterChoiceError(f"this node has {len(sections)} printers: say which with --printer NAME "
                                 f"({', '.join(names)})")
    for section in sections:
        if section["name"] == name:
            return section
    raise PrinterChoiceError(f"no printer named {name!r} on this node (printers: {', '.join(names)})")


def printer_config(config, name: str | None = None):
    """The config as one printer sees it: ``printer:`` is that printer's effective section.  Everything that works
    on "the printer" (its service, its command channel, the CLI's requests) works on this view unchanged."""
    import copy

    section = printer_section(config, name)
    view = zconfig.Config(copy.copy(config.data), config.path, config.marks)
    view.data["printer"] = section
    if config.get("printers"):
        view.data["printers"] = [section]   # still one of a list (its own SD card folder), now the only one
    return view


def service_name(config, section: dict) -> str:
    """The node's name for a printer's process: ``printer`` for the only one, ``printer:NAME`` among several."""
    return f"printer:{section['name']}" if several_printers(config) else "printer"


zconfig.register_section("printers", Key(list, check=_check_printers), _validate_printers)
