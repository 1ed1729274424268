"""The printer link's command channel: how the CLI and the hooks service ask the link to do things.

It is a ROUTER socket owned by the link (``printer.commands`` endpoint, an ipc socket in the node's 0700 runtime
directory by default) and never the PUB/SUB bus, so no event on the bus can move the printer.  Requests and replies
use the control framing of ``zevents.wire`` (command, msgpack argument map; reply OK/ERR + map).

Commands (argument maps in brackets):
  GCODE {lines: [str], src: str}   send lines in order (parsed, may be suppressed); reply {accepted, suppressed}
  CONNECT {port?, baudrate?} / DISCONNECT {}
  SELECT {path} / DESELECT {}      select a local file for printing
  PRINT {path?}                    start printing the selected (or given) file
  PAUSE {} / RESUME {} / CANCEL {}
  SD_LIST {} / SD_UPLOAD {path, remote?} / SD_PRINT {remote}
  STATUS {}                        state, job, position, temperatures
A request the link cannot honour now (not connected, no file selected, ...) gets ERR with a clear ``error``.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import zmq

from zevents import wire

COMMANDS = ("GCODE", "CONNECT", "DISCONNECT", "SELECT", "DESELECT", "PRINT", "PAUSE", "RESUME", "CANCEL",
            "SD_LIST", "SD_UPLOAD", "SD_PRINT", "STATUS")


class ChannelError(RuntimeError):
    """The link refused the request or did not answer."""


def endpoint(config) -> str:
    return config.endpoint("printer", "commands", "printer.sock")


class CommandClient:
    """Sends requests to the link; one outstanding request at a time, stale replies discarded."""

    _ids = itertools.count(1)
    commands = COMMANDS           # other services' channels (zevents.files.channel) reuse this client
    service = "the printer link"
    start_hint = "zevents printer"

    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.sock = None

    def request(self, command: str, args: dict | None = None, timeout: float = 10.0) -> dict:
        if command not in self.commands:
            raise ValueError(f"unknown command {command!r} for {self.service}")
        if self.sock is None:
            socket_file = self.endpoint[len("ipc://"):] if self.endpoint.startswith("ipc://") else None
            if socket_file is not None and not os.path.exists(socket_file):
                # nobody bound it: say so now instead of waiting out the timeout
                raise ChannelError(f"{self.service} is not running (no socket at {socket_file}; start it with "
                                   f"`{self.start_hint}`)")
            self.sock = self.context.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
        request_id = next(self._ids)
        self.sock.send_multipart(wire.request(command.encode(), dict(args or {}, id=request_id)))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(remaining * 1000):
                self.close()
                raise ChannelError(f"{self.service} at {self.endpoint} did not answer within {timeout:g} s "
                                   f"(is `{self.start_hint}` running?)")
            ok, meta, _ = wire.parse_reply(self.sock.recv_multipart())
            if meta.get("id") != request_id:
                continue
            if not ok:
                error = ChannelError(meta.get("error") or "refused")
                error.reply = meta   # the whole ERR map (the files channel adds a ``code``)
                raise error
            return meta

    def gcode(self, lines, src: str = "user", timeout: float = 10.0) -> dict:
        if isinstance(lines, str):
            lines = lines.splitlines()
        return self.request("GCODE", {"lines": list(lines), "src": src}, timeout)

    def close(self):
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def request_or_report(client: CommandClient, command: str, args: dict | None = None,
                      timeout: float = 10.0) -> dict | None:
    """One request for a CLI command, then the client closed: the reply (without its id), or None after printing
    why not as one line on stderr."""
    try:
        reply = client.request(command, args, timeout=timeout)
        reply.pop("id", None)
        return reply
    except ChannelError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def bind(endpoint: str, context, service: str, error=RuntimeError) -> "CommandServer":
    """The command channel of ``service`` ("the files service"), or ``error`` saying why it cannot be bound: the
    one place every service's start says so."""
    try:
        return CommandServer(endpoint, context)
    except zmq.ZMQError as exc:
        raise error(f"cannot bind the command channel of {service} at {endpoint}: {exc} "
                    f"(is another one running?)") from None


class CommandServer:
    """The link's side: a ROUTER that yields (reply_to, command, args) and sends replies."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self.context = context or zmq.Context.instance()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._ipc_file = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None

    def receive(self):
        """One pending request as (reply_to, command, args), or None when none is waiting or it was malformed."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        reply_to, rest = [frames[0]], frames[1:]
        if rest and rest[0] == b"":
            reply_to.append(b"")
            rest = rest[1:]
        try:
            command = rest[0].decode()
            args = wire.unpack(rest[1])
            if not isinstance(args, dict):
                raise ValueError("arguments are not a map")
        except Exception as exc:
            self.sock.send_multipart(reply_to + wire.reply(False, {"error": f"malformed request: {exc}"}))
            return None
        return reply_to, command, args

    def reply(self, reply_to: list, args: dict, ok: bool = True, **meta):
        meta["id"] = args.get("id")
        try:
            self.sock.send_multipart(reply_to + wire.reply(ok, meta), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the requester went away

    def close(self):
        self.sock.close(linger=0)
        if self._ipc_file:  # no stale socket for the next node
            try:
                import os

                os.unlink(self._ipc_file)
            except OSError:
                pass
            self._ipc_file = None
