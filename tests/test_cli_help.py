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
