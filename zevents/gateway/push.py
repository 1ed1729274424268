"""The push socket: OctoPrint's SockJS websocket transport (``/sockjs/<server>/<session>/websocket``, ``o``/``h``/
``a[...]``/``c[...]`` framing, elements as JSON objects) and the raw ``/sockjs/websocket`` (one JSON object per
text frame), for `octoprint client listen`, farm managers and anything else that listens like OctoPrint's UI.

Owns each client's session: ``connected`` on open, ``auth`` against a login session, messages held back (100 at
most) until then, ``history`` then ``current`` at most every 0.5 s × ``throttle``, every bus event as
``{"event": {"type", "payload"}}`` to users with STATUS (user events to admins only; client events' payloads to
admins only), ``subscribe`` filters, heartbeats every 25 s.  Every client has an outbox written by its own task, so
a slow client never delays another, the gateway or the bus: a client whose socket has not taken a frame for
``STUCK_AFTER`` seconds while messages pile up is dropped, and so is one whose outbox reaches ``OUTBOX_HARD`` (a
burst from the bus may queue more than ``OUTBOX_SOFT`` for a client that reads; that is not a reason to drop it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import WSMsgType, web

from zevents.gateway.auth import Identity

log = logging.getLogger("zevents.gateway.push")

HELD_BACK = 100
OUTBOX_SOFT = 1000        # more waiting than this, with the client's socket stuck for STUCK_AFTER: it is dropped
OUTBOX_HARD = 50_000      # more than this, whatever the reason: dropped (bounded memory per client)
STUCK_AFTER = 5.0
ADMIN_EVENTS = {"UserLoggedIn", "UserLoggedOut"}
ADMIN_PAYLOAD_EVENTS = {"ClientOpened", "ClientAuthed"}
HIDDEN_EVENTS = {"Heartbeat"}
_NOTHING = object()


class _Encoded(str):
    """One message as its JSON text, encoded once for every client that gets it (a bus event goes to every client:
    encoding it per client was most of the gateway's work under load).  Other strings in an outbox are raw SockJS
    frames (``o``, ``h``)."""
    __slots__ = ()


def _encode(message: dict) -> _Encoded:
    return _Encoded(json.dumps(message, separators=(",", ":"), default=str))


class _Shared:
    """The encoded forms of one message sent to many clients: one per distinct payload object."""

    def __init__(self, kind: str):
        self.kind = kind
        self.texts: dict = {}

    def text(self, payload) -> _Encoded:
        text = self.texts.get(id(payload))
        if text is None:
            text = self.texts[id(payload)] = _encode({self.kind: payload})
        return text


class PushClient:
    def __init__(self, hub: "PushHub", ws: web.WebSocketResponse, sockjs: bool, remote: str, transport=None):
        self.hub = hub
        self.ws = ws
        self.transport = transport
        self.sockjs = sockjs
        self.remote = remote
        self.identity = Identity(None, None)
        self.session: str | None = None
        self.held: list = []
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.sending_since: float | None = None
        self.throttle = 1
        self.subscription = None               # None: everything (until the first subscribe)
        self.registered = False
        self.last_current = 0.0
        self.dropped = False

    # --- sending -------------------------------------------------------------------------------------------------

    def send(self, kind: str, payload, shared: _Shared | None = None) -> None:
        """Queue one message; before auth only ``connected`` and ``reauthRequired`` go out.  ``shared``: the same
        message goes to other clients too (it is encoded once for all)."""
        if self.dropped:
            return
        if self.identity.user is None and kind not in ("connected", "reauthRequired"):
            if len(self.held) < HELD_BACK:
                self.held.append((kind, payload))
            return
        self._queue(shared.text(payload) if shared is not None else _encode({kind: payload}))

    def _queue(self, message) -> None:
        self.outbox.put_nowait(message)
        if self.outbox.qsize() >= OUTBOX_SOFT:
            self.check_stuck()

    def check_stuck(self) -> None:
        waiting = self.outbox.qsize()
        stuck = self.sending_since is not None and time.monotonic() - self.sending_since > STUCK_AFTER
        if waiting >= OUTBOX_HARD or (waiting >= OUTBOX_SOFT and stuck):
            self.dropped = True
            log.warning("push: %s does not keep up (%d messages waiting): dropped", self.remote, waiting)
            while not self.outbox.empty():
                self.outbox.get_nowait()
            self.outbox.put_nowait(None)
            if self.transport is not None:
                self.transport.abort()              # the writer may sit in a send that will never finish

    async def writer(self) -> None:
        """Sends the outbox in order until its end marker (None); on SockJS, what is waiting goes as one a[...]."""
        carried = _NOTHING
        while True:
            message = await self.outbox.get() if carried is _NOTHING else carried
            carried = _NOTHING
            if message is None:
                return
            if not isinstance(message, _Encoded):   # raw SockJS frames: o, h, c[...]
                await self._send(message)
                continue
            batch = [message]
            while not self.outbox.empty() and len(batch) < 100:
                extra = self.outbox.get_nowait()
                if not isinstance(extra, _Encoded):
                    carried = extra                 # a raw frame or the end: after this batch
                    break
                batch.append(extra)
            if self.sockjs:                         # SockJS: what is waiting goes as one a[...] frame
                await self._send("a[" + ",".join(batch) + "]")
            else:                                   # raw: one object per frame, without a task switch between
                for text in batch:
                    await self._send(text)

    async def _send(self, text: str) -> None:
        self.sending_since = time.monotonic()
        try:
            await self.ws.send_str(text)
        finally:
            self.sending_since = None

    # --- what the client asked for -------------------------------------------------------------------------------

    def wants_state(self) -> bool:
        return self.subscription is None or bool(self.subscription.get("state"))

    def wants_event(self, name: str) -> bool:
        if self.subscription is None:
            return True
        events = self.subscription.get("events", [])
        return events is True or (isinstance(events, list) and name in events)

    def wants_plugin(self, plugin: str) -> bool:
        if self.subscription is None:
            return True
        plugins = self.subscription.get("plugins", [])
        return plugins is True or (isinstance(plugins, list) and plugin in plugins)

    def handle(self, message: dict) -> None:
        if not isinstance(message, dict):
            return
        if "auth" in message:
            self.hub.authenticate(self, str(message["auth"]))
        if "throttle" in message:
            try:
                self.throttle = max(1, int(message["throttle"]))
            except (TypeError, ValueError):
                pass
        if "subscribe" in message and isinstance(message["subscribe"], dict):
            had_state = self.wants_state()
            self.subscription = {"state": message["subscribe"].get("state", False),
                                 "plugins": message["subscribe"].get("plugins", []),
                                 "events": message["subscribe"].get("events", [])}
            if self.registered and self.wants_state() and not had_state:
                self.send("history", self.hub.gw.view.snapshot(full=True))


class PushHub:
    def __init__(self, gateway, heartbeat: float = 25.0):
        self.gw = gateway
        self.heartbeat = heartbeat
        self.clients: set = set()

    # --- connection life -----------------------------------------------------------------------------------------

    async def sockjs_info(self, request):
        import random

        return web.json_response({"websocket": True, "cookie_needed": False, "origins": ["*:*"],
                                  "entropy": random.getrandbits(31)})

    async def sockjs_welcome(self, request):
        return web.Response(text="Welcome to SockJS!\n", content_type="text/plain")

    async def sockjs_websocket(self, request):
        return await self._serve(request, sockjs=True)

    async def raw_websocket(self, request):
        return await self._serve(request, sockjs=False)

    def _origin_allowed(self, request) -> bool:
        origin = request.headers.get("Origin")
        if not origin or self.gw.cors:
            return True
        from urllib.parse import urlsplit

        return urlsplit(origin).netloc == request.headers.get("Host")

    async def _serve(self, request, sockjs: bool):
        if not self._origin_allowed(request):
            return web.Response(status=403, text="Cross origin websockets not allowed")
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, max_msg_size=1 << 20)
        await ws.prepare(request)
        client = PushClient(self, ws, sockjs, request.remote or "?", request.transport)
        self.clients.add(client)
        writer = asyncio.get_running_loop().create_task(client.writer())
        beat = asyncio.get_running_loop().create_task(self._heartbeats(client)) if sockjs else None
        try:
            if sockjs:
                client._queue("o")
            client.send("connected", self.gw.connected_payload())
            self.gw.publish("ClientOpened", {"remoteAddress": client.remote})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                        break
                    continue
                for message in _decode(msg.data, sockjs):
                    client.handle(message)
        finally:
            self.clients.discard(client)
            if beat is not None:
                beat.cancel()
            client.dropped = True
            client.outbox.put_nowait(None)
            try:
                await asyncio.wait_for(writer, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError, RuntimeError):
                writer.cancel()
            self.gw.publish("ClientClosed", {"remoteAddress": client.remote})
        return ws

    async def _heartbeats(self, client: PushClient):
        while True:
            await asyncio.sleep(self.heartbeat)
            if not client.dropped:
                client._queue("h")

    # --- auth ----------------------------------------------------------------------------------------------------

    def authenticate(self, client: PushClient, credentials: str) -> None:
        user_name, _, session = credentials.partition(":")
        owner = self.gw.sessions.user(session)
        user = self.gw.users.get(user_name) if owner == user_name else None
        if user is None or not user.active:
            client.send("reauthRequired", {"reason": "stale"})
            return
        client.identity = Identity(user, "password", session)
        client.session = session
        held, client.held = client.held, []
        for kind, payload in held:
            client.send(kind, payload)
        self.gw.publish("ClientAuthed", {"username": user.name, "remoteAddress": client.remote})
        if client.identity.can("STATUS"):
            client.registered = True
            if client.wants_state():
                client.send("history", self.gw.view.snapshot(full=True))
            client.send("timelapse", self.gw.timelapse_message())
            client.last_current = time.monotonic()

    def end_sessions(self, session: str, reason: str) -> None:
        for client in list(self.clients):
            if client.session == session:
                client.identity = Identity(None, None)
                client.registered = False
                client.session = None
                client.send("reauthRequired", {"reason": reason})

    # --- from the bus ----------------------------------------------------------------------------------------------

    def event(self, name: str, payload) -> None:
        if name in HIDDEN_EVENTS:
            return
        shared = _Shared("event")
        messages: dict = {}
        for client in list(self.clients):
            identity = client.identity
            if client.dropped or (identity.user is not None and not identity.can("STATUS")):
                continue
            if name in ADMIN_EVENTS and not identity.can("ADMIN"):
                continue
            if not client.wants_event(name):
                continue
            shown = payload if name not in ADMIN_PAYLOAD_EVENTS or identity.can("ADMIN") else {}
            if identity.user is None:
                if name in ADMIN_EVENTS:
                    continue
                shown = {} if name in ADMIN_PAYLOAD_EVENTS else payload
            message = messages.get(id(shown))
            if message is None:
                message = messages[id(shown)] = {"type": name, "payload": shown}
            client.send("event", message, shared)

    def message(self, kind: str, payload, plugin: str | None = None) -> None:
        shared = _Shared(kind)
        for client in list(self.clients):
            if not client.dropped and (plugin is None or client.wants_plugin(plugin)):
                if plugin is not None or client.identity.user is None or client.identity.can("STATUS"):
                    client.send(kind, payload, shared)

    def tick(self) -> None:
        """Called every 0.1 s by the gateway: ``current`` to each registered client due for one."""
        now = time.monotonic()
        current = None
        shared = _Shared("current")
        for client in list(self.clients):
            if not client.dropped and client.outbox.qsize() >= OUTBOX_SOFT:
                client.check_stuck()
            if client.dropped or not client.registered or not client.wants_state():
                continue
            if now - client.last_current < 0.5 * client.throttle:
                continue
            if current is None:
                current = self.gw.view.snapshot(full=False)
            client.last_current = now
            client.send("current", current, shared)

    def routes(self, app: web.Application) -> None:
        app.router.add_route("GET", "/sockjs/info", self.sockjs_info)
        app.router.add_route("GET", "/sockjs", self.sockjs_welcome)
        app.router.add_route("GET", "/sockjs/websocket", self.raw_websocket)
        app.router.add_route("GET", r"/sockjs/{server:[^/.]+}/{session:[^/.]+}/websocket", self.sockjs_websocket)


def _decode(data: str, sockjs: bool) -> list:
    """Client messages of one text frame: SockJS sends a JSON array of JSON strings (or one JSON string), the raw
    socket plain JSON objects.  Anything else is ignored with a log line."""
    try:
        value = json.loads(data)
    except ValueError:
        log.info("push: invalid JSON from a client: %.80r", data)
        return []
    if not sockjs:
        return [value] if isinstance(value, dict) else []
    items = value if isinstance(value, list) else [value]
    messages = []
    for item in items:
        if not isinstance(item, str):
            log.info("push: ignored a message that is not a JSON string: %.80r", item)
            continue
        try:
            decoded = json.loads(item)
        except ValueError:
            continue
        if isinstance(decoded, dict):
            messages.append(decoded)
    return messages
