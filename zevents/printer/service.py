"""The `zevents printer` process: one printer link, its print jobs, the command channel server, and the bus
Publisher.

One thread (the service loop) owns every ZeroMQ socket: it serves the command channel (``printer.commands``) and
publishes the events that the link's and the jobs' threads put on a queue, each with the ``src`` they were given
(``job``, ``user``, ``hook``, ``firmware``).  Requests that wait for the printer (connect, pause, SD operations)
run on the jobs worker; their replies are sent by the loop when they finish, so the channel stays responsive.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from pathlib import Path

import zmq

from zevents import bus as zbus
from zevents.printer import channel
from zevents.printer.job import JobError, Jobs, sd_name_problem
from zevents.printer.link import MAX_LINE, LinkError, PrinterLink
from zevents.printer.reconnect import Reconnector
from zevents.service import freeze_startup_heap

log = logging.getLogger("zevents.printer.service")

LOOP_INTERVAL = 1.0    # seconds the loop may sleep: events and finished jobs wake it through a pipe
VIRTUAL = "VIRTUAL"
SRC_VALUES = ("user", "hook", "job", "firmware")

# Commands that move an axis, extrude, or start a print by themselves.  Hooks run on bus events (anyone on the
# machine can fire one), so these are refused from hooks unless printer.allow_bus_commands says otherwise.
MOTION_COMMANDS = frozenset({
    "G0", "G1", "G2", "G3", "G5", "G10", "G11", "G12", "G26", "G27", "G28", "G29", "G30", "G33", "G34", "G35",
    "G38.2", "G38.3", "G38.4", "G38.5", "G425", "M24", "M32", "M33", "M125", "M600", "M701", "M702", "M808"})


_FIRST_WORD = re.compile(r"\s*(?:N\d+\s*)?([GMT])0*(\d+(?:\.\d+)?)", re.IGNORECASE)


def moves_the_printer(line: str) -> bool:
    """True when a G-code line moves the printer (motion, homing, probing, extrusion, tool change, SD start)."""
    match = _FIRST_WORD.match(line.split(";", 1)[0])
    if match is None:
        return False
    letter, number = match.group(1).upper(), match.group(2)
    return letter == "T" or f"{letter}{number}" in MOTION_COMMANDS


class ServiceError(RuntimeError):
    """The service cannot start (endpoint in use, virtual printer unavailable, bad settings)."""


class PrinterService:
    """Everything `zevents printer` runs, startable in-process (tests run it on a thread)."""

    def __init__(self, config, port: str | None = None, baud: int | None = None, virtual: bool = False,
                 context: zmq.Context | None = None, connect: bool = True):
        self.config = config
        section = config.get("printer") or {}
        self.section = section
        port = port or section.get("port") or VIRTUAL
        self.virtual = virtual or str(port).upper() == VIRTUAL
        self.port = None if self.virtual else str(port)
        self.baud = int(baud if baud is not None else (section.get("baudrate") or 0))
        self.context = context or zmq.Context.instance()
        self.autoconnect = connect
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.publisher = None
        self.server = None
        self.virtual_printer = None
        self.link: PrinterLink | None = None
        self.reconnector: Reconnector | None = None
        self.jobs: Jobs | None = None
        self._pending: list = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self):
        """Bind the command channel, start the virtual printer if asked, create the link (not yet connected)."""
        self.server = channel.bind(channel.endpoint(self.config), self.context, "the printer link", ServiceError)
        self.publisher = zbus.Publisher(self.config, src="firmware", printer=self.config.get("printer", "name"),
                                        context=self.context)
        if self.virtual:
            self.port = self._start_virtual()
            if not self.baud:
                self.baud = 115200
        self.link = PrinterLink(
            self.port, self.baud, emit=self._enqueue_event, parser_config=self.config.get("parser"),
            window=int(self.section.get("window") or 4), timeout=float(self.section.get("timeout") or 10.0),
            retries=int(self.section.get("retries", 3)), max_line=int(self.section.get("max_line", MAX_LINE)))
        self.jobs = Jobs(self.link, scripts=self.section.get("scripts") or {},
                         abort_heatup_on_cancel=self.section.get("abort_heatup_on_cancel", True) is not False)
        if self.section.get("reconnect", True):
            self.reconnector = Reconnector(self.link, self._reconnect_attempt)
            self.reconnector.want(self.autoconnect)
            self.reconnector.start()
        if self.autoconnect:
            future = self.jobs.submit(self._connect)
            future.add_done_callback(self._wake)
            self._pending.append((future, None, None))

    def _start_virtual(self) -> str:
        try:
            from zevents.printer.virtual import VirtualPrinter
        except ImportError as exc:
            raise ServiceError(f"the virtual printer is not available: {exc}") from None
        settings = self.section.get("virtual") or {}
        sd_dir = Path(self.config.data_dir) / "virtual-sd"
        if self.config.get("printers"):  # one of a `printers:` list: an SD card of its own
            sd_dir = sd_dir / self.section["name"]
        sd_dir.mkdir(parents=True, exist_ok=True)
        # the printer profile (printer.profile, else the default) gives the virtual printer its bed and extruders
        from zevents.printer.profiles import ProfileError, build_box, selected

        try:
            profile = selected(self.config)
        except ProfileError as exc:
            log.warning("printer: %s; the virtual printer gets one extruder and no bed limits", exc)
            profile = None
        tools = settings.get("tools")
        if tools is None:
            tools = min(8, int(profile["extruder"]["count"])) if profile else 1
        self.virtual_printer = VirtualPrinter(firmware=settings.get("firmware", "marlin"),
                                              speed=float(settings.get("speed", 100.0)),
                                              tools=int(tools), sd_dir=str(sd_dir),
                                              bed=build_box(profile) if profile else None)
        self.virtual_printer.start()
        log.info("printer: virtual %s printer on %s", settings.get("firmware", "marlin"), self.virtual_printer.port)
        return self.virtual_printer.port

    def _reconnect_attempt(self) -> bool:
        """One attempt of the reconnect loop, on the jobs worker like every other connect."""
        try:
            self.jobs.submit(self._connect).result()
        except (JobError, LinkError):
            return False
        return True

    def _connect(self) -> dict:
        if self.link.connected:
            raise JobError(f"already connected to {self.link.port}")
        if not self.link.connect():
            raise JobError(self.link.error or "connection failed")
        return {"port": self.link.port, "baudrate": self.link.baudrate}

    def serve(self):
        """The service loop: requests in, events out, until stop()."""
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(LOOP_INTERVAL * 1000):
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                while True:
                    request = self.server.receive()
                    if request is None:
                        break
                    self._handle(*request)
            self._reply_finished()
            self._publish_events()
        self._publish_events()

    def _wake(self, *_):
        """Any thread: make the service loop look at its queues now (an idle loop sleeps, it does not poll)."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means "wake up"

    def stop(self):
        self._stop.set()
        self._wake()

    def close(self):
        """Disconnect politely, publish what is left, release everything."""
        if self.reconnector is not None:
            self.reconnector.stop()
        if self.link is not None and self.link.connected:
            try:
                self.link.disconnect(timeout=2.0)
            except Exception:
                log.exception("printer: disconnect failed")
        if self.jobs is not None:
            self.jobs.close()
        self._publish_events()
        if self.virtual_printer is not None:
            self.virtual_printer.stop()
        if self.server is not None:
            self.server.close()
        if self.publisher is not None:
            self.publisher.close(linger=2.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # --- events --------------------------------------------------------------------------------------------------

    def _enqueue_event(self, name: str, payload: dict, src: str):
        self.events.put((name, payload, src))
        self._wake()

    def _publish_events(self):
        events = self.events
        publish = self.publisher.publish
        while True:
            try:
                name, payload, src = events.get_nowait()
            except queue.Empty:
                return
            publish(name, payload, src)

    # --- requests ------------------------------------------------------------------------------------------------

    def _handle(self, reply_to, command: str, args: dict):
        server = self.server
        try:
            if command == "STATUS":
                server.reply(reply_to, args, True, **self.jobs.status())
            elif command == "GCODE" and args.get("wait"):
                # The answers may take minutes (M109): a thread of its own waits, the loop and the jobs worker
                # (pause, cancel) stay free.
                lines, src = self._gcode_lines(args)
                future = concurrent.futures.Future()
                future.add_done_callback(self._wake)

                def wait_for_answers():
                    try:
                        future.set_result(self.link.request(lines, src, timeout=float(args.get("timeout") or 600)))
                    except Exception as exc:  # LinkError and the like: the reply says it
                        future.set_exception(exc)

                threading.Thread(target=wait_for_answers, name="gcode-request", daemon=True).start()
                self._pending.append((future, reply_to, args))
            elif command == "GCODE":
                server.reply(reply_to, args, True, **self._gcode(args))
            elif command in self._JOB_COMMANDS:
                future = self.jobs.submit(self._JOB_COMMANDS[command], self, args)
                future.add_done_callback(self._wake)
                self._pending.append((future, reply_to, args))
            else:
                server.reply(reply_to, args, False, error=f"unknown command {command!r}")
        except (JobError, LinkError, ValueError) as exc:
            server.reply(reply_to, args, False, error=str(exc))

    def _gcode(self, args: dict) -> dict:
        lines, src = self._gcode_lines(args)
        accepted, suppressed = self.link.send(lines, src=src)
        return {"accepted": accepted, "suppressed": suppressed}

    def _gcode_lines(self, args: dict) -> tuple:
        """The lines and src of a GCODE request, checked (ValueError/LinkError say what is wrong)."""
        lines = args.get("lines")
        if isinstance(lines, str):
            lines = lines.splitlines()
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise ValueError("GCODE needs 'lines', a list of strings")
        src = args.get("src") or "user"
        if src not in SRC_VALUES:
            raise ValueError(f"src must be one of {', '.join(SRC_VALUES)}, not {src!r}")
        if src == "hook" and not self.section.get("allow_bus_commands"):
            moving = [line for line in lines if moves_the_printer(line)]
            if moving:
                raise LinkError(f"refused {moving[0].strip()!r}: G-code sent by hooks (triggered by bus events) may "
                                "not move the printer unless printer.allow_bus_commands is true")
        if not self.link.connected:
            raise LinkError(f"the printer is not connected (state: {self.link.status()['state_string']})")
        return lines, src

    def _reply_finished(self):
        if not self._pending:
            return
        still = []
        for future, reply_to, args in self._pending:
            if not future.done():
                still.append((future, reply_to, args))
                continue
            try:
                result = future.result()
            except (JobError, LinkError, ValueError) as exc:
                if reply_to is not None:
                    self.server.reply(reply_to, args, False, error=str(exc))
                else:
                    log.error("printer: %s", exc)
                continue
            except Exception as exc:
                log.exception("printer: request failed")
                if reply_to is not None:
                    self.server.reply(reply_to, args, False, error=f"internal error: {exc}")
                continue
            if not isinstance(result, dict):
                result = {"result": result}
            done = result.pop("done", None)
            if done is not None and args and args.get("wait"):
                # An SD upload the client waits for: reply once TransferDone is out, without blocking anything.
                waiting = concurrent.futures.Future()
                waiting.add_done_callback(self._wake)
                threading.Thread(target=lambda: (done.wait(), waiting.set_result(result)), daemon=True).start()
                still.append((waiting, reply_to, args))
                continue
            if reply_to is not None:
                self.server.reply(reply_to, args, True, **result)
        self._pending = still

    # Blocking requests, run on the jobs worker: (service, args) -> reply dict.
    def _cmd_connect(self, args):
        if self.link.connected:
            raise JobError(f"already connected to {self.link.port}")
        if args.get("port"):
            self.link.port = str(args["port"])
        if args.get("baudrate") is not None:
            self.link.baudrate = int(args["baudrate"])
        if self.reconnector is not None:
            self.reconnector.want(True)
        return self._connect()

    def _cmd_disconnect(self, args):
        if self.reconnector is not None:
            self.reconnector.want(False)  # also stops a reconnect loop waiting for an absent port
        if not self.link.connected:
            raise JobError("the printer is not connected")
        self.link.disconnect()
        return {}

    def _cmd_sd_list(self, args):
        return {"files": self.jobs.sd_list()}

    _JOB_COMMANDS = {
        "CONNECT": _cmd_connect,
        "DISCONNECT": _cmd_disconnect,
        "SELECT": lambda self, args: self.jobs.select(_required(args, "path")),
        "DESELECT": lambda self, args: self.jobs.deselect(),
        "PRINT": lambda self, args: self.jobs.start(args.get("path"), user=args.get("user")),
        "PAUSE": lambda self, args: self.jobs.pause(user=args.get("user")),
        "RESUME": lambda self, args: self.jobs.resume(user=args.get("user")),
        "CANCEL": lambda self, args: self.jobs.cancel(user=args.get("user")),
        "SD_LIST": _cmd_sd_list,
        "SD_UPLOAD": lambda self, args: self.jobs.sd_upload(_required(args, "path"), args.get("remote")),
        "SD_PRINT": lambda self, args: self.jobs.sd_print(_required(args, "remote"), user=args.get("user")),
    }


def _required(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing {key!r}")
    return value


def run(config, port: str | None = None, baud: int | None = None, virtual: bool = False,
        service_name: str = "printer") -> int:
    """`zevents printer`: run the link until SIGINT/SIGTERM; 1 if it cannot start.  ``service_name`` is the one
    the node knows it by (``printer:NAME`` when it runs several printers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = PrinterService(config, port=port, baud=baud, virtual=virtual)
    try:
        service.start()
    except (ServiceError, LinkError, ValueError) as exc:
        log.error("%s", exc)
        service.close()
        return 1

    def on_signal(signum, frame):
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    from zevents.bus import announce_started

    announce_started(config, service_name)  # the command channel answers from here on
    freeze_startup_heap()
    try:
        service.serve()
    finally:
        service.close()
    log.info("printer: stopped after %.1f s", time.monotonic() - started)
    return 0


# --- client commands (`zevents print|pause|resume|cancel|send|sd ...`) ------------------------------------------

def _client_request(config, command: str, args: dict | None = None, timeout: float = 10.0) -> dict | None:
    """One request to the running link; None after printing a one-line error on stderr."""
    return channel.request_or_report(channel.CommandClient(channel.endpoint(config)), command, args, timeout)


def run_print(config, file: str, user: str | None = None) -> int:
    """`zevents print FILE`: select a local file and start printing it."""
    import os
    import sys

    from zevents.parser import NotGcodeError, check_gcode_file, describe_file_error

    try:
        check_gcode_file(file)  # the check `zevents parse` makes, before anything reaches the printer
    except (OSError, NotGcodeError) as exc:
        print(f"zevents print: {describe_file_error(file, exc)}", file=sys.stderr)
        return 2
    reply = _client_request(config, "PRINT", {"path": os.path.abspath(file), "user": user})
    if reply is None:
        return 1
    print(f"printing {reply.get('name')} ({reply.get('size')} bytes)", file=sys.stderr)
    return 0


def run_connect(config, port: str | None = None, baud: int | None = None) -> int:
    """`zevents connect [--port DEV] [--baud N]`: connect the running link (to another port or rate if given)."""
    args = {key: value for key, value in (("port", port), ("baudrate", baud)) if value is not None}
    reply = _client_request(config, "CONNECT", args, timeout=120.0)
    if reply is None:
        return 1
    print(f"connected to {reply.get('port')} at {reply.get('baudrate')} baud", file=sys.stderr)
    return 0


def run_disconnect(config) -> int:
    """`zevents disconnect`: close the port (a running print fails); no reconnecting until `zevents connect`."""
    if _client_request(config, "DISCONNECT", {}, timeout=30.0) is None:
        return 1
    print("disconnected", file=sys.stderr)
    return 0


def run_control(config, command: str, user: str | None = None) -> int:
    """`zevents pause|resume|cancel`."""
    import json
    import sys

    reply = _client_request(config, command.upper(), {"user": user}, timeout=60.0)
    if reply is None:
        return 1
    reply.pop("id", None)
    if reply.get("position"):
        print(json.dumps({"position": reply["position"], "progress": reply.get("progress")}))
    print(f"{command.lower()}: done", file=sys.stderr)
    return 0


_COMMAND_WORD = re.compile(r"^[GM]\d+(?:\.\d+)?$", re.IGNORECASE)


def send_lines(arguments: list, stdin=None) -> list:
    """The G-code lines of `zevents send`'s arguments: an argument with a blank in it (quoted) or with newlines is
    whole lines; a bare G/M word starts a line and the words after it are its parameters (``M109 S0`` is one
    line); ``-`` reads lines from stdin."""
    lines: list = []
    joining = False
    for argument in arguments:
        argument = str(argument)
        if argument == "-":
            lines.extend((stdin or sys.stdin).read().splitlines())
            joining = False
        elif argument.strip() != argument or " " in argument or "\n" in argument or "\t" in argument:
            lines.extend(argument.splitlines())
            joining = False
        elif joining and not _COMMAND_WORD.match(argument):
            lines[-1] += " " + argument
        else:
            lines.append(argument)
            joining = True
    return [line for line in lines if line.strip()]


def run_send(config, arguments: list, src: str = "user", stdin=None) -> int:
    """`zevents send GCODE...`: sends the lines (see ``send_lines``), waits for the firmware's answer to each and
    prints it; 1 when the firmware refused a line (an error, an unknown command)."""
    lines = send_lines(arguments, stdin)
    if not lines:
        print("zevents send: nothing to send", file=sys.stderr)
        return 2
    reply = _client_request(config, "GCODE", {"lines": lines, "src": src, "wait": True, "timeout": 600},
                            timeout=660.0)
    if reply is None:
        return 1
    refused = []
    for answer in reply.get("answers") or []:
        for line in answer.get("replies") or []:
            print(line)
        if answer.get("refused"):
            refused.append(answer.get("line"))
    suppressed = reply.get("suppressed") or []
    print(f"sent {reply.get('accepted', 0)} line(s)" +
          (f", suppressed: {', '.join(suppressed)}" if suppressed else ""), file=sys.stderr)
    if not reply.get("complete", True):
        print("zevents send: not every answer came in time", file=sys.stderr)
        return 1
    if refused:
        print(f"zevents send: the printer refused: {', '.join(refused)}", file=sys.stderr)
        return 1
    return 0


def run_sd(config, action: str, file: str | None = None, remote: str | None = None, wait: bool = True) -> int:
    """`zevents sd ls|upload|print`."""
    import os
    import sys

    if action == "ls":
        reply = _client_request(config, "SD_LIST", {}, timeout=30.0)
        if reply is None:
            return 1
        for entry in reply.get("files") or []:
            size = entry.get("size")
            print(f"{entry.get('name')}\t{'' if size is None else size}")
        return 0
    if action == "upload":
        if not file or not os.path.isfile(file):
            print(f"zevents: no such file: {file}", file=sys.stderr)
            return 2
        if remote and (problem := sd_name_problem(remote)):
            print(f"zevents: --as {problem}", file=sys.stderr)
            return 2
        reply = _client_request(config, "SD_UPLOAD", {"path": os.path.abspath(file), "remote": remote,
                                                      "wait": wait}, timeout=3600.0 if wait else 30.0)
        if reply is None:
            return 1
        print(f"{'uploaded' if wait else 'uploading'} {reply.get('local')} as {reply.get('remote')}",
              file=sys.stderr)
        return 0
    if action == "print":
        name = remote or file
        if not name:
            print("zevents: which SD file? (zevents sd print NAME)", file=sys.stderr)
            return 2
        reply = _client_request(config, "SD_PRINT", {"remote": name}, timeout=30.0)
        if reply is None:
            return 1
        print(f"printing {name} from SD", file=sys.stderr)
        return 0
    print(f"zevents: unknown sd action {action!r} (ls, upload, print)", file=sys.stderr)
    return 2
