"""Several printers on one node (issue 18): the `printers:` list, one link process per printer, `--printer` on the
printer-side commands, and every event kept apart by the header's printer.  Real `zevents run` processes and
virtual printers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from test_node import Node, _events, node_env, status_of, wait_started
from zevents import bus, config as zconfig
from zevents.printer import settings

SAMPLE = Path(__file__).parent / "data" / "printer" / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
NAMES = ("mk3s", "voron", "ender 3")

# What the services around the printers don't need here stays off: the machine is shared.
QUIET_NODE = {"files": {"enabled": False}, "slicing": {"enabled": False}, "timelapse": {"enabled": False},
              "events": {"enabled": False}}


@pytest.fixture
def home(tmp_path_factory):
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="zevp-"))  # short: ipc paths live below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(home: Path, text: str) -> Path:
    path = home / "zevents.yaml"
    path.write_text(text)
    return path


def three_printers(home: Path, speed: float = 0, **extra) -> Path:
    sections = dict(QUIET_NODE, printer={"virtual": {"speed": speed}},
                    printers=[{"name": name, "port": "VIRTUAL"} for name in NAMES], **extra)
    return write_config(home, json.dumps(sections))


def zevents(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zevents", *args], env=node_env(home), capture_output=True,
                          text=True, timeout=120)


# --- config ------------------------------------------------------------------------------------------------------

def test_duplicate_names_are_refused_with_file_line_and_key(tmp_path):
    path = write_config(tmp_path, "printers:\n  - name: a\n    port: VIRTUAL\n  - name: b\n    port: VIRTUAL\n"
                                  "  - name: a\n    port: VIRTUAL\n")
    problems = zconfig.check(path)
    assert [(p.file, p.line, p.key) for p in problems] == [(str(path), 6, "printers.2.name")]
    assert "'a' is used twice" in problems[0].message


def test_a_printer_without_a_name_and_shared_channels_are_refused(tmp_path):
    path = write_config(tmp_path, "printers:\n  - port: VIRTUAL\n  - name: b\n")
    (problem,) = zconfig.check(path)
    assert (problem.line, problem.key) == (2, "printers.0") and "needs a name" in problem.message
    path = write_config(tmp_path, "printers:\n  - {name: a, commands: 'ipc:///tmp/x.sock'}\n"
                                  "  - {name: b, commands: 'ipc:///tmp/x.sock'}\n")
    (problem,) = zconfig.check(path)
    assert (problem.line, problem.key) == (3, "printers.1.commands") and "its own" in problem.message
    path = write_config(tmp_path, "printers:\n  - {name: a, baudrate: 12}\n")
    (problem,) = zconfig.check(path)
    assert (problem.line, problem.key) == (2, "printers.0.baudrate")


def test_each_printer_inherits_the_printer_section_and_gets_its_own_channel(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = write_config(tmp_path, "bus: {node: n1}\nprinter:\n  virtual: {speed: 0}\n  timeout: 3\n"
                                  "printers:\n  - {name: a, port: VIRTUAL}\n  - {name: b, port: /dev/ttyACM0, "
                                  "timeout: 5}\n")
    config = zconfig.load(path)
    a, b = settings.printer_sections(config)
    assert (a["name"], a["timeout"], a["virtual"]["speed"], b["timeout"]) == ("a", 3, 0, 5)
    assert a["commands"].endswith("/n1/printer-a.sock") and b["commands"].endswith("/n1/printer-b.sock")
    assert settings.printer_config(config, "b").get("printer", "port") == "/dev/ttyACM0"
    with pytest.raises(settings.PrinterChoiceError, match=r"--printer NAME \(a, b\)"):
        settings.printer_section(config, None)
    with pytest.raises(settings.PrinterChoiceError, match="no printer named 'c'"):
        settings.printer_section(config, "c")
    from zevents import node

    assert [s for s in node.plan_services(config) if s.startswith("printer")] == ["printer:a", "printer:b"]


def test_the_single_printer_section_is_a_one_printer_list_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    config = zconfig.load(text="bus: {node: n1}\nprinter: {port: /dev/ttyUSB0}\n")
    (only,) = settings.printer_sections(config)
    assert only["port"] == "/dev/ttyUSB0" and only["commands"].endswith("/n1/printer.sock")
    assert settings.printer_section(config, None) is not None and settings.printer_section(config, "printer")
    from zevents import node

    assert [s for s in node.plan_services(config) if s.startswith("printer")] == ["printer"]


# --- CLI ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["pause"], ["resume"], ["cancel"], ["send", "M105"], ["sd", "ls"],
                                     ["print", str(SAMPLE)], ["files", "upload", str(SAMPLE), "--select"],
                                     ["files", "upload", str(SAMPLE), "--print"], ["files", "ls", "--storage",
                                                                                   "sdcard"],
                                     ["slice", "MODEL", "--print"], ["printer"]])
def test_printer_commands_need_printer_among_several_and_refuse_an_unknown_one(home, command):
    path = three_printers(home)
    if "MODEL" in command:  # a model to slice: one facet is enough to get past the model check
        model = home / "facet.stl"
        model.write_text("solid t\nfacet normal 0 0 1\nouter loop\nvertex 0 0 0\nvertex 1 0 0\nvertex 0 1 0\n"
                         "endloop\nendfacet\nendsolid t\n")
        command = [str(model) if word == "MODEL" else word for word in command]
    result = zevents(home, *command, "-c", str(path))
    assert result.returncode == 2
    assert "3 printers: say which with --printer NAME (mk3s, voron, ender 3)" in result.stderr
    result = zevents(home, *command, "-c", str(path), "--printer", "prusa")
    assert result.returncode == 2 and "no printer named 'prusa'" in result.stderr
    if command[0] in ("slice", "printer"):
        return  # a known printer: the slice would wait for a node, the link would run (the node tests run them)
    # a known one is asked (no node runs: the socket asked is named)
    result = zevents(home, *command, "-c", str(path), "--printer", "voron")
    assert result.returncode == 1 and "--printer" not in result.stderr, result.stderr
    assert ("files.sock" if command[0] == "files" else "printer-voron.sock") in result.stderr


# --- a node with three printers --------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_three_virtual_printers_print_at_once_with_their_events_kept_apart(home):
    # A hook on PrintDone checks that {__printer} and ZEVENTS_PRINTER both name the printer that finished.
    check = "import os, sys; sys.exit(os.environ['ZEVENTS_PRINTER'] != sys.argv[1])"
    # At 5x the sample's 170 s take half a minute: the three prints run at the same time.
    path = three_printers(home, speed=5, files={"enabled": True}, events={"enabled": True, "subscriptions": [{
        "event": "PrintDone", "type": "system", "name": "which-printer",
        "command": f'{sys.executable} -c "{check}" "{{__printer}}"'},
        # and a G-code hook goes to the printer whose event triggered it: each beeps (Alert) once
        {"event": "PrintDone", "type": "gcode", "name": "beep", "command": "M300 S440 P10"}]})
    node = Node(home, "-c", str(path)).start()
    try:
        status = wait_started(node, timeout=120)
        names = [s["name"] for s in status["services"]]
        assert [n for n in names if n.startswith("printer")] == [f"printer:{name}" for name in NAMES]
        for name in NAMES:
            wait_for(lambda: zevents(home, "send", "M105", "-c", str(path), "--printer", name).returncode == 0,
                     60, 0.5, message=f"{name} connected")
        for name in NAMES[:-1]:
            result = zevents(home, "print", str(SAMPLE), "-c", str(path), "--printer", name)
            assert result.returncode == 0, result.stderr
        # the last one through the files service: stored, then printed on the printer named
        result = zevents(home, "files", "upload", str(SAMPLE), "--print", "-c", str(path), "--printer", NAMES[-1])
        assert result.returncode == 0 and "printing" in result.stderr, result.stderr
        config = node.config()
        control = bus.Control(config)
        try:
            wait_for(lambda: len(_events(control, "print", "PrintDone")) >= 3, 180, 0.5,
                     message="three PrintDone")
            events = _events(control, "print")
            hooks = wait_for(lambda: len(runs := [e for e in _events(control, "hook")
                                                  if e.name in ("HookFinished", "HookFailed")]) >= 6 and runs,
                             60, 0.5, message="six hook runs")
            alerts = wait_for(lambda: len(found := _events(control, "gcode", "Alert")) >= 3 and found, 60, 0.5,
                              message="three Alerts")
        finally:
            control.close()
        seqs = {name: [e.seq for e in events if e.name == name] for name in ("PrintStarted", "PrintDone")}
        assert max(seqs["PrintStarted"]) < min(seqs["PrintDone"]), "the three prints did not overlap"
        by_printer = {}
        for envelope in events:
            by_printer.setdefault(envelope.printer, []).append(envelope)
        assert set(by_printer) == set(NAMES)
        for name, own in by_printer.items():
            kinds = [e.name for e in own]
            assert kinds.count("PrintStarted") == 1 and kinds.count("PrintDone") == 1, (name, kinds)
            assert kinds.index("PrintStarted") < kinds.index("PrintDone")
            assert all(e.src != "firmware" or e.printer == name for e in own)
            progress = [e.payload["progress"] for e in own if e.name == "PrintProgress"]
            assert progress and progress == sorted(progress) and progress[-1] == 100, (name, progress)
            done = next(e for e in own if e.name == "PrintDone")
            assert done.payload["name"] == SAMPLE.name and done.payload["origin"] == "local"
        assert all(e.name == "HookFinished" for e in hooks), [(e.name, e.payload) for e in hooks]
        which = [e for e in hooks if e.payload["subscription"] == "which-printer"]
        assert sorted(e.payload["argv"][-1] for e in which) == sorted(NAMES)
        assert all(e.payload["returncode"] == 0 for e in which), which
        assert sorted(e.printer for e in alerts) == sorted(NAMES)
        # `zevents status` shows every printer, each from its own link; the live view names each event's printer
        result = zevents(home, "status", "--json", "-c", str(path))
        shown = json.loads(result.stdout)["printers"]
        assert [p["name"] for p in shown] == list(NAMES)
        assert all(p["error"] is None and p["state_string"] == "Operational" for p in shown), shown
        text = zevents(home, "status", "-c", str(path)).stdout
        assert all(f"printer {name}: state_id=" in text for name in NAMES), text
        wait_for(lambda: all(any(name in line and "PrintDone" in line for line in node.text().splitlines())
                             for name in NAMES), 30, 0.2, message="the live view to show each PrintDone")
        # each printer has its SD card folder
        data = Path(node.env["HOME"]) / ".local" / "share" / "zevents" / "virtual-sd"
        assert {p.name for p in data.iterdir()} >= set(NAMES)
        # a printer killed is restarted alone, under its own name
        victim = next(s for s in status_of(node)["services"] if s["name"] == "printer:voron")
        import os
        import signal

        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: (s := status_of(node)) and any(v["name"] == "printer:voron" and v["restarts"] == 1
                                                        and v["alive"] for v in s["services"]),
                 90, 0.5, message="printer:voron restarted")
        others = [s for s in status_of(node)["services"] if s["name"] in ("printer:mk3s", "printer:ender 3")]
        assert all(s["restarts"] == 0 for s in others)
    finally:
        assert node.stop() == 0


@pytest.mark.timeout(600)
def test_two_virtual_printers_get_a_timelapse_each(home):
    """The timelapse keeps frames per printer name: each printer's job has one frame per layer of its own print."""
    names = NAMES[:2]
    path = write_config(home, json.dumps(dict(
        QUIET_NODE, printer={"virtual": {"speed": 0}}, printers=[{"name": name, "port": "VIRTUAL"} for name in names],
        timelapse={"enabled": True, "modes": ["layer"]}, webcam={"timelapse": {"renderAfterPrint": "off"}})))
    node = Node(home, "-c", str(path)).start()
    try:
        wait_started(node, timeout=120)
        for name in names:
            wait_for(lambda: zevents(home, "send", "M105", "-c", str(path), "--printer", name).returncode == 0,
                     60, 0.5, message=f"{name} connected")
            result = zevents(home, "print", str(SAMPLE), "-c", str(path), "--printer", name)
            assert result.returncode == 0, result.stderr
        control = bus.Control(node.config())
        try:
            wait_for(lambda: len(_events(control, "print", "PrintDone")) >= 2, 180, 0.5, message="two PrintDone")
            layers = {name: sum(1 for e in _events(control, "gcode", "LayerChanged") if e.printer == name)
                      for name in names}
        finally:
            control.close()
        assert all(layers.values()), layers

        def captured():
            listing = json.loads(zevents(home, "timelapse", "ls", "--json", "-c", str(path)).stdout)
            jobs = {job["printer"]: job for job in listing["unrendered"] if job["state"] != "capturing"}
            return jobs if set(jobs) == set(names) else None

        jobs = wait_for(captured, 120, 0.5, message="a timelapse job per printer")
        assert {name: jobs[name]["count"] for name in names} == layers
    finally:
        assert node.stop() == 0


@pytest.mark.timeout(300)
def test_a_printers_list_of_one_runs_that_printer_under_its_name(home):
    path = write_config(home, json.dumps(dict(QUIET_NODE, printers=[{"name": "solo", "port": "VIRTUAL",
                                                                      "virtual": {"speed": 0}}])))
    node = Node(home, "-c", str(path)).start()
    try:
        status = wait_started(node, timeout=120)
        assert "printer" in [s["name"] for s in status["services"]]
        # one printer: --printer may be left out, and its channel is printer.sock as always
        wait_for(lambda: zevents(home, "send", "M105", "-c", str(path)).returncode == 0, 60, 0.5,
                 message="solo connected")
        assert zevents(home, "print", str(SAMPLE), "-c", str(path), "--printer", "solo").returncode == 0
        control = bus.Control(node.config())
        try:
            (done,) = wait_for(lambda: _events(control, "print", "PrintDone"), 120, 0.5, message="PrintDone")
        finally:
            control.close()
        assert done.printer == "solo"
    finally:
        assert node.stop() == 0
