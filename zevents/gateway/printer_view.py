"""What the gateway knows of the printer: the state, the selected file, the job's progress and the temperatures,
folded from the bus's events (seeded from the broker's last-value snapshot at start), in OctoPrint's shapes.

Owns the translation from zevents' events to ``GET /api/printer``, ``GET /api/job``, ``GET /api/connection`` and
the push socket's ``history``/``current`` payloads.  It keeps nothing the bus does not say; what it folds is the
latest value of each event, as the broker's last-value cache does.
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

#: OctoPrint's state strings by state id (the printer link publishes both; offline is "Offline").
OPERATIONAL = {"OPERATIONAL", "PRINTING", "STARTING", "PAUSED", "PAUSING", "RESUMING", "CANCELLING", "FINISHING",
               "TRANSFERING_FILE"}
PRINTING = {"PRINTING", "STARTING", "PAUSING", "RESUMING", "CANCELLING", "FINISHING"}
#: OctoPrint's closedOrError: no connection (offline) or a closed/errored one; still connecting is neither.
CLOSED_OR_ERROR = {"OFFLINE", "CLOSED", "ERROR", "CLOSED_WITH_ERROR"}
HISTORY_SECONDS = 30 * 60


class PrinterView:
    def __init__(self, uploads: str | os.PathLike | None = None, heated_bed: bool = True,
                 heated_chamber: bool = False):
        self.uploads = Path(uploads).resolve() if uploads else None
        self.heated_bed = heated_bed
        self.heated_chamber = heated_chamber
        self.state_id = "OFFLINE"
        self.state_string = "Offline"
        self.error = ""
        self.port = None
        self.baudrate = None
        self.file: dict | None = None
        self.progress: dict = {}
        self.printing_since: float | None = None
        self.temperatures: dict = {}
        self.history: deque = deque(maxlen=HISTORY_SECONDS // 2)
        self.current_z = None
        self.markings: deque = deque(maxlen=100)
        self.estimated: float | None = None
        self.changed = time.monotonic()

    # --- folding events ------------------------------------------------------------------------------------------

    def _storage_path(self, path: str | None) -> str | None:
        if path and self.uploads is not None and os.path.isabs(path):
            try:
                return str(Path(path).resolve().relative_to(self.uploads))
            except ValueError:
                return path
        return path

    def apply(self, name: str, payload: dict) -> bool:
        """Folds one event; True when it changed what the API shows."""
        payload = payload or {}
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            return False
        handler(payload)
        self.changed = time.monotonic()
        return True

    def _on_PrinterStateChanged(self, payload):
        self.state_id = payload.get("state_id") or self.state_id
        self.state_string = payload.get("state_string") or self.state_id.title()
        if self.state_id not in ("ERROR", "CLOSED_WITH_ERROR"):
            self.error = ""
        if self.state_id in ("OFFLINE", "CLOSED", "CLOSED_WITH_ERROR"):
            self.temperatures = {}

    def _on_Connected(self, payload):
        self.port = payload.get("port")
        self.baudrate = payload.get("baudrate")

    def _on_Disconnected(self, payload):
        self.port = self.baudrate = None
        self.state_id, self.state_string = "OFFLINE", "Offline"

    def _on_Error(self, payload):
        self.error = str(payload.get("error") or "")

    def _on_Temperature(self, payload):
        readings = {}
        for tool, value in sorted((payload.get("tools") or {}).items()):
            index = tool[1:] or "0"
            readings[f"tool{index}"] = _reading(value)
        if payload.get("bed") is not None:
            readings["bed"] = _reading(payload["bed"])
        if payload.get("chamber") is not None:
            readings["chamber"] = _reading(payload["chamber"])
        self.temperatures = readings
        self.history.append({"time": int(time.time()), **{k: {"actual": v["actual"], "target": v["target"]}
                                                         for k, v in readings.items()}})

    def _on_FileSelected(self, payload):
        self.file = {"name": payload.get("name"), "path": self._storage_path(payload.get("path")),
                     "display": payload.get("name"), "origin": payload.get("origin") or "local",
                     "size": payload.get("size"), "date": payload.get("date")}
        self.progress = {}
        self.estimated = None

    def _on_FileDeselected(self, payload):
        self.file = None
        self.progress = {}

    def _on_PrintStarted(self, payload):
        self._on_FileSelected(payload)
        self.printing_since = time.time()
        self.estimated = payload.get("estimatedPrintTime")
        self.progress = {"completion": 0.0, "filepos": 0, "printTime": 0, "printTimeLeft": self.estimated}

    def _on_PrintProgress(self, payload):
        self.progress = {"completion": payload.get("progress"), "filepos": payload.get("fileposition"),
                         "printTime": int(payload["time"]) if payload.get("time") is not None else None,
                         "printTimeLeft": payload.get("printTimeLeft")}

    def _on_PrintDone(self, payload):
        self.progress = dict(self.progress, completion=100.0, printTimeLeft=0)
        self.printing_since = None

    def _on_PrintFailed(self, payload):
        self.printing_since = None

    def _on_ZChange(self, payload):
        self.current_z = payload.get("new")

    def _on_ChartMarked(self, payload):
        self.markings.append({"type": payload.get("type"), "label": payload.get("label"),
                              "time": payload.get("time")})

    # --- OctoPrint's shapes --------------------------------------------------------------------------------------

    @property
    def operational(self) -> bool:
        return self.state_id in OPERATIONAL

    def flags(self) -> dict:
        state = self.state_id
        error = state in ("ERROR", "CLOSED_WITH_ERROR")
        return {"operational": self.operational, "printing": state in PRINTING,
                "cancelling": state == "CANCELLING", "pausing": state == "PAUSING", "resuming": state == "RESUMING",
                "finishing": state == "FINISHING", "closedOrError": state in CLOSED_OR_ERROR,
                "error": error, "paused": state == "PAUSED", "ready": state == "OPERATIONAL",
                "sdReady": self.operational}

    def state(self) -> dict:
        return {"text": self.state_string, "flags": self.flags(), "error": self.error}

    def temperature(self, history: bool = False, limit: int = 300) -> dict:
        readings = {k: dict(v) for k, v in self.temperatures.items()
                    if k.startswith("tool") or (k == "bed" and self.heated_bed)
                    or (k == "chamber" and self.heated_chamber)}
        if history:
            readings["history"] = list(self.history)[-limit:] if limit > 0 else []
        return readings

    def job(self) -> dict:
        file = dict(self.file) if self.file else {"name": None, "path": None, "display": None, "origin": None,
                                                   "size": None, "date": None}
        completion = self.progress.get("completion")
        return {"job": {"file": file, "estimatedPrintTime": self.estimated, "averagePrintTime": None,
                        "lastPrintTime": None, "filament": None, "user": None},
                "progress": {"completion": completion, "filepos": self.progress.get("filepos"),
                             "printTime": self.progress.get("printTime"),
                             "printTimeLeft": self.progress.get("printTimeLeft"),
                             "printTimeLeftOrigin": "analysis" if self.progress.get("printTimeLeft") is not None
                             else None},
                "state": self.state_string}

    def snapshot(self, full: bool) -> dict:
        """The push socket's ``history`` (full) or ``current`` payload."""
        job = self.job()
        data = {"state": self.state(), "job": job["job"], "progress": job["progress"], "currentZ": self.current_z,
                "offsets": {}, "resends": {"count": 0, "transmitted": 0, "ratio": 0},
                "temps": list(self.history) if full else list(self.history)[-1:],
                "logs": [], "messages": [], "markings": list(self.markings), "serverTime": time.time()}
        if not full:
            data["busyFiles"] = [{"origin": self.file["origin"], "path": self.file["path"]}] \
                if self.file and self.state_id in PRINTING else []
        return data


def _reading(value) -> dict:
    if isinstance(value, (list, tuple)):
        actual, target = (list(value) + [None, None])[:2]
    elif isinstance(value, dict):
        actual, target = value.get("actual"), value.get("target")
    else:
        actual, target = value, None
    return {"actual": actual, "target": target, "offset": 0}
