"""The CLI's help as a newcomer reads it: click's metavars (FILE, TEXT), never Python types (`<bool>`, `{file}`),
which typer 0.27+ prints; pyproject pins the range that renders like this."""
from __future__ import annotations

import subprocess
import sys


def zevents(*args):
    return subprocess.run([sys.executable, "-m", "zevents", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "100", "TERM": "dumb"})


def test_help_shows_metavars_not_python_types():
    result = zevents("config", "check", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Usage: zevents config check [OPTIONS] FILE" in text
    assert "Config file to validate." in text
    assert "<bool>" not in text and "<str>" not in text and "{file}" not in text
    tail = zevents("tail", "--help").stdout
    assert "INTEGER" in tail and "<int>" not in tail and "<bool>" not in tail
    assert "GROUP:SEQ" in tail


def test_version():
    from zevents import __version__

    result = zevents("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"zevents {__version__}"


def test_hooks_help_says_that_hooks_alone_runs_the_service_and_data_dir_what_it_keeps():
    assert "`zevents hooks` alone runs the hooks service" in " ".join(zevents("hooks", "--help").stdout.split())
    run_help = " ".join(zevents("run", "--help").stdout.replace("│", " ").split())
    assert "the virtual printer's SD card (virtual-sd/)" in run_help


def test_sd_upload_as_checks_the_8_3_name_before_anything_runs(tmp_path):
    gcode = tmp_path / "cube.gcode"
    gcode.write_text("G28\n")
    for bad in ("cube20-final.gcode", "a/b.gco", "cube.gcode", "two words.g"):
        result = zevents("sd", "upload", str(gcode), "--as", bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert f"--as {bad!r} is not an 8.3 name for the SD card" in result.stderr
    from zevents.printer.job import sd_name, sd_name_problem

    assert sd_name_problem("CUBE20.GCO") is None and sd_name_problem("cube_2~1.g") is None
    assert sd_name_problem(sd_name("/some/Very Long Name!.gcode")) is None


def test_autodetect_says_which_ports_and_rates_it_probed(tmp_path):
    from zevents.printer.link import AUTO_PORT_PATTERNS, PrinterLink, _nothing_answered

    ports = [str(tmp_path / "ttyNOPE0"), str(tmp_path / "ttyNOPE1")]
    link = PrinterLink("AUTO", 0, emit=lambda *a: None, timeout=1.0, hello_timeout=0.3, candidates=ports)
    assert link.connect() is False
    assert f"no printer answered on {ports[0]}, {ports[1]} (probed at 115200, 250000" in link.error
    assert all(pattern in _nothing_answered([]) for pattern in AUTO_PORT_PATTERNS)
