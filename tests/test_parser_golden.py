"""Golden files: real sliced G-code with its events and final state pinned, for every chunking, both parsers.

The excerpts in tests/data/parser/ are cut from ../shared/corpus (sources in tests/data/parser/README.md); the
``.events.json`` beside each pins what the parser must say.  After a deliberate change of the rules, regenerate
them with ``ZEVENTS_REGEN_GOLDEN=1 pytest tests/test_parser_golden.py`` and review the diff.  The whole corpus,
when ../shared is there, must give the same events and state from both implementations.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zevents.parser import CParser, FORCED_PURE, BinaryGcodeError, PyParser

DATA = Path(__file__).resolve().parent / "data" / "parser"
SHARED = Path(os.environ.get("ZEVENTS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CORPUS = SHARED / "corpus"
GOLDEN = sorted(DATA.glob("*.gcode"))
CHUNK_SIZES = [1, 2, 3, 7, 64, 4096]
REGENERATE = os.environ.get("ZEVENTS_REGEN_GOLDEN") == "1"




def run(parser_class, data: bytes, chunk: int | None = None):
    parser = parser_class()
    events = []
    if chunk is None:
        events += parser.feed_sent(data)
    else:
        for start in range(0, len(data), chunk):
            events += parser.feed_sent(data[start:start + chunk])
    events += parser.flush()
    return events, parser.state


def as_json(events, state) -> dict:
    """Plain JSON types, as the golden files hold them (tuples become lists)."""
    return json.loads(json.dumps({"events": [event.as_dict() for event in events], "state": state.as_dict()}))


def golden_of(path: Path) -> dict:
    target = path.with_suffix(".events.json")
    if REGENERATE:
        pinned = as_json(*run(PyParser, path.read_bytes()))
        target.write_text('{"state": %s,\n "events": [\n  %s\n]}\n' % (
            json.dumps(pinned["state"]), ",\n  ".join(json.dumps(event) for event in pinned["events"])))
    if not target.exists():
        pytest.fail(f"{target.name} is missing: run with ZEVENTS_REGEN_GOLDEN=1 and review it")
    return json.loads(target.read_text())


def test_the_project_carries_its_golden_files():
    assert len(GOLDEN) >= 6
    assert sum(path.stat().st_size for path in GOLDEN) < 400_000  # small copies only
    for path in GOLDEN:
        assert path.name.startswith(("sliced_", "gcodepreview_")), f"{path.name}: only copyable sources"
        assert path.with_suffix(".events.json").exists(), path.name


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("path", GOLDEN, ids=[path.name.split(".")[0] for path in GOLDEN])
def test_golden_events_for_every_chunking(Parser, path, chunk):
    expected = golden_of(path)
    assert as_json(*run(Parser, path.read_bytes(), chunk)) == expected


def test_golden_files_say_something_real():
    """The pinned outputs cover what the files hold: layers, z-hops, tool changes, arcs, homing."""
    seen = {}
    for path in GOLDEN:
        golden = golden_of(path)
        for event in golden["events"]:
            seen.setdefault(event["name"], set()).add(path.name)
    for name in ("ZChange", "LayerChanged", "Home", "ToolChange", "Dwell", "FilamentChange"):
        assert name in seen, name
    mmu = golden_of(DATA / "sliced_cube20_prusaslicer250_mmu2s_toolchange.lines1-1100+39350-end.gcode")
    tools = [event["payload"] for event in mmu["events"] if event["name"] == "ToolChange"]
    assert {"old": 0, "new": 1} in tools and {"old": 1, "new": 0} in tools
    cube = golden_of(DATA / "sliced_cube20_prusaslicer250_mk3s.lines1-700.gcode")
    layers = [event["payload"] for event in cube["events"] if event["name"] == "LayerChanged"]
    assert layers[:3] == [{"layer": 1, "z": 0.2, "old_z": None}, {"layer": 2, "z": 0.4, "old_z": 0.2},
                          {"layer": 3, "z": 0.6, "old_z": 0.4}]
    zchanges = sum(event["name"] == "ZChange" for event in cube["events"])
    assert zchanges > 2 * len(layers)  # PrusaSlicer lifts Z on travel: ZChange spams, LayerChanged does not


@pytest.mark.parametrize("path", GOLDEN[:3], ids=[path.name.split(".")[0] for path in GOLDEN[:3]])
def test_crlf_and_cr_line_ends_give_the_same_events(Parser, path):
    data = path.read_bytes()
    expected = golden_of(path)
    for ending in (b"\r\n", b"\r"):
        converted = data.replace(b"\n", ending)
        events, state = run(Parser, converted, 4096)
        got = as_json(events, state)
        assert [(e["name"], e["line"], e["payload"]) for e in got["events"]] == [
            (e["name"], e["line"], e["payload"]) for e in expected["events"]]
        assert got["state"] == expected["state"]
        # offsets move by one byte per earlier line for CRLF
        extra = len(ending) - 1
        assert [e["offset"] for e in got["events"]] == [e["offset"] + extra * (e["line"] - 1)
                                                       for e in expected["events"]]


# ------------------------------------------------------------------------------------------------ the corpus


def corpus_files(suffix: str) -> list:
    if not CORPUS.is_dir():
        return []
    return sorted(CORPUS.glob(f"*{suffix}"))


@pytest.mark.parametrize("path", corpus_files(".gcode") or [None],
                         ids=[path.name for path in corpus_files(".gcode")] or ["corpus-absent"])
def test_both_implementations_agree_on_the_whole_corpus(path):
    if path is None:
        pytest.skip(f"{CORPUS} is not here (../shared is only beside the developers' clone)")
    if FORCED_PURE or CParser is None:
        pytest.skip("needs the compiled parser beside the twin")
    data = path.read_bytes()
    c_events, c_state = run(CParser, data)
    py_events, py_state = run(PyParser, data)
    assert c_state == py_state
    assert len(c_events) == len(py_events)
    assert c_events == py_events
    chunked_events, chunked_state = run(CParser, data, 65_521)
    assert chunked_events == c_events and chunked_state == c_state


def test_the_corpus_bgcode_is_refused_by_both(Parser):
    files = corpus_files(".bgcode")
    if not files:
        pytest.skip(f"{CORPUS} is not here (../shared is only beside the developers' clone)")
    for path in files:
        with pytest.raises(BinaryGcodeError):
            run(Parser, path.read_bytes(), 7)
