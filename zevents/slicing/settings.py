"""The ``slicing:`` config section, registered with :mod:`zevents.config`."""
from zevents import config as zconfig
from zevents.config import ENDPOINT, NUMBER, OPT_STR, PATH, Key

_PROGRAM = {"path": PATH}

SLICING_SCHEMA = {
    "enabled": bool,
    "commands": ENDPOINT,
    "default_slicer": Key(OPT_STR, choices=(None, "prusaslicer", "slic3r", "curaengine")),
    "timeout": Key(NUMBER, min=1, max=86400),
    "nice": Key(int, min=0, max=19),
    "concurrency": Key(int, min=1, max=64),
    "prusaslicer": dict(_PROGRAM),
    "slic3r": dict(_PROGRAM),
    "curaengine": {**_PROGRAM, "definitions": PATH},
}

zconfig.register_section("slicing", SLICING_SCHEMA)
