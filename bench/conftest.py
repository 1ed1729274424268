"""Benchmark helpers: a `figures` fixture that collects each benchmark's headline numbers (with the baseline
measured in the same run) and prints them as one table at the end of the session."""
from __future__ import annotations

import pytest

_FIGURES: list = []


class Figures:
    def add(self, bench: str, name: str, value: float, unit: str, baseline: float | None = None,
            baseline_name: str = ""):
        ratio = (value / baseline) if baseline else None
        _FIGURES.append((bench, name, value, unit, baseline, baseline_name, ratio))


@pytest.fixture
def figures():
    return Figures()


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write("zevents figures (each beside its baseline measured in the same run)")
    for bench, name, value, unit, baseline, baseline_name, ratio in _FIGURES:
        line = f"  {bench:<8} {name:<44} {value:>14,.2f} {unit}"
        if baseline is not None:
            line += f"   vs {baseline_name} {baseline:,.2f} {unit}  (ratio {ratio:.3f})"
        write(line)
