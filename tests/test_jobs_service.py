"""`zevents printer` as a real process (built-in virtual printer) against a real broker, driven by the real CLI
client commands: events on the bus with the right src, refusals with one clear line, clean shutdown."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zevents import bus
from zevents.printer import channel

DATA = Path(__file__).parent / "data" / "printer"
CUBE = DATA / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
ZEVENTS = [sys.executable, "-m", "zevents"]


def write_config(directory: Path, bus_config, **printer) -> Path:
    section = {"commands": f"ipc://{directory}/printer.sock", "timeout": 3.0,
               "virtual": {"firmware": "marlin", "speed": 0, "tools": 1},
               "scripts": {"afterPrintDone": "M117 done"}}
    section.update(printer)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "printer": section, "data_dir": str(directory / "data")}))
    return path


def cli(*args, config: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(ZEVENTS + list(args) + ["-c", str(config)], capture_output=True, text=True,
                          timeout=timeout)


def next_event(subscriber, predicate, timeout: float = 30.0):
    """The next event on the bus matching predicate(envelope); fails after timeout seconds without one."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        envelope = subscriber.recv(timeout=max(0.0, remaining)) if remaining > 0 else None
        if envelope is None:
            raise AssertionError(f"no matching event within {timeout} s; saw {seen[-20:]}")
        seen.append(envelope.name)
        if predicate(envelope):
            return envelope


@pytest.fixture
def printer_service(short_tmp, bus_config, running_broker):
    """A running `zevents printer --virtual` process and a subscriber that saw it connect."""
    config = write_config(short_tmp, bus_config)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "file", "gcode"])
    process = subprocess.Popen(ZEVENTS + ["printer", "--virtual", "-c", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        connected = next_event(subscriber, lambda e: e.name == "Connected" or e.name == "Error")
        assert connected.name == "Connected", connected.payload
        yield process, subscriber, config
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        process.stderr.close()
        subscriber.close()


def test_print_send_and_refusals_through_the_cli(printer_service):
    process, subscriber, config = printer_service
    result = cli("print", str(CUBE), config=config)
    assert result.returncode == 0, result.stderr
    started = next_event(subscriber, lambda e: e.name == "PrintStarted")
    assert started.src == "job" and started.payload["name"] == CUBE.name and started.group == "print"
    home = next_event(subscriber, lambda e: e.name == "Home")
    assert home.src == "job" and home.group == "gcode"
    done = next_event(subscriber, lambda e: e.name in ("PrintDone", "PrintFailed"))
    assert done.name == "PrintDone" and done.payload["time"] > 0
    state = next_event(subscriber, lambda e: e.name == "PrinterStateChanged")
    assert state.payload == {"state_id": "OPERATIONAL", "state_string": "Operational"}

    result = cli("send", "G28", "G1 Z7 F600", config=config)
    assert result.returncode == 0, result.stderr
    home = next_event(subscriber, lambda e: e.name == "Home")
    assert home.src == "user"
    zchange = next_event(subscriber, lambda e: e.name == "ZChange")
    assert zchange.payload["new"] == 7 and zchange.src == "user"

    result = cli("send", "M0", config=config)
    assert result.returncode == 0 and "suppressed: M0" in result.stderr

    # One line with its parameters; the firmware's answers on stdout; a refused command exits 1.
    result = cli("send", "M104", "S0", config=config)
    assert result.returncode == 0 and "sent 1 line(s)" in result.stderr, result.stderr
    result = cli("send", "G92", "X12.5", "Y3", "M114", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("X:12.50 Y:3.00 "), result.stdout
    result = cli("send", "M115", config=config)
    assert "FIRMWARE_NAME:Marlin" in result.stdout and "Cap:AUTOREPORT_TEMP:1" in result.stdout
    result = cli("send", "M9999", config=config)
    assert result.returncode == 1 and 'Unknown command: "M9999"' in result.stdout
    assert "the printer refused: M9999" in result.stderr
    assert next_event(subscriber, lambda e: e.name == "CommandSuppressed").src == "user"

    result = cli("pause", config=config)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "cannot pause: not printing" in result.stderr

    result = cli("print", "/no/such/file.gcode", config=config)
    assert result.returncode == 2 and "No such file" in result.stderr

    client = channel.CommandClient(channel.endpoint(_load(config)))
    try:
        with pytest.raises(channel.ChannelError, match="lines"):
            client.request("GCODE", {"lines": [1, 2]})
        status = client.request("STATUS")
        assert status["state_id"] == "OPERATIONAL" and status["printing"] is False
    finally:
        client.close()


def test_pause_resume_cancel_and_sd_through_the_cli(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config, virtual={"firmware": "marlin", "speed": 20, "tools": 1})
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "file"])
    process = subprocess.Popen(ZEVENTS + ["printer", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        assert next_event(subscriber, lambda e: e.name in ("Connected", "Error")).name == "Connected"
        assert cli("print", str(CUBE), config=config).returncode == 0
        next_event(subscriber, lambda e: e.name == "PrintProgress" and e.payload["progress"] >= 20)
        result = cli("pause", config=config)
        assert result.returncode == 0, result.stderr
        paused = next_event(subscriber, lambda e: e.name == "PrintPaused")
        assert paused.payload["position"]["z"] is not None and '"position"' in result.stdout
        assert cli("resume", config=config).returncode == 0
        next_event(subscriber, lambda e: e.name == "PrintResumed")
        assert cli("cancel", config=config).returncode == 0
        failed = next_event(subscriber, lambda e: e.name in ("PrintFailed", "PrintDone"))
        assert failed.name == "PrintFailed" and failed.payload["reason"] == "cancelled"

        result = cli("sd", "upload", str(CUBE), "--as", "cube.gco", config=config, timeout=120)
        assert result.returncode == 0, result.stderr
        assert next_event(subscriber, lambda e: e.name == "TransferDone").payload["remote"] == "cube.gco"
        listing = cli("sd", "ls", config=config)
        assert listing.returncode == 0 and "cube.gco" in listing.stdout.lower()
        result = cli("sd", "print", "cube.gco", config=config)
        assert result.returncode == 0, result.stderr
        started = next_event(subscriber, lambda e: e.name == "PrintStarted")
        assert started.payload["origin"] == "sdcard"
        result = cli("sd", "print", "missing.gco", config=config)
        assert result.returncode == 1 and "cannot" in result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        subscriber.close()


def test_a_separately_started_faulty_printer_on_a_real_port(short_tmp, bus_config, running_broker):
    """`zevents virtual-printer` with injected faults as its own process, `zevents printer --port` on its pty."""
    simulator = subprocess.Popen(ZEVENTS + ["virtual-printer", "--speed", "0", "--fault", "corrupt_checksum@60",
                                            "--fault", "drop_line@200", "--fault", "corrupt_checksum@N400"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print"])
    process = None
    try:
        port = simulator.stdout.readline().strip()
        assert port.startswith("/dev/"), port
        config = write_config(short_tmp, bus_config, port=port, baudrate=115200)
        process = subprocess.Popen(ZEVENTS + ["printer", "-c", str(config)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        connected = next_event(subscriber, lambda e: e.name in ("Connected", "Error"))
        assert connected.name == "Connected" and connected.payload == {"port": port, "baudrate": 115200}
        assert cli("print", str(CUBE), config=config).returncode == 0
        done = next_event(subscriber, lambda e: e.name in ("PrintDone", "PrintFailed", "Error"), timeout=60)
        assert done.name == "PrintDone", done.payload
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        simulator.terminate()
        simulator.wait(20)
        simulator.stdout.close()
        subscriber.close()


def test_sigterm_disconnects_cleanly(printer_service):
    process, subscriber, config = printer_service
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    names = []
    while True:
        envelope = subscriber.recv(timeout=3)
        if envelope is None:
            break
        names.append(envelope.name)
        if envelope.name == "Disconnected":
            break
    assert names[-3:] == ["Disconnecting", "PrinterStateChanged", "Disconnected"]


def test_client_commands_without_a_running_link_fail_with_one_line(short_tmp, bus_config):
    config = write_config(short_tmp, bus_config)
    for args in (["send", "G28"], ["pause"], ["print", str(CUBE)], ["sd", "ls"]):
        result = cli(*args, config=config, timeout=30)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not running" in lines[0], (args, result.stderr)


def test_a_port_that_does_not_exist_is_reported_and_the_service_keeps_serving(short_tmp, bus_config,
                                                                                running_broker):
    config = write_config(short_tmp, bus_config, port=str(short_tmp / "ttyNOPE"))
    subscriber = bus.Subscriber(bus_config, groups=["comm"])
    process = subprocess.Popen(ZEVENTS + ["printer", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        error = next_event(subscriber, lambda e: e.name == "Error")
        assert error.payload["reason"] == "connection" and "ttyNOPE" in error.payload["error"]
        result = cli("send", "G28", config=config)
        assert result.returncode == 1 and "not connected" in result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        subscriber.close()


def _load(path: Path):
    from zevents.config import load

    return load(path)


def test_hooks_may_not_move_the_printer_unless_the_config_allows_it(printer_service, short_tmp, bus_config):
    """Hooks run on bus events, which anyone on the machine can fire: by default their G-code may not move."""
    process, subscriber, config = printer_service
    client = channel.CommandClient(channel.endpoint(_load(config)))
    try:
        with pytest.raises(channel.ChannelError, match="printer.allow_bus_commands"):
            client.gcode(["M117 hooked", "G28"], src="hook")
        assert client.gcode(["M117 hooked", "M105"], src="hook")["accepted"] == 2
        # The user's own commands are not bus events: they may move it.
        assert client.gcode(["G28"], src="user")["accepted"] == 1
        assert next_event(subscriber, lambda e: e.name == "Home").src == "user"
    finally:
        client.close()


def test_allow_bus_commands_lets_hooks_move_the_printer(short_tmp, bus_config, running_broker):
    config = write_config(short_tmp, bus_config, allow_bus_commands=True)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "gcode"])
    process = subprocess.Popen(ZEVENTS + ["printer", "--virtual", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    client = channel.CommandClient(channel.endpoint(_load(config)))
    try:
        assert next_event(subscriber, lambda e: e.name in ("Connected", "Error")).name == "Connected"
        assert client.gcode(["G28"], src="hook")["accepted"] == 1
        assert next_event(subscriber, lambda e: e.name == "Home").src == "hook"
    finally:
        client.close()
        subscriber.close()
        process.terminate()
        process.wait(15)


@pytest.mark.parametrize("line,moves", [
    ("G28", True), ("g1 x10", True), ("G1X10", True), ("G01 X1", True), ("N12 G28*33", True), ("T1", True),
    ("M600", True), ("G38.2 Z-1", True), ("M24", True), ("M117 hello G28", False), ("M104 T1 S200", False),
    ("G4 P100", False), ("; G28", False), ("(G28)", False), ("G280", False), ("G92 E0", False), ("", False)])
def test_which_lines_move_the_printer(line, moves):
    from zevents.printer.service import moves_the_printer

    assert moves_the_printer(line) is moves


def test_print_refuses_what_parse_refuses_with_the_same_message(short_tmp, bus_config):
    """Binary G-code, an executable, a file with NUL bytes, a FIFO, a directory: `zevents print` refuses each
    before anything is sent (no printer needed to see it), with the line `zevents parse` prints."""
    import os

    config = write_config(short_tmp, bus_config)
    bad = {"cube.bgcode": b"GCDE\x01\x00\x00\x00" + bytes(64), "tool.gcode": b"\x7fELF\x02\x01" + bytes(64),
           "nul.gcode": b"G28\n\x00\x01\x02"}
    paths = []
    for name, content in bad.items():
        (short_tmp / name).write_bytes(content)
        paths.append(short_tmp / name)
    os.mkfifo(short_tmp / "pipe.gcode")
    paths += [short_tmp / "pipe.gcode", short_tmp]
    for path in paths:
        printed = cli("print", str(path), config=config)
        parsed = subprocess.run(ZEVENTS + ["parse", str(path)], capture_output=True, text=True, timeout=60)
        assert printed.returncode == 2 and parsed.returncode == 1
        message = printed.stderr.strip().removeprefix("zevents print: ")
        assert printed.stderr.strip() != message and parsed.stderr.strip() == f"zevents parse: {message}"
        assert str(path) in message and ("binary" in message or "not a G-code file" in message)


@pytest.mark.parametrize("arguments, lines", [
    (["M109", "S0"], ["M109 S0"]),
    (["G28", "G1", "X10", "F600"], ["G28", "G1 X10 F600"]),
    (["M104", "T1", "S0"], ["M104 T1 S0"]),
    (["G28", "G1 X10 F600"], ["G28", "G1 X10 F600"]),
    (["G1 X1", "S0"], ["G1 X1", "S0"]),
    (["START_PRINT", "BED=60", "M117", "hi"], ["START_PRINT BED=60", "M117 hi"]),
    (["G28\nM105"], ["G28", "M105"]),
    (["-", "M400"], ["G28", "G1 X5", "M400"]),
])
def test_send_arguments_make_lines(arguments, lines):
    import io

    from zevents.printer.service import send_lines

    assert send_lines(arguments, io.StringIO("G28\n\nG1 X5\n")) == lines


def test_demo_refuses_any_printer_but_the_built_in_virtual_one(short_tmp, bus_config):
    """`zevents run --demo` prints a Prusa MK3S cube: never on whatever is attached to a real port."""
    config = write_config(short_tmp, bus_config)
    result = subprocess.run(ZEVENTS + ["run", "--demo", "--port", "/dev/ttyUSB7", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--demo prints a sample cube and only ever on the built-in virtual printer, but the printer port is " \
           "/dev/ttyUSB7" in result.stderr
    real = write_config(short_tmp, bus_config, port="/dev/ttyACM3")
    result = subprocess.run(ZEVENTS + ["run", "--demo", "-c", str(real)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "port is /dev/ttyACM3 (from --port or printer.port)" in result.stderr


def test_connect_and_disconnect_through_the_cli(printer_service):
    process, subscriber, config = printer_service
    result = cli("connect", config=config)
    assert result.returncode == 1 and "already connected to /dev/" in result.stderr
    result = cli("disconnect", config=config)
    assert result.returncode == 0, result.stderr
    next_event(subscriber, lambda e: e.name == "Disconnecting")
    next_event(subscriber, lambda e: e.name == "Disconnected")
    client = channel.CommandClient(channel.endpoint(_load(config)))
    try:
        assert client.request("STATUS")["state_id"] == "CLOSED"
        result = cli("disconnect", config=config)
        assert result.returncode == 1 and "not connected" in result.stderr
        port = client.request("STATUS")["port"]
        result = cli("connect", "--port", "/dev/zevents-no-such-port", config=config)
        assert result.returncode == 1 and "cannot open /dev/zevents-no-such-port" in result.stderr
        result = cli("connect", "--port", port, "--baud", "115200", config=config)
        assert result.returncode == 0 and f"connected to {port} at 115200 baud" in result.stderr, result.stderr
        next_event(subscriber, lambda e: e.name == "Connected")
        assert client.request("STATUS")["state_id"] == "OPERATIONAL"
    finally:
        client.close()
