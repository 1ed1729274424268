"""The hooks service (`zevents hooks`): OctoPrint's event hooks, run from the bus, safely, boundedly, observably.

It owns:

* the subscriber loop: every event is matched against ``events.subscriptions`` (see
  :mod:`zevents.hooks.subscriptions`) and each admitted run is queued with the printer state of that moment
  (``__currentZ``, ``__filename``, ..., kept here from the broker's snapshot at start-up, then live events);
* the runs, at most ``hooks.workers`` processes at once, at most ``hooks.max_queued`` waiting
  (:class:`zevents.hooks.runner.Runs`): the commands of one run in order, stopping at the first failure;
  system commands without a shell (:mod:`zevents.placeholders`, :mod:`zevents.hooks.runner`), G-code
  through the printer link's command channel, never the PUB/SUB bus;
* the result events ``hook/HookFinished``, ``hook/HookFailed``, ``hook/HookTimedOut`` (src ``hook``), whose payload
  adds ``stdout`` (tail), ``depth`` (how many hook runs led to this one), ``started`` (µs) and ``type`` to the
  catalogue's keys;
* loop safety: a subscription never runs on the results of its own runs, and a chain of hooks triggered by hook
  results stops at :data:`MAX_HOOK_DEPTH`;
* reloading the config on SIGHUP or when the file changes (an invalid file keeps the running config), then
  publishing ``SettingsUpdated``;
* `zevents hooks test`: what would run for an event, or run it and show the results.

One thread does the work: a single poll waits on the bus socket and on every running hook's pipes and pidfd, an
event is matched and its commands spawned at once (posix_spawn holds the thread only until the child has exec'd),
and a process's exit completes its run.  A slow hook never delays the next event's match; only G-code hooks, which
wait for the printer's reply, run on a background thread.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time

import zmq

from zevents import bus
from zevents import config as zconfig
from zevents import events as _events
from zevents import placeholders, wire
from zevents.printer import channel
from zevents.service import freeze_startup_heap
from zevents.hooks import runner as hook_runner, subscriptions as hook_subscriptions
from zevents.hooks.subscriptions import Subscription

log = logging.getLogger("zevents.hooks")


MAX_HOOK_DEPTH = 3
SERVE_TICK = 0.2  # seconds between checks for stop() and reloads
GCODE_REPLY_TIMEOUT = 10.0
STATE_GROUPS = ("gcode", "file", "print", "comm")
RESULT_TEXT_LIMIT = 2000
ENV_VALUE_LIMIT = 65536
FINISHED, FAILED, TIMED_OUT = "HookFinished", "HookFailed", "HookTimedOut"
DEFAULT_MAX_QUEUED = 10000
_NEGATIVE_NUMBER = re.compile(r"-(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")


# --- printer state behind the generic placeholders ---------------------------------------------------------------

def _set_file(values: dict, payload: dict):
    if payload.get("path") is not None or payload.get("name") is not None:
        values["filename"] = payload.get("name")
        values["filepath"] = payload.get("path")
        values["fileorigin"] = payload.get("origin")


def _z_from(key):
    def apply(values, payload):
        z = payload.get(key)
        if isinstance(z, (int, float)) and not isinstance(z, bool):
            values["currentZ"] = z
    return apply


def _progress_from_payload(values, payload):
    progress = payload.get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        values["progress"] = progress


def _deselect(values, payload):
    values["filename"] = values["filepath"] = values["fileorigin"] = None


def _print_started(values, payload):
    _set_file(values, payload)
    values["progress"] = 0


def _print_done(values, payload):
    values["progress"] = 100


def _disconnected(values, payload):
    values["currentZ"] = None


_STATE_RULES = {
    "ZChange": _z_from("new"),
    "PositionUpdate": _z_from("z"),
    "LayerChanged": _z_from("z"),
    "FileSelected": _set_file,
    "FileDeselected": _deselect,
    "PrintStarted": _print_started,
    "PrintProgress": _progress_from_payload,
    "PrintPaused": _progress_from_payload,
    "PrintCancelled": _progress_from_payload,
    "PrintDone": _print_done,
    "Disconnected": _disconnected,
}


class PrinterState:
    """What the generic placeholders report, as learnt from the bus: one printer's (its name from the header;
    None for the only printer of a node that names none)."""

    def __init__(self, printer: str | None = None):
        self.values = {"currentZ": None, "filename": None, "filepath": None, "fileorigin": None, "progress": None,
                       "printer": printer}

    def apply(self, name: str, payload: dict):
        rule = _STATE_RULES.get(name)
        if rule is not None:
            rule(self.values, payload)

    def load(self, envelopes):
        """Start-up: the broker's last event per topic, applied oldest first."""
        for envelope in sorted(envelopes, key=lambda e: (e.ts, e.seq)):
            self.apply(envelope.name, envelope.payload)


class PrinterStates(dict):
    """The state of every printer of the node, by the header's printer: a hook on one printer's event sees that
    printer's file, Z and progress, never another's."""

    def of(self, printer: str | None) -> PrinterState:
        state = self.get(printer)
        if state is None:
            state = self[printer] = PrinterState(printer)
        return state

    def load(self, envelopes):
        for envelope in sorted(envelopes, key=lambda e: (e.ts, e.seq)):
            self.of(envelope.printer).apply(envelope.name, envelope.payload)


# --- one run ---------------------------------------------------------------------------------------------------

class Job:
    __slots__ = ("subscription", "name", "payload", "ts", "state", "depth", "started")

    def __init__(self, subscription: Subscription, name: str, payload: dict, ts: int | None, state: dict,
                 depth: int = 1):
        self.subscription = subscription
        self.name = name
        self.payload = payload
        self.ts = ts
        self.state = state
        self.depth = depth
        self.started = None


def _text(data: bytes, limit: int = RESULT_TEXT_LIMIT) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else "[...]" + text[-limit:]


def _env_key(key) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(key)).upper()


def _env_value(value) -> str:
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, (dict, list, tuple)):
        text = placeholders.to_json(value)
    else:
        text = str(value)
    return text.replace("\x00", "")


def _one_line(text: str) -> str:
    """G-code values: a newline in a file name must not become a second G-code line."""
    return text.replace("\r", " ").replace("\n", " ")


def refuse_option_values(templates: list, argv: list):
    """Argument injection: a placeholder that fills a whole argument with a value beginning with '-' would be read
    as an option (`sort {path}` with the path `-o/tmp/x` writes a file).  Raises runner.Refused unless a literal
    `--` (the end of options) comes before that argument.  A negative number (`{__currentZ}` is -1 before any Z is
    known) is a value, not an option."""
    for index in range(1, len(argv)):
        template = templates[index]
        if template.constant == "--":
            return
        value = argv[index]
        if len(template.parts) == 1 and template.fields and _option_like(value):
            raise hook_runner.Refused(
                f"not run: {template.fields[0].text} fills argument {index} of {argv[0]!r} with {value!r}, "
                f"which {os.path.basename(argv[0])} would read as an option; write `--` before it in the command "
                "(if the program knows it) or set `allow_option_values: true` on the subscription", argv)


def _option_like(value: str) -> bool:
    return value.startswith("-") and not _NEGATIVE_NUMBER.match(value)


def refuse_option_words(template, values: placeholders.Values, script: list):
    """refuse_option_values for a `shell: true` script: a placeholder that is a whole word of it."""
    for field in template.fields:
        if field.whole_word:
            value = values.format(field)
            if _option_like(value):
                raise hook_runner.Refused(
                    f"not run: {field.text} fills a whole word of the shell command with {value!r}, which the "
                    "command would read as an option; write `--` before it in the command (if the program knows "
                    "it) or set `allow_option_values: true` on the subscription", script)


class HookRunner:
    """Fills and runs the commands of one job; knows nothing of the bus (the service publishes the outcome)."""

    def __init__(self, config, on_started=None):
        self.on_started = on_started
        self.base_env = dict(os.environ)
        self._gcode_lock = threading.Lock()
        self._gcode_client = None
        self.reconfigure(config)

    def reconfigure(self, config):
        from zevents.printer.settings import printer_sections

        self.command_endpoint = channel.endpoint(config)
        # A G-code hook goes to the printer whose event triggered it (several printers: each its own channel).
        self.printer_endpoints = {section["name"]: section["commands"] for section in printer_sections(config)}

    def endpoint_for(self, job: Job) -> str:
        return self.printer_endpoints.get(job.state.get("printer")) or self.command_endpoint

    def values(self, job: Job) -> placeholders.Values:
        subscription = job.subscription

        def missing(field):
            if field.text not in subscription.warned:
                subscription.warned.add(field.text)
                log.warning("hook %r: placeholder %s has no value for %s; it renders empty (warned once)",
                            subscription.name, field.text, job.name)

        return placeholders.Values(job.name, job.payload, job.state, job.ts, missing)

    def plan(self, job: Job, values: placeholders.Values | None = None) -> list:
        """What the job runs, filled: argv lists (system) or G-code lines (gcode)."""
        values = values or self.values(job)
        subscription = job.subscription
        if subscription.type == "gcode":
            return [template.render(values, _one_line) for template in subscription.commands]
        if subscription.shell:
            scripts = [["/bin/sh", "-c", template.render(values)] for template in subscription.commands]
            if not subscription.allow_option_values:
                for template, script in zip(subscription.commands, scripts):
                    refuse_option_words(template, values, script)
            return scripts
        argvs = [[word.render(values) for word in argv] for argv in subscription.commands]
        if not subscription.allow_option_values:
            for templates, argv in zip(subscription.commands, argvs):
                refuse_option_values(templates, argv)
        return argvs

    def environment(self, job: Job, values: placeholders.Values, payload_json: str) -> dict:
        env = dict(self.base_env)
        env["ZEVENTS_EVENT"] = job.name
        env["ZEVENTS_SUBSCRIPTION"] = job.subscription.name
        for name in ("__currentZ", "__filename", "__filepath", "__fileorigin", "__progress", "__now", "__printer"):
            env["ZEVENTS_" + name[2:].upper()] = _env_value(values.generic(name))
        if len(payload_json) <= ENV_VALUE_LIMIT:
            env["ZEVENTS_PAYLOAD"] = payload_json
        for key, value in job.payload.items():
            text = _env_value(value)
            if len(text) <= ENV_VALUE_LIMIT:
                env["ZEVENTS_PAYLOAD_" + _env_key(key)] = text
        for key, template in job.subscription.env.items():
            env[key] = template.render(values).replace("\x00", "")
        return env

    def prepare(self, job: Job):
        """What a run needs, filled: hook_runner.Commands for a system hook, a callable for a G-code one."""
        subscription = job.subscription
        values = self.values(job)
        job.started = time.monotonic()
        if subscription.type == "gcode":
            return functools.partial(self._send_gcode, job, values)
        payload_json = placeholders.to_json(job.payload)
        argvs = self.plan(job, values)
        if subscription.debug:
            log.info("hook %r on %s: running %s", subscription.name, job.name, json.dumps(argvs))
        env = self.environment(job, values, payload_json)
        # Everything the run starts inherits it: how its leftovers are found once re-parented to this process.
        env[hook_runner.RUN_MARKER] = hook_runner.new_run_marker()
        return hook_runner.Commands(argvs, env, subscription.cwd, payload_json.encode("utf-8", "replace"),
                                    subscription.timeout, subscription.detach)

    def outcome(self, job: Job, outcome) -> tuple[str, dict]:
        """(result event name, payload) from what the runs report for a job."""
        subscription = job.subscription
        if isinstance(outcome, hook_runner.Refused):
            name, fields = FAILED, {"stderr": outcome.message, "argv": outcome.argv}
        elif isinstance(outcome, BaseException):
            name, fields = FAILED, {"stderr": f"internal error: {outcome!r}"}
        elif isinstance(outcome, tuple):
            name, fields = outcome
        else:
            last = outcome[-1]
            name = TIMED_OUT if last.timed_out else FINISHED if last.ok else FAILED
            fields = {"argv": list(last.argv), "returncode": last.returncode, "stderr": _text(last.stderr),
                      "stdout": _text(last.stdout), "started": outcome[0].started_ns // 1000}
        payload = {"subscription": subscription.name, "event": job.name, "depth": job.depth,
                   "type": subscription.type, "duration": time.monotonic() - (job.started or time.monotonic())}
        payload.update(fields)
        self._log(subscription, name, payload)
        return name, _events.complete_payload(name, payload)

    def execute(self, job: Job) -> tuple[str, dict]:
        """Run one job here and now (``zevents hooks test --run``); the service drives many at once through Runs."""
        try:
            spec = self.prepare(job)
        except hook_runner.Refused as exc:
            return self.outcome(job, exc)
        if not isinstance(spec, hook_runner.Commands):
            return self.outcome(job, spec())
        results = []
        for argv in spec.argvs:
            results.append(hook_runner.run(argv, spec.env, spec.cwd, spec.stdin, spec.timeout, self.on_started,
                                           detach=spec.detach))
            if not results[-1].ok:
                break
        return self.outcome(job, results)

    def _request_gcode(self, endpoint: str, lines: list, timeout: float) -> dict:
        # One client, one request at a time: the lines go to one printer, in order, whichever hook sends them.
        with self._gcode_lock:
            client = self._gcode_client
            if client is None or client.endpoint != endpoint:
                if client is not None:
                    client.close()
                client = self._gcode_client = channel.CommandClient(endpoint)
            return client.gcode(lines, src="hook", timeout=timeout)

    def _send_gcode(self, job: Job, values) -> tuple[str, dict]:
        lines = self.plan(job, values)
        fields = {"argv": lines, "returncode": None, "stderr": "", "stdout": "", "started": time.time_ns() // 1000}
        endpoint = self.endpoint_for(job)
        if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
            fields["stderr"] = (f"the printer link is not running: no command channel at {endpoint} "
                                "(start the printer link, or set printer.commands)")
            return FAILED, fields
        if job.subscription.debug:
            log.info("hook %r on %s: sending %s", job.subscription.name, job.name, json.dumps(lines))
        try:
            reply = self._request_gcode(endpoint, lines, min(job.subscription.timeout, GCODE_REPLY_TIMEOUT))
        except channel.ChannelError as exc:
            fields.update(returncode=1, stderr=str(exc))
            return FAILED, fields
        fields.update(returncode=0, stdout=json.dumps({k: v for k, v in reply.items() if k != "id"}, default=str))
        return FINISHED, fields

    @staticmethod
    def _log(subscription: Subscription, name: str, payload: dict):
        if name == FINISHED:
            if subscription.debug:
                log.info("hook %r on %s finished in %.3f s; output: %s", subscription.name, payload["event"],
                         payload["duration"], payload.get("stdout", "")[-500:])
            return
        what = "timed out after" if name == TIMED_OUT else "failed after"
        log.warning("hook %r on %s %s %.3f s (%s, exit %s); stderr: %s", subscription.name, payload["event"], what,
                    payload["duration"], json.dumps(payload.get("argv"))[:300], payload.get("returncode"),
                    (payload.get("stderr") or "")[-500:] or "(none)")

    def close(self):
        with self._gcode_lock:
            if self._gcode_client is not None:
                self._gcode_client.close()
                self._gcode_client = None


# --- the service -----------------------------------------------------------------------------------------------

class HooksService:
    """Subscriber loop + runs + result publisher.  ``serve()`` blocks until ``stop()``; ``close()`` after."""

    def __init__(self, config, context=None, on_started=None):
        hook_runner.ensure_std_fds()
        hook_runner.ORPHANS.become_subreaper()  # a hook's setsid children are re-parented here, not to init
        self._released = False
        self.config = config
        self.context = context
        self.runner = HookRunner(config, on_started)
        self.states = PrinterStates()
        self.stats: collections.Counter = collections.Counter()
        self.subscriptions: list = []
        self.table: dict = {}
        self.runs = hook_runner.Runs(1, self.runner.prepare, self._complete, on_started)  # sized by _install
        self._publisher = None
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._reload_at: float | None = None
        self._reload_reason = ""
        self._config_text = self._read(config.path) if config.path else None
        self.ready = threading.Event()
        self.subscriber = None
        self.started_us = wire.now_us()
        self.problems = self._install(config)

    # --- configuration --------------------------------------------------------------------------------------

    @staticmethod
    def _read(path):
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError):
            return None

    def _install(self, config) -> list:
        subscriptions, problems = hook_subscriptions.compile_section(config)
        for problem in problems:
            (log.error if problem.skips else log.warning)("%s%s", problem,
                                                          " — subscription left out" if problem.skips else "")
        enabled = bool(config.get("events", "enabled", default=True))
        table: dict = {}
        if enabled:
            for subscription in subscriptions:
                if subscription.enabled:
                    for name in subscription.events:
                        table.setdefault(name, []).append(subscription)
        else:
            log.info("event hooks are disabled (events.enabled: false)")
        self.subscriptions = subscriptions
        self.table = table
        self.active = len({id(s) for runs_on in table.values() for s in runs_on})
        workers = int(config.get("hooks", "workers", default=4))
        self.runs.set_limit(workers)
        self.runs.max_queued = int(config.get("hooks", "max_queued", default=DEFAULT_MAX_QUEUED))
        log.info("%d subscription(s) active on %d event name(s), %d left out, %d worker(s)", self.active, len(table),
                 len(config.get("events", "subscriptions", default=None) or []) - len(subscriptions), workers)
        return problems

    def request_reload(self, reason: str, delay: float = 0.0):
        """Ask the subscriber loop to reload (safe from a signal handler or another thread)."""
        self._reload_reason = reason
        self._reload_at = time.monotonic() + delay

    def reload(self) -> bool:
        """Re-read the config file; the new subscriptions replace the old ones, or the old ones stay (logged)."""
        reason, self._reload_at = self._reload_reason, None
        path = self.config.path
        if path is None:
            log.warning("reload (%s): running on the embedded default config; nothing to reload", reason)
            return False
        text = self._read(path)
        if text is None:
            log.error("reload (%s): cannot read %s; the previous configuration stays in force", reason, path)
            self.stats["reload_failed"] += 1
            return False
        if text == self._config_text and reason != "SIGHUP":
            return False
        try:
            new = zconfig.load(path)
        except zconfig.ConfigError as exc:
            log.error("reload (%s): %s; the previous configuration stays in force", reason, exc)
            self.stats["reload_failed"] += 1
            return False
        if new.get("bus") != self.config.get("bus"):
            log.warning("reload: the bus: section changed; it takes effect when the hooks service restarts")
        self.config = new
        self._config_text = text
        self.runner.reconfigure(new)
        self.problems = self._install(new)
        self.stats["reloads"] += 1
        self._publish("SettingsUpdated", {"service": "hooks", "path": path, "reason": reason,
                                          "subscriptions": self.active})
        log.info("configuration reloaded from %s (%s)", path, reason)
        return True

    # --- runs ---------------------------------------------------------------------------------------------

    def start(self):
        if self._publisher is None:
            self._publisher = bus.Publisher(self.config, src="hook", printer=self.config.get("printer", "name"),
                                            context=self.context)
        self.runs.start()

    @property
    def max_running(self) -> int:
        return self.runs.max_active

    def _complete(self, job: Job, outcome):
        """On the serving thread (the G-code thread for G-code hooks): count the run and publish its result."""
        name, payload = self.runner.outcome(job, outcome)
        self._publish(name, payload, count=True)

    def _publish(self, name: str, payload: dict, count: bool = False):
        with self._publish_lock:  # the publisher's socket and the counters are shared by the workers
            if count:
                self.stats[name] += 1
            if self._publisher is None:
                return
            try:
                self._publisher.publish(name, payload)
            except Exception as exc:  # an unpackable value in a payload; the run itself already happened
                log.error("cannot publish %s: %s", name, exc)

    # --- the subscriber loop --------------------------------------------------------------------------------

    def dispatch(self, envelope) -> int:
        """Match one event; queue the runs it admits.  Returns how many."""
        name = envelope.name
        payload = envelope.payload
        printer_state = self.states.of(envelope.printer)
        printer_state.apply(name, payload)
        subscriptions = self.table.get(name)
        if not subscriptions:
            return 0
        if envelope.ts < self.started_us:
            # A resynchronising subscriber (broker restarted or unreachable at start) replays the broker's ring from
            # its beginning: events from before this service started are state, never a reason to run a hook.
            self.stats["before_start"] += 1
            return 0
        # A publisher that left out catalogue keys: they render empty without a "missing" warning.
        payload = _events.complete_payload(name, payload)
        depth = 0
        if envelope.group == "hook":
            depth = payload.get("depth")
            depth = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0 else 1
        state = dict(printer_state.values)
        queued = 0
        for subscription in subscriptions:
            if self.admit(subscription, envelope.group, name, payload, depth):
                job = Job(subscription, name, payload, envelope.ts, state, depth + 1)
                if self.runs.submit(job):
                    queued += 1
                else:
                    self._overflow(job)
        return queued

    def _overflow(self, job: Job):
        """A full queue: the run is refused, and says so on the bus like any failed run."""
        why = (f"not run: {self.runs.backlog} runs are already waiting (hooks.max_queued); hooks are slower than "
               "the events that trigger them")
        if ("overflow", None) not in job.subscription.warned:
            job.subscription.warned.add(("overflow", None))
            log.error("hook %r on %s %s (logged once; each refused run publishes HookFailed)",
                      job.subscription.name, job.name, why)
        payload = {"subscription": job.subscription.name, "event": job.name, "depth": job.depth,
                   "type": job.subscription.type, "duration": 0.0, "argv": None, "returncode": None,
                   "stderr": why, "stdout": "", "started": None}
        self.stats["refused"] += 1
        self._publish(FAILED, _events.complete_payload(FAILED, payload), count=True)

    def admit(self, subscription: Subscription, group: str, name: str, payload: dict, depth: int) -> bool:
        if group == "hook":
            if payload.get("subscription") == subscription.name:
                self._refuse(subscription, "self", "does not run on the results of its own runs (a loop)")
                return False
            if depth + 1 > MAX_HOOK_DEPTH:
                self._refuse(subscription, "depth", f"not run: a chain of {MAX_HOOK_DEPTH} hooks triggered by "
                                                    "hook results ends here (a loop?)")
                return False
        if subscription.filter and not subscription.matches_filter(payload):
            self.stats["filtered"] += 1
            return False
        if subscription.min_interval:
            now = time.monotonic()
            last = subscription.last_admitted
            if last is not None and now - last < subscription.min_interval:
                self.stats["rate_limited"] += 1
                if subscription.debug:
                    log.info("hook %r: %s skipped (min_interval %.3g s)", subscription.name, name,
                             subscription.min_interval)
                return False
            subscription.last_admitted = now
        return True

    def _refuse(self, subscription: Subscription, kind: str, why: str):
        self.stats[f"loop_{kind}"] += 1
        if ("loop", kind) not in subscription.warned:
            subscription.warned.add(("loop", kind))
            log.warning("hook %r %s", subscription.name, why)

    def groups(self):
        """The groups to receive: all of them, except our own results (``hook``) when no hook runs on those."""
        if any(_events.group_of(name) == "hook" for name in self.table):
            return None
        return {group for group in _events.GROUPS if group != "hook"}

    def _resubscribe(self, old):
        """A subscriber for ``groups()`` that goes on exactly where ``old`` stopped (a group ``old`` did not
        follow starts now)."""
        while True:
            envelope = old.recv(0)
            if envelope is None:
                break
            self.dispatch(envelope)
        try:
            status = old.control.status(2.0)
        except bus.BusError as exc:
            log.warning("cannot change the groups followed (%s); trying again at the next reload", exc)
            return old
        if status["epoch"] != old.epoch:
            new = bus.Subscriber(self.config, groups=self.groups(), context=self.context)
        else:
            followed = old.groups
            since = {group: (old.last_seq.get(group, 0) if followed is None or group in followed else seq)
                     for group, seq in status["streams"].items()}
            since.update({group: seq for group, seq in old.last_seq.items() if group not in since})
            new = bus.Subscriber(self.config, groups=self.groups(), since=since, epoch=old.epoch,
                                 context=self.context)
        old.close()
        return new

    def serve(self):
        """Run until stop(): subscribe, learn the printer state, dispatch events, drive the runs, reload when asked."""
        self.start()
        subscriber = self.subscriber = bus.Subscriber(self.config, groups=self.groups(), context=self.context)
        runs = self.runs
        poller = runs.poller
        poller.register(subscriber.sock, zmq.POLLIN)
        try:
            try:
                self.states.load(subscriber.snapshot(STATE_GROUPS))
            except bus.BusError as exc:
                log.warning("no snapshot from the broker (%s): printer state unknown until events arrive", exc)
            self.ready.set()
            log.info("hooks service ready: subscribed at %s", self.config.bus.publish)
            dispatch, handle, monotonic = self.dispatch, runs.handle, time.monotonic
            reap_at = 0.0
            while not self._stop.is_set():
                sock = subscriber.sock
                wait = min(runs.next_deadline() - monotonic(), SERVE_TICK)
                for ready, _ in poller.poll(max(0.0, wait) * 1000):
                    if ready is sock:
                        envelope = subscriber.recv(0)
                        while envelope is not None:
                            dispatch(envelope)
                            envelope = subscriber.recv(0)
                    else:
                        handle(ready)
                runs.check_time(monotonic())
                if monotonic() >= reap_at:
                    reap_at = monotonic() + SERVE_TICK
                    hook_runner.ORPHANS.reap()
                if self._reload_at is not None and monotonic() >= self._reload_at:
                    if self.reload() and self.groups() != subscriber.groups:
                        poller.unregister(subscriber.sock)
                        subscriber = self.subscriber = self._resubscribe(subscriber)
                        poller.register(subscriber.sock, zmq.POLLIN)
        finally:
            poller.unregister(subscriber.sock)
            subscriber.close()

    def stop(self):
        self._stop.set()

    def close(self, grace: float = 5.0):
        """Stop running hooks: running ones get ``grace`` seconds (then their process groups are killed), queued
        ones are not started.  Call once ``serve()`` has returned (or was never called)."""
        self._stop.set()
        self.runs.stop(grace)
        if not self._released:
            self._released = True
            hook_runner.ORPHANS.release()
        if self.runs.not_started:
            log.warning("%d queued hook run(s) were not started because the service stopped",
                        self.runs.not_started)
        self.runner.close()
        if self._publisher is not None:
            self._publisher.close(linger=1.0)
            self._publisher = None


def watch_config(service: HooksService, path: str):
    """A watchdog observer that asks for a reload when the config file is written, replaced or moved into place."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    target = os.path.realpath(path)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type not in ("modified", "created", "moved", "closed"):
                return
            paths = (event.src_path, getattr(event, "dest_path", "") or "")
            if any(p and os.path.realpath(p) == target for p in paths):
                # Editors write in several steps: wait for the file to settle.
                service.request_reload("file changed", delay=0.2)

    observer = Observer()
    observer.schedule(Handler(), os.path.dirname(target) or ".", recursive=False)
    observer.daemon = True
    observer.start()
    return observer


def run(config) -> int:
    """`zevents hooks`: serve until SIGINT/SIGTERM; SIGHUP or a change of the file reloads it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hook_runner.ORPHANS.become_subreaper(reap_all=True)  # this process's every child is a hook's
    service = HooksService(config)

    def on_stop(signum, frame):
        service.stop()

    def on_hup(signum, frame):
        service.request_reload("SIGHUP")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    def announce_when_subscribed():
        if service.ready.wait(60):
            bus.announce_started(config, "hooks")  # the node supervisor waits for this before Startup

    threading.Thread(target=announce_when_subscribed, name="zevents-hooks-announce", daemon=True).start()
    observer = None
    if config.path:
        try:
            observer = watch_config(service, config.path)
        except Exception as exc:  # inotify limits, unsupported file systems: SIGHUP still works
            log.warning("cannot watch %s for changes (%s); reload with SIGHUP", config.path, exc)
    freeze_startup_heap()
    try:
        service.serve()
    finally:
        if observer is not None:
            observer.stop()
            observer.join(2.0)
        service.close()
    log.info("hooks service stopped (%s)", ", ".join(f"{k} {v}" for k, v in sorted(service.stats.items())) or
             "no runs")
    return 0


# --- `zevents hooks test` --------------------------------------------------------------------------------------

def _snapshot_state(config) -> tuple[dict, str | None]:
    state = PrinterState()
    try:
        subscriber = bus.Subscriber(config, groups=list(STATE_GROUPS), control_timeout=0.3)
    except Exception as exc:
        return state.values, str(exc)
    try:
        state.load(subscriber.snapshot(timeout=0.3))
        return state.values, None
    except bus.BusError as exc:
        return state.values, str(exc)
    finally:
        subscriber.close()


def run_test(config, event: str, payload_json: str | None, execute: bool, out=None) -> int:
    """Which subscriptions match an event and what each would run (or, with ``execute``, runs them).

    Exit code: 0 when at least one subscription would run (and, with ``execute``, every run finished), else 1;
    2 for bad arguments."""
    out = out or sys.stdout
    err = sys.stderr
    payload = {}
    if payload_json:
        try:
            payload = json.loads(payload_json)
        except json.JSONDecodeError as exc:
            print(f"zevents: --payload is not valid JSON: {exc}", file=err)
            return 2
        if not isinstance(payload, dict):
            print("zevents: --payload must be a JSON object", file=err)
            return 2
    name, why = hook_subscriptions.check_event_name(event)
    if why:
        print(f"zevents: {why}", file=err)
        return 2
    if not _events.is_known(name):
        print(f"note: {name} is not in the catalogue: a custom event (topic custom/{name})", file=err)
    payload = _events.complete_payload(name, payload)
    subscriptions, problems = hook_subscriptions.compile_section(config)
    for problem in problems:
        print(f"{'error' if problem.skips else 'warning'}: {problem}", file=err)
    state, no_state = _snapshot_state(config)
    if no_state:
        print(f"note: no printer state from the broker ({no_state}); generic placeholders show their defaults",
              file=err)
    enabled = bool(config.get("events", "enabled", default=True))
    if not enabled:
        print("note: events.enabled is false: the service runs no hook", file=err)
    matching = [s for s in subscriptions if name in s.events]
    if not matching:
        print(f"no subscription runs on {name}", file=out)
        return 1
    runner = HookRunner(config)
    if execute:
        hook_runner.ORPHANS.become_subreaper(reap_all=True)
    ts = int(time.time() * 1e6)
    would_run = 0
    failures = 0
    try:
        for subscription in matching:
            job = Job(subscription, name, payload, ts, dict(state))
            header = f"{subscription.name!r} [{subscription.type}]"
            if not subscription.enabled or not enabled:
                print(f"{header}: disabled ({'enabled: false' if enabled else 'events.enabled: false'})", file=out)
                continue
            if subscription.filter and not subscription.matches_filter(payload):
                wanted = ", ".join(f"{'.'.join(k)} in {list(v)}" for k, v in subscription.filter.items())
                print(f"{header}: filtered out (filter: {wanted})", file=out)
                continue
            try:
                planned = runner.plan(job)
            except hook_runner.Refused as exc:
                failures += 1
                print(f"{header}: refused: {exc.message}", file=out)
                continue
            would_run += 1
            print(f"{header}:", file=out)
            for item in planned:
                print(f"  {'gcode' if subscription.type == 'gcode' else 'argv'}: "
                      f"{json.dumps(item, ensure_ascii=False)}", file=out)
            if execute:
                result, fields = runner.execute(job)
                failures += result != FINISHED
                print(f"  -> {result}: returncode {fields['returncode']}, {fields['duration']:.3f} s", file=out)
                for stream in ("stdout", "stderr"):
                    if fields.get(stream):
                        print(f"     {stream}: {fields[stream].rstrip()}", file=out)
    finally:
        runner.close()
    return 0 if would_run and not failures else 1
