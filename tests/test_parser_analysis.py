"""File analysis (``analyse``, ``iter_events``) and the ``zevents parse`` command, run as a real subprocess."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from zevents import analysis
from zevents.parser import BinaryGcodeError, PyParser

DATA = Path(__file__).resolve().parent / "data" / "parser"
CUBE = DATA / "sliced_cube20_prusaslicer250_mk3s.lines1-700.gcode"
MMU = DATA / "sliced_cube20_prusaslicer250_mmu2s_toolchange.lines1-1100+39350-end.gcode"


def zevents(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "zevents", "parse", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def bgcode(tmp_path):
    path = tmp_path / "cube.bgcode"
    path.write_bytes(b"GCDE\x01\x00\x00\x00" + bytes(range(256)))
    return path


def test_analyse_summarises_a_file():
    summary = analysis.analyse(str(MMU), chunk_size=4096)
    assert summary["path"] == str(MMU)
    assert summary["size"] == MMU.stat().st_size
    assert summary["lines"] == MMU.read_bytes().count(b"\n")
    assert summary["events"]["ToolChange"] == 3 and summary["events"]["FilamentChange"] == 1
    assert summary["layers"] == 3  # the purge line at Z 0.4, 0.3, 0.2 is no layer: the slicer's 3 markers
    assert summary["tools"] == [0, 1]
    assert summary["max_z"] == 69.0  # the end-of-print lift
    assert summary["print_height"] == 0.6
    assert summary["filament_mm"] > 100
    assert summary["extrusion_bbox"]["min"][2] == 0.2
    assert summary["estimated_time_s"] > 60
    assert json.loads(json.dumps(summary)) == summary


def test_analyse_and_iter_events_agree_with_the_parser_on_any_chunk_size():
    expected = PyParser().feed_sent(CUBE.read_bytes())
    for chunk_size in (1, 1000, 1 << 20):
        assert list(analysis.iter_events(str(CUBE), chunk_size=chunk_size)) == expected
    counts = analysis.analyse(str(CUBE))["events"]
    assert sum(counts.values()) == len(expected)


def test_analyse_reports_progress():
    calls = []
    analysis.analyse(str(CUBE), chunk_size=5000, progress=lambda done, total: calls.append((done, total)))
    size = CUBE.stat().st_size
    assert calls[-1] == (size, size)
    assert len(calls) == -(-size // 5000)


def test_analyse_refuses_what_is_not_a_gcode_file(tmp_path, bgcode):
    with pytest.raises(FileNotFoundError):
        analysis.analyse(str(tmp_path / "missing.gcode"))
    with pytest.raises(IsADirectoryError):
        analysis.analyse(str(tmp_path))
    with pytest.raises(BinaryGcodeError) as caught:
        analysis.analyse(str(bgcode))
    assert isinstance(caught.value, ValueError) and str(bgcode) in str(caught.value)


def test_analyse_of_an_empty_file(tmp_path):
    empty = tmp_path / "empty.gcode"
    empty.write_bytes(b"")
    summary = analysis.analyse(str(empty))
    assert (summary["lines"], summary["events"], summary["layers"], summary["max_z"]) == (0, {}, 0, None)


def test_cli_prints_events_as_text_and_json():
    text = zevents(CUBE)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{CUBE}:30: Home {{}}"
    assert f"{CUBE}:36: LayerChanged " + '{"layer": 1, "z": 0.2, "old_z": null}' in lines
    as_json = zevents(CUBE, "--json")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(records) == len(lines)
    assert records[1] == {"file": str(CUBE), "line": 33, "offset": 1052, "name": "ZChange", "group": "gcode",
                          "payload": {"new": 0.2, "old": None}}


def test_cli_summary_as_text_and_json():
    text = zevents(CUBE, MMU, "--summary")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("layers          3") == 2
    assert "    ToolChange      3" in text.stdout
    assert "max Z" in text.stdout and "filament" in text.stdout
    as_json = zevents(CUBE, MMU, "--summary", "--json")
    summaries = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [summary["layers"] for summary in summaries] == [3, 3]
    assert summaries[1]["events"]["ToolChange"] == 3


def test_cli_one_clear_error_line_per_bad_file(tmp_path, bgcode):
    missing = tmp_path / "missing.gcode"
    result = zevents(missing, tmp_path, bgcode, CUBE, "--summary")
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert errors == [f"zevents parse: {missing}: No such file or directory",
                      f"zevents parse: {tmp_path}: is a directory, not a G-code file",
                      f"zevents parse: {bgcode} is binary G-code (.bgcode, starts with b'GCDE'); only text G-code "
                      "can be parsed: export plain .gcode from the slicer"]
    assert "layers          3" in result.stdout  # the good file is still analysed


def test_progress_bar_for_slow_files_only():
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    out = io.StringIO()
    assert analysis.run_parse([str(CUBE)], as_json=False, summary=True, out=out, progress_after=0.0,
                              progress_console=console) == 0
    assert CUBE.name in screen.getvalue()  # the bar was drawn on the (terminal) console
    assert "layers" in out.getvalue()
    quiet = io.StringIO()
    analysis.run_parse([str(CUBE)], as_json=False, summary=True, out=io.StringIO(), progress_after=3600.0,
                       progress_console=Console(file=quiet, force_terminal=True))
    assert quiet.getvalue() == ""
    not_a_terminal = io.StringIO()
    analysis.run_parse([str(CUBE)], as_json=False, summary=True, out=io.StringIO(), progress_after=0.0,
                       progress_console=Console(file=not_a_terminal, force_terminal=False))
    assert not_a_terminal.getvalue() == ""


def test_cli_output_into_a_closed_pipe_is_quiet():
    command = f"{sys.executable} -m zevents parse {' '.join([str(CUBE)] * 200)} | head -1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith(f"{CUBE}:30: Home")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
