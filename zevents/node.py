"""`zevents run`: a whole node from one command.

The supervisor owns the node's processes: it writes the effective configuration once (so every child reads the
same), starts each service as its own `zevents <service> -c <that file>` process, publishes ``Startup`` when every
service has said it is up (``sys/ServiceStarted``), restarts a service that dies (with backoff, publishing
``sys/ServiceRestarted``), and on SIGINT/SIGTERM publishes ``Shutdown`` and stops the children in reverse order.

Children run in their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them in order) and
with a parent-death signal (if the supervisor is killed outright, they follow; nothing is orphaned).  A lock file
refuses a second node on the same endpoints.  The supervisor's view (pids, uptimes, restarts) is kept in
``node.json`` in the runtime directory for `zevents status`.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import yaml

from zevents import bus, config as zconfig
from zevents.pidlock import LockHeld, PidLock

log = logging.getLogger("zevents.node")

PR_SET_PDEATHSIG = 1
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
STABLE_AFTER = 30.0           # a service up this long has its backoff reset
# `zevents status` shows the bus's event rate over this window (sampled by the supervisor, outside sys/: the
# heartbeats would count as one event a second on a quiet node); a sub-second sample flips between 0 and 2.
RATE_WINDOW, RATE_EVERY = 60.0, 5.0


class NodeError(RuntimeError):
    pass


def _die_with_parent():
    """Runs in the child between fork and exec: SIGTERM when the supervisor dies, whatever killed it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


@dataclass
class Service:
    name: str
    argv: list
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START
    next_start: float = 0.0
    ready: bool = False
    returncodes: list = field(default_factory=list)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def as_dict(self) -> dict:
        # started_at lets `zevents status` show a live uptime between two saves of node.json.
        return {"name": self.name, "pid": self.process.pid if self.alive() else None, "alive": self.alive(),
                "started_at": self.started_at if self.alive() else None,
                "uptime": round(time.time() - self.started_at, 1) if self.alive() else 0.0,
                "restarts": self.restarts, "ready": self.ready, "last_returncode":
                    self.returncodes[-1] if self.returncodes else None}


def available_services() -> set:
    """Services this installation can run as node children."""
    from zevents.service import SERVICES

    return set(SERVICES)


def plan_services(config) -> list:
    """Which services this node runs, in start order."""
    from zevents.printer.settings import printer_sections, service_name

    have = available_services()
    wanted = ["broker"]
    printers = [section for section in printer_sections(config) if section.get("port")]
    if "printer" in have:  # one process per printer: `printer`, or `printer:NAME` among several
        wanted.extend(service_name(config, section) for section in printers)
    if config.get("events", "enabled") and "hooks" in have:
        wanted.append("hooks")
    # The virtual printer's camera, for the timelapse to film the virtual print with nothing attached.
    if "camera" in have and any(str(section["port"]).upper() == "VIRTUAL" for section in printers) and \
            config.get("timelapse", "enabled"):
        wanted.append("camera")
    for extra in ("timelapse", "files", "slicing", "gateway", "mqtt"):
        if extra in have and config.get(extra, "enabled"):
            wanted.append(extra)
    return wanted


# `python -m` would put the working directory first on sys.path: a node started from a source checkout would run
# its services on the uncompiled tree (pure-Python parser and broker) instead of the installed package.  The
# children drop that entry before importing anything of zevents (the same as `python -P`, on every Python we support).
SERVICE_ENTRY = "import sys; del sys.path[0]; from zevents.service import main; sys.exit(main(sys.argv[1:]))"


def service_argv(name: str, config_file) -> list:
    """The command line of a node's service process."""
    return [sys.executable, "-c", SERVICE_ENTRY, name, "-c", str(config_file)]


class Supervisor:
    def __init__(self, config, demo: bool = False, show: bool = True):
        self.config = config
        bus.make_node_token()   # the broker and the services inherit it: only they may publish sys/ events
        self.demo = demo
        self.show = show
        self.node = config.node
        self.runtime = zconfig.runtime_dir() / self.node
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        self.config_file = self.runtime / "node.yaml"
        self.status_file = self.runtime / "node.json"
        self.lock_file = self.runtime / "node.lock"
        self.services: list[Service] = []
        self.started = time.time()
        self._stop = False
        self._wake = threading.Event()
        self._lock = PidLock(self.lock_file)
        self.publisher = None
        self._control = None
        self._rate_samples: deque = deque()     # (monotonic time, events published outside sys/)

    # --- lifecycle --------------------------------------------------------------------------------------------

    def lock(self):
        try:
            self._lock.acquire(f"a zevents node named {self.node!r}")
        except LockHeld as exc:
            raise NodeError(f"{exc}; stop it first, or give this one another bus.node") from None

    def write_config(self):
        """The effective configuration every child reads, endpoints resolved."""
        data = json.loads(json.dumps(self.config.data, default=str))
        resolved = self.config.bus
        data["bus"].update(node=self.node, publish=resolved.publish, ingest=resolved.ingest, replay=resolved.replay)
        data["data_dir"] = str(self.config.data_dir)
        # A service that reports a problem of this file names it: say where it comes from (the user's file was
        # checked, and its problems reported against its own lines, before the node started).
        source = f"from {self.config.path}" if self.config.path else "from the embedded default"
        header = (f"# The effective configuration every service of this node reads, written by `zevents run` "
                  f"(pid {os.getpid()})\n# {source}, endpoints resolved.  Edit that file, not this one.\n")
        self.config_file.write_text(header + yaml.safe_dump(data, sort_keys=False))
        os.chmod(self.config_file, 0o600)

    def start(self, timeout: float = 30.0, on_bus_up=None):
        """Start every service; ``on_bus_up()`` runs once the broker answers (the viewer starts there, so that
        the user sees the services come up and Startup)."""
        self.lock()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        names = plan_services(self.config)
        self.services = [Service(name, service_argv(name, self.config_file)) for name in names]
        control = bus.Control(self.config.bus)
        try:
            broker = self.services[0]
            self._spawn(broker)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    control.ping(timeout=0.5)
                    break
                except bus.BusError:
                    if not broker.alive():
                        raise NodeError(f"the broker exited at start (code {broker.process.returncode}); "
                                        "see its log above") from None
                    if time.monotonic() > deadline:
                        raise NodeError("the broker did not answer within the start-up timeout") from None
            broker.ready = True
        finally:
            control.close()
        if on_bus_up is not None:
            on_bus_up()
        self.publisher = bus.Publisher(self.config.bus, src="node")
        watcher = bus.Subscriber(self.config.bus, groups=["sys"])
        try:
            for service in self.services[1:]:
                self._spawn(service)
            self._await_ready(watcher, deadline=time.monotonic() + timeout)
        finally:
            watcher.close()
        self.publisher.publish_confirmed("Startup", {})
        self.save_status()

    def _await_ready(self, watcher, deadline: float):
        waiting = {s.name: s for s in self.services if not s.ready}
        while waiting:
            for service in waiting.values():
                if not service.alive():
                    raise NodeError(f"service {service.name!r} exited at start (code {service.process.returncode})")
            envelope = watcher.recv(timeout=0.2)
            if envelope is not None and envelope.name == "ServiceStarted":
                service = waiting.pop(envelope.payload.get("service"), None)
                if service is not None:
                    service.ready = True
            if time.monotonic() > deadline:
                raise NodeError(f"service(s) {', '.join(waiting)} did not report ready in time")

    def _spawn(self, service: Service):
        service.process = subprocess.Popen(service.argv, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
        service.started_at = time.time()
        log.info("started %s (pid %d)", service.name, service.process.pid)

    def supervise(self, poll: float = 1.0):
        """Restart services that die, until stop(); sample the bus's event rate for `zevents status`."""
        next_sample = 0.0
        while not self._stop:
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + RATE_EVERY
                self._sample_rate()
                self.save_status()
            for service in self.services:
                if service.alive():
                    if service.backoff > BACKOFF_START and time.time() - service.started_at > STABLE_AFTER:
                        service.backoff = BACKOFF_START
                    continue
                if service.process is not None and service.next_start == 0.0:
                    code = service.process.returncode
                    service.returncodes.append(code)
                    service.next_start = now + service.backoff
                    log.warning("%s exited with code %s; restarting in %.1f s", service.name, code, service.backoff)
                elif service.next_start and now >= service.next_start:
                    service.restarts += 1
                    self._spawn(service)
                    previous, service.backoff = service.backoff, min(service.backoff * 2, BACKOFF_MAX)
                    service.next_start = 0.0
                    self._announce_restart(service, previous)
                    self.save_status()
            self._sleep(poll)

    def _sample_rate(self):
        if self._control is None:
            self._control = bus.Control(self.config.bus)
        try:
            streams = self._control.status(timeout=1.0)["streams"]
        except bus.BusError:
            return  # the broker is restarting: its figures resume with the next sample
        now = time.monotonic()
        published = sum(seq for group, seq in streams.items() if group != "sys")
        if self._rate_samples and published < self._rate_samples[-1][1]:
            self._rate_samples.clear()  # a new broker epoch counts from the start again
        self._rate_samples.append((now, published))
        while len(self._rate_samples) > 2 and now - self._rate_samples[1][0] >= RATE_WINDOW:
            self._rate_samples.popleft()

    def event_rate(self) -> dict | None:
        """Events per second outside sys/ over the last RATE_WINDOW seconds (less just after the start)."""
        if len(self._rate_samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return {"events_per_s": round((n1 - n0) / (t1 - t0), 2), "window": round(t1 - t0, 1)}

    def _announce_restart(self, service: Service, backoff: float):
        if self.publisher is None:
            return
        try:
            self.publisher.publish("ServiceRestarted", {
                "service": service.name, "pid": service.process.pid, "restarts": service.restarts,
                "returncode": service.returncodes[-1] if service.returncodes else None, "backoff": backoff})
        except Exception as exc:  # the broker itself may be the one restarting
            log.warning("could not announce the restart of %s: %s", service.name, exc)

    def _sleep(self, seconds: float):
        self._wake.wait(seconds)

    def stop(self, *_):
        self._stop = True
        self._wake.set()

    def announce_shutdown(self):
        if self.publisher is not None:
            try:
                self.publisher.publish_confirmed("Shutdown", {}, timeout=2.0)
            except bus.BusError as exc:
                log.warning("could not publish Shutdown: %s", exc)
            self.publisher.close(linger=1)
            self.publisher = None

    def shutdown(self, grace: float = 10.0):
        self.announce_shutdown()
        for service in reversed(self.services):
            if service.alive():
                service.process.terminate()
                try:
                    service.process.wait(grace)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", service.name, grace)
                    service.process.kill()
                    service.process.wait()
        if self._control is not None:
            self._control.close()
            self._control = None
        if not self._lock.held:
            return  # refused at start: node.json and node.yaml are the running node's, not ours
        for path in (self.status_file, self.config_file):
            try:
                path.unlink()
            except OSError:
                pass
        self._lock.release()

    def save_status(self):
        status = {"node": self.node, "pid": os.getpid(), "started": self.started,
                  "config": str(self.config_file), "services": [s.as_dict() for s in self.services],
                  "rate": self.event_rate()}
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(status))
        temporary.replace(self.status_file)


def check_user_config(config) -> bool:
    """Every problem of the user's file, named against that file (the children only see the generated node.yaml,
    whose lines mean nothing to the user).  A problem that would leave something out (a hook subscription) refuses
    the start; one that only warns lets it go on.  Returns whether the node may start."""
    if not config.path:
        return True
    ok = True
    for problem in zconfig.check(config.path):
        warning = getattr(problem, "skips", True) is False
        ok = ok and warning
        print(f"zevents: config {'warning' if warning else 'error'}: {problem}", file=sys.stderr)
    return ok


def run(config, demo: bool = False, show: bool = True) -> int:
    """`zevents run`: start the node, show its events, supervise until SIGINT/SIGTERM."""
    if not check_user_config(config):
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    supervisor = Supervisor(config, demo=demo, show=show)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    viewers = []

    def show_events():
        if show:
            from zevents import console

            viewers.append(console.start_viewer(config.bus, demo=demo))

    try:
        supervisor.start(on_bus_up=show_events)
    except (NodeError, zconfig.ConfigError, bus.BusError) as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        for viewer in viewers:
            viewer.stop()
        supervisor.shutdown(grace=3)
        return 1
    if demo:
        from zevents import demo as demo_mod

        demo_mod.start(config, supervisor)
    try:
        supervisor.supervise()
    finally:
        supervisor.announce_shutdown()
        for viewer in viewers:
            viewer.stop(drain=True)
        supervisor.shutdown()
    if demo:
        from zevents import demo as demo_mod

        demo_mod.finish()
    return 0
