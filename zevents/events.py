"""The event catalogue: every event name, its wire group and its payload keys.

The catalogue is OctoPrint's (``shared/spec/events.yaml``, checked by ``tests/test_events.py``) plus the events
zevents adds (layer changes, hook results, heartbeats, print progress, temperatures).  Names that are not in the
catalogue are *custom* events (OctoPrint plugins register those) and travel in the ``custom`` group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: Groups as they appear in the first part of a topic, in catalogue order, then the groups zevents adds.
CATALOGUE_GROUPS = ("server", "comm", "file", "print", "gcode", "timelapse", "slicing", "settings", "profile")
EXTRA_GROUPS = ("sys", "hook", "custom")
GROUPS = CATALOGUE_GROUPS + EXTRA_GROUPS

#: The section names of events.yaml (and of OctoPrint's documentation) for each wire group.
SPEC_SECTIONS = {
    "server": "server",
    "printer_communication": "comm",
    "file_handling": "file",
    "printing": "print",
    "gcode_processing": "gcode",
    "timelapses": "timelapse",
    "slicing": "slicing",
    "settings": "settings",
    "printer_profile": "profile",
}

_JOB = ("name", "path", "origin", "size", "owner")
_FILE_OP = ("storage", "path", "name", "type", "operation")
_SLICE = ("slicer", "stl", "stl_location", "gcode", "gcode_location")
_MOVIE = ("gcode", "movie", "movie_basename")
_HOOK = ("subscription", "event", "argv", "returncode", "duration", "stderr")

# (group, name, payload keys, produced by zevents in addition to OctoPrint's catalogue)
_TABLE = [
    ("server", "Startup", ()),
    ("server", "Shutdown", ()),
    ("server", "ClientOpened", ("remoteAddress",)),
    ("server", "ClientAuthed", ("remoteAddress", "username")),
    ("server", "ClientClosed", ("remoteAddress",)),
    ("server", "UserLoggedIn", ("username",)),
    ("server", "UserLoggedOut", ("username",)),
    ("server", "ConnectivityChanged", ("old", "new")),
    ("comm", "Connecting", ()),
    ("comm", "Connected", ("port", "baudrate")),
    ("comm", "Disconnecting", ()),
    ("comm", "Disconnected", ()),
    ("comm", "Error", ("error", "reason", "consequence", "faq", "logs")),
    ("comm", "PrinterStateChanged", ("state_id", "state_string")),
    ("file", "Upload", ("name", "path", "target", "select", "print", "effective_select", "effective_print",
                        "userdata")),
    ("file", "FileAdded", _FILE_OP),
    ("file", "FileRemoved", _FILE_OP),
    ("file", "FileMoved", ("storage", "source_path", "source_name", "source_type", "destination_path",
                           "destination_name", "destination_type")),
    ("file", "FolderAdded", ("storage", "path", "name")),
    ("file", "FolderRemoved", ("storage", "path", "name")),
    ("file", "FolderMoved", ("storage", "source_path", "source_name", "destination_path", "destination_name")),
    ("file", "UpdatedFiles", ("type",)),
    ("file", "MetadataAnalysisStarted", ("name", "path", "origin", "type")),
    ("file", "MetadataAnalysisFinished", ("name", "path", "origin", "result")),
    ("file", "FileSelected", ("name", "path", "origin")),
    ("file", "FileDeselected", ()),
    ("file", "TransferStarted", ("local", "remote")),
    ("file", "TransferDone", ("time", "local", "remote")),
    ("print", "PrintStarted", _JOB + ("user",)),
    ("print", "PrintFailed", _JOB + ("time", "reason")),
    ("print", "PrintDone", _JOB + ("time",)),
    ("print", "PrintCancelling", _JOB + ("user", "firmwareError")),
    ("print", "PrintCancelled", _JOB + ("time", "user", "position", "fileposition", "progress")),
    ("print", "PrintPaused", _JOB + ("user", "position", "fileposition", "progress")),
    ("print", "PrintResumed", _JOB + ("user",)),
    ("print", "GcodeScript${ScriptName}Running", _JOB + ("time",)),
    ("print", "GcodeScript${ScriptName}Finished", _JOB + ("time",)),
    ("print", "ChartMarked", ("type", "label", "time")),
    ("gcode", "PowerOn", ()),
    ("gcode", "PowerOff", ()),
    ("gcode", "Home", ()),
    ("gcode", "ZChange", ("new", "old")),
    ("gcode", "Dwell", ()),
    ("gcode", "Waiting", ()),
    ("gcode", "Cooling", ()),
    ("gcode", "Alert", ()),
    ("gcode", "Conveyor", ()),
    ("gcode", "Eject", ()),
    ("gcode", "EStop", ()),
    ("gcode", "FilamentChange", ()),
    ("gcode", "PositionUpdate", ("x", "y", "z", "e", "t", "f")),
    ("gcode", "ToolChange", ("old", "new")),
    ("gcode", "CommandSuppressed", ("command", "message", "severity")),
    ("gcode", "InvalidToolReported", ("tool", "fallback")),
    ("timelapse", "CaptureStart", ("file",)),
    ("timelapse", "CaptureDone", ("file",)),
    ("timelapse", "CaptureFailed", ("file", "error")),
    ("timelapse", "MovieRendering", _MOVIE),
    ("timelapse", "MovieDone", _MOVIE),
    ("timelapse", "MovieFailed", _MOVIE + ("returncode", "reason")),
    ("slicing", "SlicingStarted", _SLICE + ("progressAvailable",)),
    ("slicing", "SlicingDone", _SLICE + ("time",)),
    ("slicing", "SlicingCancelled", _SLICE),
    ("slicing", "SlicingFailed", _SLICE + ("reason",)),
    ("slicing", "SlicingProfileAdded", ("slicer", "profile")),
    ("slicing", "SlicingProfileModified", ("slicer", "profile")),
    ("slicing", "SlicingProfileDeleted", ("slicer", "profile")),
    ("settings", "SettingsUpdated", ()),
    ("profile", "PrinterProfileModified", ("identifier",)),
]

# Events zevents adds.  They are not in OctoPrint's catalogue, so they are listed apart.
_EXTENSIONS = [
    ("gcode", "LayerChanged", ("layer", "z", "old_z", "total")),
    ("print", "PrintProgress", ("name", "path", "origin", "progress", "fileposition", "time")),
    ("comm", "Temperature", ("tools", "bed", "chamber")),
    ("timelapse", "MovieRenderProgress", ("movie", "progress")),
    ("sys", "Heartbeat", ("streams", "epoch", "uptime", "interval")),
    ("sys", "ServiceStarted", ("service", "pid")),
    ("sys", "ServiceRestarted", ("service", "pid", "restarts", "returncode", "backoff")),
    ("sys", "ServiceFailed", ("service", "returncode", "restarts")),
    ("file", "MetadataStatisticsUpdated", ("storage", "path")),   # OctoPrint fires it (log_print), undocumented
    ("file", "WatchedFileFailed", ("storage", "path", "name", "failed", "reason")),
    ("hook", "HookFinished", _HOOK),
    ("hook", "HookFailed", _HOOK),
    ("hook", "HookTimedOut", _HOOK),
    # OctoPrint fires these two from its printer-profile API too (printer/profile.py), though its catalogue omits them.
    ("slicing", "SlicingProgress", _SLICE + ("progress",)),
    ("profile", "PrinterProfileAdded", ("identifier",)),
    ("profile", "PrinterProfileDeleted", ("identifier",)),
]

#: Names OctoPrint's code uses that differ from its documentation; accepted wherever users name events.
ALIASES = {"Dwelling": "Dwell"}

SCRIPT_TEMPLATES = ("GcodeScript${ScriptName}Running", "GcodeScript${ScriptName}Finished")
_SCRIPT_RE = re.compile(r"GcodeScript([A-Za-z0-9_]+)(Running|Finished)\Z")


@dataclass(frozen=True)
class EventSpec:
    name: str
    group: str
    payload: tuple
    extension: bool = False

    @property
    def topic(self) -> str:
        return f"{self.group}/{self.name}"


CATALOGUE = {name: EventSpec(name, group, keys) for group, name, keys in _TABLE}
EXTENSIONS = {name: EventSpec(name, group, keys, True) for group, name, keys in _EXTENSIONS}
EVENTS = {**CATALOGUE, **EXTENSIONS}


def canonical(name: str) -> str:
    """The catalogue spelling of a user-given event name (``Dwelling`` → ``Dwell``)."""
    return ALIASES.get(name, name)


def lookup(name: str) -> EventSpec | None:
    """The spec of a known event (catalogue, extension or a concrete GcodeScript name), or None for custom."""
    name = canonical(name)
    spec = EVENTS.get(name)
    if spec is not None:
        return spec
    match = _SCRIPT_RE.match(name)
    if match and name not in SCRIPT_TEMPLATES:
        template = EVENTS["GcodeScript${ScriptName}" + match.group(2)]
        return EventSpec(name, template.group, template.payload)
    return None


def is_known(name: str) -> bool:
    return lookup(name) is not None


def group_of(name: str) -> str:
    """The wire group an event travels in; names outside the catalogue are ``custom``."""
    spec = lookup(name)
    return spec.group if spec is not None else "custom"


def topic_of(name: str) -> str:
    name = canonical(name)
    return f"{group_of(name)}/{name}"


def script_event(script: str, phase: str) -> str:
    """``script_event("afterPrintDone", "Running")`` → ``GcodeScriptAfterPrintDoneRunning`` (OctoPrint's spelling)."""
    if phase not in ("Running", "Finished"):
        raise ValueError(f"phase must be Running or Finished, not {phase!r}")
    return f"GcodeScript{script[:1].upper()}{script[1:]}{phase}"


def complete_payload(name: str, payload: dict | None) -> dict:
    """The payload with every catalogue key present (a key with no value is None); extra keys are kept."""
    spec = lookup(name)
    payload = dict(payload or {})
    if spec is not None:
        for key in spec.payload:
            payload.setdefault(key, None)
    return payload


def suggest(name: str) -> str | None:
    """The closest known event name, for "did you mean" messages."""
    import difflib

    names = [n for n in EVENTS if n not in SCRIPT_TEMPLATES] + list(ALIASES)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if not close:
        lowered = {n.lower(): n for n in names}
        return lowered.get(name.lower())
    return close[0]
