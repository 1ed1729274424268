"""LocalStorage on real folders: what the start-up repair does with what a crash can leave behind."""
from __future__ import annotations

import hashlib
import json

from zevents.files.storage import METADATA, TEMP_PREFIX, LocalStorage


def test_reconcile_repairs_what_a_crash_leaves(tmp_path):
    root = tmp_path / "uploads"
    (root / f"{TEMP_PREFIX}copy" / "sub").mkdir(parents=True)          # an interrupted folder copy
    (root / f"{TEMP_PREFIX}copy" / "sub" / "a.gcode").write_text("G28\n")
    (root / f"{TEMP_PREFIX}upload").write_text("half an upl")           # an interrupted upload
    (root / "f").mkdir()
    (root / "f" / "kept.gcode").write_text("G1 X1\n")                  # its entry was never written
    (root / "f" / "changed.gcode").write_text("G1 X2\n")               # changed behind the service's back
    (root / "f" / METADATA).write_text(json.dumps({
        "gone.gcode": {"hash": "x"},                                    # its file was removed, not its entry
        "changed.gcode": {"hash": "old", "size": 1, "mtime": 1.0, "analysis": {"old": True}}}))
    storage = LocalStorage(root)
    backlog = storage.reconcile()
    assert sorted(p.name for p in root.iterdir()) == ["f"]
    meta = json.loads((root / "f" / METADATA).read_text())
    assert sorted(meta) == ["changed.gcode", "kept.gcode"]
    assert meta["changed.gcode"]["hash"] == hashlib.sha1(b"G1 X2\n").hexdigest()
    assert "analysis" not in meta["changed.gcode"]                      # other bytes: the old analysis is gone
    assert sorted(backlog) == ["f/changed.gcode", "f/kept.gcode"]
    assert LocalStorage(root).reconcile() == sorted(backlog)           # a second start changes nothing more
