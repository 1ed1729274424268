"""`zevents config check` of a 5 MB config (52 651 hook subscriptions), beside baselines measured in the same run:
libyaml loading the same text into Python objects and checking nothing (``yaml.load(text, CSafeLoader)``), what
a checker built on PyYAML's loader would pay before checking anything; and libyaml's bare event stream (the floor).

* the whole `zevents config check` process (interpreter, imports, reading, checking, exit) beside a process that
  only loads the file with libyaml;
* in the process: the check, then its parts (the YAML pass beside libyaml's bare event stream, the subscriptions'
  compile, the rest) and the start-up (interpreter, the CLI's imports and the config sections' registration);
* linearity (half the file), and how fast the limits refuse a YAML bomb and a list nested 200 000 deep (they must
  take well under a second).

Target (issue 13): the 5 MB config in about a second, whole process (it took 38 s, then 97 s on the loaded
development machine, through PyYAML's pure-Python scanner, twice; 2.0 s before the compile of plain commands and
the YAML pass's scalars were made cheap); linear in the file's size.

Run: pytest bench/bench_config.py --benchmark-only
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from zevents import config, placeholders, safe_yaml
from zevents.hooks import subscriptions

SUBSCRIPTIONS = 52_651
EVENTS = ("PrintDone", "PrintFailed", "PrintStarted", "Connected", "ZChange", "FileSelected")
BOMB = ('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
        + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))


def big_config(count: int) -> str:
    lines = ["events:\n  enabled: true\n  subscriptions:\n"]
    for i in range(count):
        lines.append(f"    - event: {EVENTS[i % len(EVENTS)]}\n"
                     f"      command: logger -t z hook{i} {{__filename}}\n      type: system\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "big.yaml"
    path.write_text(big_config(SUBSCRIPTIONS))
    config._register_builtin_validators()
    return path


def _best(function, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        placeholders.forget_words()  # each round a first load, as in a `config check` process
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _events(text: str):
    loader = yaml.CSafeLoader(text)
    while not isinstance(loader.get_event(), yaml.StreamEndEvent):
        pass
    loader.dispose()


def test_check_a_5_mb_config(benchmark, figures, big):
    text = big.read_text()
    baseline = _best(lambda: yaml.load(text, Loader=yaml.CSafeLoader))
    problems = benchmark.pedantic(config.check, args=(big,), setup=placeholders.forget_words, rounds=3,
                                  iterations=1)
    assert problems == []
    seconds = benchmark.stats.stats.min
    figures.add("config", f"check {big.stat().st_size / 1e6:.1f} MB, {SUBSCRIPTIONS} hooks", seconds, "s",
                baseline, "libyaml load, no checks")
    figures.add("config", "  the same beside libyaml's bare event stream", seconds, "s", _best(lambda: _events(text)),
                "libyaml events, nothing built")
    half = big.with_name("half.yaml")
    half.write_text(big_config(SUBSCRIPTIONS // 2))
    figures.add("config", "linearity: time of half the file / half the time", _best(lambda: config.check(half))
                / (seconds / 2), "x")


@pytest.mark.parametrize("name, text", [("YAML bomb (342 bytes)", BOMB),
                                        ("list nested 200 000 deep", "a: " + "[" * 200_000 + "]" * 200_000)])
def test_limits_refuse_quickly(benchmark, figures, tmp_path, name, text):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    problems = benchmark.pedantic(config.check, args=(path,), rounds=3, iterations=1)
    assert len(problems) == 1
    figures.add("config", f"refuse a {name}", benchmark.stats.stats.min * 1e3, "ms")


def _process(*args) -> None:
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_check_process(benchmark, figures, big):
    """What a user waits for: `zevents config check big.yaml`, from exec to exit."""
    benchmark.pedantic(_process, args=("-m", "zevents", "config", "check", str(big)), rounds=5, iterations=1)
    seconds = benchmark.stats.stats.min
    figures.add("config", f"zevents config check process, {SUBSCRIPTIONS} hooks", seconds, "s",
                _best(lambda: _process("-c", "import sys, yaml; yaml.load(open(sys.argv[1]), yaml.CSafeLoader)",
                                       str(big))), "process: libyaml load")
    figures.add("config", "  start-up: interpreter alone", _best(lambda: _process("-c", "pass")), "s")
    figures.add("config", "  start-up: + CLI imports, sections registered", _best(lambda: _process(
        "-c", "import zevents.cli, zevents.config; zevents.config._register_builtin_validators()")), "s")


def test_check_breakdown(benchmark, figures, big):
    """Where the check's time goes, in the process: the YAML pass, the subscriptions' compile, the rest."""
    text = big.read_text()
    benchmark.pedantic(config.check, args=(big,), setup=placeholders.forget_words, rounds=5, iterations=1)
    check = benchmark.stats.stats.min
    yaml_pass = _best(lambda: safe_yaml.load(text))
    loaded = config.load(big)
    compile_ = _best(lambda: subscriptions.compile_section(loaded, build=False))
    figures.add("config", "  in process: the whole check", check, "s")
    figures.add("config", "  in process: YAML pass (limits, lines)", yaml_pass, "s", _best(lambda: _events(text)),
                "libyaml events, nothing built")
    figures.add("config", "  in process: subscriptions compiled", compile_, "s")
