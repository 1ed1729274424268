"""Both parser modes run: ZEVENTS_PUREPYTHON=1 selects the twin, and the parser suite passes under it too.

The normal run already tests both implementations side by side; this checks the selection itself and that the
suite stays green where only the twin exists (a machine without a compiler), as a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pure(*args, timeout=300):
    env = {**os.environ, "ZEVENTS_PUREPYTHON": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=TESTS.parent)


def test_pure_python_is_selected_by_the_environment():
    result = run_pure("-c", "import zevents.parser as p, zevents.analysis as a; "
                            "print(p.IMPLEMENTATION, p.Parser.__module__, p.FORCED_PURE, a.IMPLEMENTATION)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["py", "zevents._parser._pyparser", "True", "py"]


def test_the_parser_suite_passes_in_pure_python_mode():
    result = run_pure("-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_parser.py"),
                      str(TESTS / "test_parser_replies.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " skipped" in summary, summary  # the "c" half skips, it does not vanish
    assert "failed" not in summary
