"""LayerChanged the slicer's way: a job whose file carries layer markers publishes one LayerChanged per marker
(layer from 1, z the layer's height, total the file's count), through the same MarkerLayers the job streamer
uses; the parser's height heuristic stays for streams without markers and is within one layer of the markers'
count when the markers are stripped from a sliced file.  Corpus files are measured where ../shared is present."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import SHARED
from test_jobs import Bench
from zevents.parser import Parser
from zevents.printer.scan import MARKERS, MarkerLayers, scan_file

DATA = Path(__file__).parent / "data"
EXCERPTS = sorted((DATA / "parser").glob("*.gcode")) + sorted((DATA / "printer").glob("*.gcode"))
CORPUS = sorted((SHARED / "corpus").glob("*.gcode")) if (SHARED / "corpus").is_dir() else []
_ANY_MARKER = re.compile(b"|".join(MARKERS.values()))


def marker_count(path: Path) -> int:
    """Markers counted the plain way, line by line (the scan reads chunks with regular expressions)."""
    return sum(1 for raw in path.read_bytes().splitlines() if _ANY_MARKER.match(raw))


def streamed_layers(path: Path, strip_markers: bool = False) -> list:
    """The LayerChanged payloads a job streaming ``path`` publishes (the link's parser.sent per line, rewritten by
    MarkerLayers when the file has markers); with ``strip_markers``, of the file without its marker lines."""
    lines = path.read_bytes().splitlines()
    if strip_markers:
        lines = [raw for raw in lines if not _ANY_MARKER.match(raw)]
    scan = scan_file(str(path), 0)
    layers = MarkerLayers(scan.marker_form, scan.layers) if scan.marker_form and not strip_markers else None
    parser = Parser(None)
    found_layers = []
    for raw in lines:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        found = parser.sent(text)
        if layers is not None:
            found = layers.events(text, found, parser)
        found_layers.extend(event.payload for event in found if event.name == "LayerChanged")
    return found_layers


def layer_table(paths) -> list:
    """(file, markers, marker-path count, heuristic count with the markers stripped) for each sliced file."""
    rows = []
    for path in paths:
        markers = marker_count(path)
        if not markers:
            continue
        rows.append((path.name, markers, len(streamed_layers(path)), len(streamed_layers(path, strip_markers=True))))
    return rows


@pytest.mark.parametrize("path", EXCERPTS + CORPUS, ids=lambda p: p.name)
def test_marker_layers_are_the_markers_and_the_heuristic_is_within_one(path):
    markers = marker_count(path)
    if not markers:
        pytest.skip("no layer markers (FullControl, Slic3r 1.3, ArcWelder output): the heuristic only")
    scan = scan_file(str(path), 0)
    assert scan.layers == markers
    layers = streamed_layers(path)
    assert [layer["layer"] for layer in layers] == list(range(1, markers + 1))
    assert all(layer["total"] == markers for layer in layers)
    assert [layer["old_z"] for layer in layers[1:]] == [layer["z"] for layer in layers[:-1]]
    if len(path.read_bytes()) > 200_000:  # whole files, not the excerpts: the heuristic over the whole print
        assert abs(len(streamed_layers(path, strip_markers=True)) - markers) <= 1


def test_a_prusaslicer_mmu_file_with_a_purge_line_counts_the_slicers_layers():
    """The MMU2S start script purges at Z 0.4, 0.3 then 0.2 before the first layer: the markers say 3 layers, and
    the heuristic, which took the purge for 3 more, now counts extruding lower than the current layer as no new
    layer."""
    path = DATA / "parser" / "sliced_cube20_prusaslicer250_mmu2s_toolchange.lines1-1100+39350-end.gcode"
    heuristic = streamed_layers(path, strip_markers=True)
    layers = streamed_layers(path)
    assert [(layer["layer"], layer["z"]) for layer in heuristic] == [(1, 0.4), (2, 0.4), (3, 0.6)]
    assert [(layer["layer"], layer["z"], layer["total"]) for layer in layers] == [(1, 0.2, 3), (2, 0.4, 3), (3, 0.6, 3)]


def test_cura_layers_take_the_height_of_their_first_extrusion():
    path = DATA / "parser" / "gcodepreview_puzzle_cura231.lines1-400.gcode"
    assert [(layer["layer"], layer["z"], layer["total"]) for layer in streamed_layers(path)] == [(1, 0.2, 1)]


def test_a_print_publishes_marker_layers_with_their_total(tmp_path):
    """End to end through the job streamer and the virtual printer: the MMU excerpt with its purge line."""
    path = DATA / "parser" / "sliced_cube20_prusaslicer250_mmu2s_toolchange.lines1-1100+39350-end.gcode"
    bench = Bench(tmp_path, tools=5)
    try:
        bench.jobs.start(str(path))
        bench.wait("PrintDone", timeout=120)
        published = [e[1] for e in bench.recorder.named("LayerChanged")]
        assert all(e[2] == "job" for e in bench.recorder.named("LayerChanged"))
        assert [(p["layer"], p["z"], p["total"]) for p in published] == [(1, 0.2, 3), (2, 0.4, 3), (3, 0.6, 3)]
    finally:
        bench.close()


def test_a_stream_without_markers_keeps_the_heuristic(tmp_path):
    bench = Bench(tmp_path)
    try:
        bench.link.send(["G28", "G1 Z0.2 F600", "G1 X10 E1", "G1 Z0.4", "G1 X20 E2"])
        assert bench.link.wait_idle(15)
        published = [e[1] for e in bench.recorder.named("LayerChanged")]
        assert [(p["layer"], p["z"], p["total"]) for p in published] == [(1, 0.2, None), (2, 0.4, None)]
    finally:
        bench.close()
