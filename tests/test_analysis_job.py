"""The print job uses the metadata analysis: PrintStarted.estimatedPrintTime, PrintProgress.printTimeLeft from the
byte offset reached (the per-offset time table), LayerChanged.total for a file without layer markers; a real
virtual printer on a pty, the real link and parser."""
from __future__ import annotations

import re

import pytest

from test_jobs import CUBE, bench  # noqa: F401  (bench: the virtual printer, link and jobs fixture)
from zevents.files import analysis


def test_print_started_and_progress_carry_the_estimate(bench):
    b = bench()
    b.jobs.start(str(CUBE))
    b.wait("PrintDone", timeout=60)
    expected = analysis.analyse_file(CUBE)
    started = b.recorder.wait("PrintStarted")[1]
    assert started["estimatedPrintTime"] == expected["estimatedPrintTime"] > 0
    progress = [e[1] for e in b.recorder.named("PrintProgress")]
    assert [p["progress"] for p in progress] == list(range(0, 101))
    lefts = [p["printTimeLeft"] for p in progress]
    assert lefts == sorted(lefts, reverse=True)
    assert lefts[-1] == 0.0
    for payload in progress:
        assert payload["printTimeLeft"] == analysis.PrintEstimate(expected).time_left(payload["fileposition"])
    # mid-print the time left is that of the rest of the file, not a share of the total
    middle = progress[50]
    assert 0 < middle["printTimeLeft"] < expected["estimatedPrintTime"]
    # a file with layer markers: LayerChanged follows the markers, and its total is theirs, not the analysis's
    layers = [e[1] for e in b.recorder.named("LayerChanged")]
    assert layers and {layer["total"] for layer in layers} == {len(layers)}


def test_layer_total_from_the_analysis_when_the_file_has_no_markers(bench, tmp_path):
    unmarked = tmp_path / "unmarked.gcode"
    unmarked.write_bytes(re.sub(rb"(?m)^;LAYER_CHANGE\r?\n", b"", CUBE.read_bytes()))
    b = bench()
    b.jobs.start(str(unmarked))
    b.wait("PrintDone", timeout=60)
    layers = [e[1] for e in b.recorder.named("LayerChanged")]
    assert len(layers) > 2
    assert [payload["total"] for payload in layers] == [len(layers)] * len(layers)
    assert analysis.analyse_file(unmarked)["layers"]["source"] == "z"


def test_a_job_goes_on_without_an_estimate_when_the_file_cannot_be_analysed(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis, "analyse_file", lambda *a, **k: (_ for _ in ()).throw(analysis.AnalysisError("x")))
    analysis._ESTIMATES.clear()
    b = bench()
    b.jobs.start(str(CUBE))
    b.wait("PrintDone", timeout=60)
    assert b.recorder.wait("PrintStarted")[1]["estimatedPrintTime"] is None
    assert {e[1]["printTimeLeft"] for e in b.recorder.named("PrintProgress")} == {None}
