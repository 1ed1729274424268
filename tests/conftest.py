"""Shared fixtures: real brokers on ipc endpoints under tmp_path, the shared spec folder, waiting helpers."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZEVENTS_SHARED", REPO.parent / "shared"))
DATA = Path(__file__).resolve().parent / "data"


def shared_path(*parts) -> Path:
    """A file of ../shared, or skip the test: users' clones don't have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared is only beside the developers' clone)")
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, message: str = "condition"):
    """Poll predicate until it returns a truthy value; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def collect(subscriber, count: int, timeout: float = 30.0, names=None) -> list:
    """``count`` events (of the given names) from a subscriber, or fail."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"got {len(got)} of {count} events: {got}")
        envelope = subscriber.recv(remaining)
        if envelope is not None and (names is None or envelope.name in names):
            got.append(envelope)
    return got


@pytest.fixture(scope="session", autouse=True)
def node_token():
    """The test session plays the node: the brokers it starts and the service processes it spawns share one node
    token (inherited through the environment, as under `zevents run`), so a service's sys/ events (ServiceStarted)
    are served; a stranger's are refused (tests/test_bus_hostile.py sets its own)."""
    from zevents import bus

    return bus.make_node_token()


@pytest.fixture
def short_tmp(tmp_path_factory):
    """A short directory: ipc socket paths must stay under ~100 bytes."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="zev-"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bus_config(short_tmp):
    from zevents.config import BusConfig

    return BusConfig.for_dir(short_tmp, node="testnode", heartbeat=0.2)


@pytest.fixture
def running_broker(bus_config):
    """A real broker serving on a thread; yields the Broker."""
    from zevents import broker

    brk, thread = broker.serve_in_thread(bus_config)
    yield brk
    brk.stop()
    thread.join(5)
    brk.close()


@pytest.fixture
def zevents_cmd():
    """argv prefix that runs the installed zevents CLI with this interpreter."""
    return [sys.executable, "-m", "zevents"]


@pytest.fixture
def virtual_printer(request, tmp_path):
    """A started virtual printer: instant (speed 0), Marlin, its SD card in tmp_path/"sd"; stopped afterwards.

    Other settings through indirect parametrization with VirtualPrinter keyword arguments, e.g.
    ``@pytest.mark.parametrize("virtual_printer", [{"firmware": "prusa", "speed": 50}], indirect=True)``.
    """
    from zevents.printer.virtual import VirtualPrinter

    settings = {"speed": 0, "sd_dir": tmp_path / "sd", **getattr(request, "param", {})}
    printer = VirtualPrinter(**settings).start()
    yield printer
    printer.stop()


@pytest.fixture(params=["py", "c"])
def Parser(request):
    """Each parser test runs on the pure twin and on the compiled parser (skipped when ZEVENTS_PUREPYTHON=1 forces
    the twin; a failure, not a skip, when the compiled one did not load)."""
    from zevents.parser import C_LOAD_ERROR, CParser, FORCED_PURE, PyParser

    if request.param == "py":
        return PyParser
    if FORCED_PURE:
        pytest.skip("ZEVENTS_PUREPYTHON=1: only the pure twin is under test")
    if CParser is None:
        pytest.fail(f"the compiled parser did not load: {C_LOAD_ERROR}")
    return CParser


def start_service_process(argv: list, bus_config, service: str, timeout: float = 30.0, stderr=None):
    """A zevents service as a real process (``argv``); returns the Popen once its ServiceStarted is on the bus.
    Its stderr goes to a pipe read only when it fails to start, or to ``stderr`` (an open file) for a process that
    logs a lot over a long run (a pipe nobody reads would fill and block it)."""
    import subprocess

    from zevents import bus

    watcher = bus.Subscriber(bus_config, groups=["sys"])
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr or subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            envelope = watcher.recv(timeout=0.5)
            if envelope is not None and envelope.name == "ServiceStarted" and envelope.payload["service"] == service:
                return process
            if process.poll() is not None:
                raise AssertionError(f"the {service} service exited: {process.stderr.read() if not stderr else ''}")
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"the {service} service did not start within {timeout:g} s")
    finally:
        watcher.close()
