"""The gateway process: OctoPrint's REST API and push socket on aiohttp, so the clients people already point at
OctoPrint (slicers' upload, Home Assistant, Cura, farm managers, `octoprint client`) work against zevents.

Owns the HTTP server's life and what every request passes through (one middleware: HA's ``//api/...`` paths,
identity, CSRF before permissions, OctoPrint's error bodies and cache headers, CORS when enabled), the bus thread
that folds events into the printer view and forwards them to socket clients, the connectivity check
(``ConnectivityChanged``), the server events (``ClientOpened``/``Authed``/``Closed``, ``UserLoggedIn``/``Out``) and
the gateway's command channel (``gateway.commands``: app-key decisions and on-demand online checks from the CLI).

The gateway keeps no printer or file state of its own: files and printer commands go through their services'
channels, the printer's state is the bus's.  It binds loopback by default and warns when bound beyond it.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from pathlib import Path

from aiohttp import web

from zevents import bus as zbus
from zevents.gateway import api as api_mod
from zevents.gateway.api import Abort, Api, error, is_api_path
from zevents.gateway.appkeys import AppKeys
from zevents.gateway.auth import ANONYMOUS, Identity, RateLimiter, Sessions, csrf_ok
from zevents.gateway.printer_view import PrinterView
from zevents.gateway.push import PushHub
from zevents.gateway.users import UserStore
from zevents.printer.profiles import ProfileStore

log = logging.getLogger("zevents.gateway")
INBOX_BATCH = 500         # bus events handled per turn of the event loop

COMMANDS = ("APPKEYS", "APPKEY_DECIDE", "ONLINE_CHECK", "STATUS")


class ServiceError(RuntimeError):
    """The gateway cannot start (address in use, bad listen address)."""


def endpoint(config) -> str:
    return config.endpoint("gateway", "commands", "gateway.sock")


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Gateway:
    def __init__(self, config, context=None):
        import zmq

        self.config = config
        self.log = log
        section = config.get("gateway") or {}
        self.section = section
        self.context = context or zmq.Context.instance()
        self.host, self.port = parse_listen(section.get("listen") or "127.0.0.1:5000")
        data = Path(config.data_dir)
        self.data = data
        uploads = (config.get("files") or {}).get("uploads") or data / "uploads"
        self.uploads = Path(os.path.expanduser(str(uploads)))
        self.upload_tmp = data / "gateway" / "tmp"
        self.max_upload = int(section.get("max_upload", 1 << 30))
        self.cors = bool(section.get("cors", False))
        self.trust_forwarded = bool(section.get("trust_forwarded", True))
        self.sd_support = bool(section.get("sd_support", True))
        self.users = UserStore(data)
        self.sessions = Sessions(float(section.get("session_stale_after", 900.0)))
        self.login_limiter = RateLimiter(bool(section.get("rate_limit", True)))
        self.appkey_limiter = RateLimiter(bool(section.get("rate_limit", True)))
        self.profiles = ProfileStore.for_config(config)
        profile = self.profiles.get(config.get("printer", "profile") or None)
        self.view = PrinterView(self.uploads, profile.get("heatedBed", True), profile.get("heatedChamber", False))
        self.executor = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="gateway")
        self.api = Api(self)
        self.appkeys = AppKeys(self)
        self.push = PushHub(self, float(section.get("socket_heartbeat", 25.0)))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.publisher = None
        self.runner: web.AppRunner | None = None
        self._stop: asyncio.Event | None = None
        self._threads: list = []
        self._inbox: collections.deque = collections.deque()
        self._inbox_scheduled = False
        self._running = threading.Event()
        self.online = True
        self.online_state = {"connection": True, "resolution": True}
        self.node_uuid = self._node_uuid()

    # --- helpers the routes use ----------------------------------------------------------------------------------

    def _node_uuid(self) -> str:
        path = self.data / "gateway" / "uuid"
        try:
            return str(uuid.UUID(path.read_text().strip()))
        except (OSError, ValueError):
            from zevents.fileutil import atomic_write

            value = str(uuid.uuid4())
            atomic_write(path, value + "\n")
            return value

    def files_client(self):
        from zevents.files.channel import FilesClient, endpoint as files_endpoint

        return FilesClient(files_endpoint(self.config), self.context)

    def printer_client(self):
        from zevents.printer import channel

        return channel.CommandClient(channel.endpoint(self.config), self.context)

    def slicing_client(self):
        from zevents.slicing.service import SlicingClient, endpoint as slicing_endpoint

        return SlicingClient(slicing_endpoint(self.config), self.context)

    def slicing_available(self) -> bool:
        if not (self.config.get("slicing") or {}).get("enabled", False):
            return False
        from zevents.slicing import slicers

        return any(slicers.find(i, self.config, with_version=False).available for i in slicers.SLICER_IDS)

    def current_profile_id(self) -> str:
        return self.config.get("printer", "profile") or self.profiles.default_id()

    def serial_ports(self) -> list:
        import glob

        from zevents.printer.link import AUTO_PORT_PATTERNS

        ports = sorted({p for pattern in AUTO_PORT_PATTERNS for p in glob.glob(pattern)})
        configured = self.config.get("printer", "port")
        if configured and configured not in ports and configured != "AUTO":
            ports.append(configured)
        if "VIRTUAL" not in ports:
            ports.append("VIRTUAL")
        return ports

    def publish(self, name: str, payload: dict) -> None:
        """From the event loop's thread only (the publisher's socket is the loop's)."""
        if self.publisher is not None:
            self.publisher.publish(name, payload)

    def push_plugin_message(self, plugin: str, data: dict) -> None:
        self.push.message("plugin", {"plugin": plugin, "data": data}, plugin=plugin)

    def end_socket_sessions(self, session: str, reason: str) -> None:
        self.push.end_sessions(session, reason)

    # --- cookies -------------------------------------------------------------------------------------------------

    def _cookie(self, request, name: str) -> str:
        suffix = f"_P{self.port}"
        root = request.headers.get("X-Script-Name") if self.trust_forwarded else None
        if root:
            suffix += "_R" + root.strip("/").replace("/", "|")
        return name + suffix

    def set_session_cookie(self, request, response, session: str, remember: bool = False) -> None:
        response.set_cookie(self._cookie(request, "session"), session, httponly=True, samesite="Lax",
                            max_age=90 * 86400 if remember else None, path="/")
        response.del_cookie(self._cookie(request, "active_logout"), path="/")

    def clear_session_cookie(self, request, response) -> None:
        response.del_cookie(self._cookie(request, "session"), path="/")
        response.del_cookie(self._cookie(request, "remember_token"), path="/")
        response.set_cookie(self._cookie(request, "active_logout"), "true", path="/")

    def set_csrf_cookie(self, request, response) -> None:
        name = self._cookie(request, "csrf_token")
        if not request.cookies.get(name):
            response.set_cookie(name, secrets.token_urlsafe(32), httponly=False, samesite="Strict", path="/")

    # --- what clients read ---------------------------------------------------------------------------------------

    def _webcam_urls(self) -> tuple:
        webcam = self.config.get("webcam") or {}
        classic = (self.config.get("plugins") or {}).get("classicwebcam") or {}
        gateway_webcam = self.section.get("webcam") or {}
        stream = gateway_webcam.get("stream") or webcam.get("stream") or classic.get("stream") or ""
        snapshot = gateway_webcam.get("snapshot") or webcam.get("snapshot") or classic.get("snapshot") or ""
        if not snapshot:
            snapshot = self._virtual_camera_url()
        return stream, snapshot

    def _virtual_camera_url(self) -> str:
        """The virtual printer's camera (what the timelapse films when no camera is configured), if it runs."""
        import json

        from zevents import config as zconfig

        try:
            data = json.loads((zconfig.runtime_dir() / self.config.node / "virtual-camera.json").read_text())
        except (OSError, ValueError):
            return ""
        url = data.get("url") if isinstance(data, dict) else None
        return url if isinstance(url, str) else ""

    def settings_tree(self, identity: Identity, base: str) -> dict:
        stream, snapshot = self._webcam_urls()
        webcam = {}
        if identity.can("WEBCAM"):
            webcam = {"webcamEnabled": bool(stream or snapshot), "timelapseEnabled": True, "streamUrl": stream,
                      "snapshotUrl": snapshot, "flipH": False, "flipV": False, "rotate90": False,
                      "bitrate": str((self.config.get("webcam") or {}).get("bitrate") or "10000k"),
                      "snapshotSslValidation": True, "streamRatio": "16:9", "streamTimeout": 5,
                      "snapshotTimeout": 5, "cacheBuster": False, "defaultWebcam": "classic",
                      "snapshotWebcam": "classic", "webcams": []}
        files = self.config.get("files") or {}
        run_at = (files.get("analysis") or {}).get("run_at", "idle")
        host, port = self.host, self.port
        tree = {
            "api": {"key": None, "allowCrossOrigin": self.cors},
            "appearance": {"name": self._appearance_name(), "color": "default"},
            "feature": {"sdSupport": self.sd_support, "temperatureGraph": True},
            "folder": {"uploads": str(self.uploads), "timelapse": str(self.data / "timelapse")},
            "gcodeAnalysis": {"runAt": run_at if run_at in ("idle", "always", "never") else "idle"},
            "plugins": {"discovery": {"upnpUuid": self.node_uuid, "publicHost": None, "publicPort": port,
                                      "pathPrefix": None, "zeroConf": [], "model": {"name": "zevents"}},
                        "tracking": {"enabled": False, "unique_id": None}},
            "serial": {"port": self.config.get("printer", "port"),
                       "baudrate": self.config.get("printer", "baudrate")},
            "server": {"host": host, "port": port, "onlineCheck": self.online_check_settings()},
            "slicing": {"enabled": bool((self.config.get("slicing") or {}).get("enabled", False)),
                        "defaultSlicer": (self.config.get("slicing") or {}).get("default_slicer")},
            "system": {"actions": [], "events": None},
            "temperature": {"profiles": []},
            "webcam": webcam,
        }
        return tree

    def _appearance_name(self) -> str:
        try:
            return (self.data / "gateway" / "name").read_text(encoding="utf-8").strip()
        except OSError:
            return self.config.node

    def save_appearance_name(self, name: str) -> None:
        from zevents.fileutil import atomic_write

        atomic_write(self.data / "gateway" / "name", name[:200] + "\n")

    def connected_payload(self) -> dict:
        import platform

        from zevents.gateway.users import PERMISSIONS

        plugin_hash = hashlib.md5(b"zevents-gateway").hexdigest()
        config_hash = hashlib.md5(repr(sorted(self.section.items())).encode()).hexdigest()
        return {"version": api_mod.VERSION, "display_version": api_mod.VERSION, "branch": "HEAD",
                "python_version": platform.python_version(), "plugin_hash": plugin_hash,
                "config_hash": config_hash, "debug": False, "safe_mode": None, "online": self.online,
                "permissions": [{"key": p, "name": p.replace("_", " ").title(), "dangerous": p in (
                    "ADMIN", "SYSTEM", "SETTINGS"), "default_groups": ["admins"] if p in (
                    "ADMIN", "SYSTEM", "SETTINGS") else ["admins", "users"], "description": "",
                    "needs": {"role": [p.lower()]}} for p in PERMISSIONS]}

    def timelapse_config(self) -> dict:
        mode = (self.config.get("webcam") or {}).get("timelapse", {}) if isinstance(
            (self.config.get("webcam") or {}).get("timelapse"), dict) else {}
        kind = mode.get("type") or "off"
        if kind == "off":
            return {"type": "off"}
        config = {"type": kind, "postRoll": mode.get("postRoll", 0), "fps": mode.get("fps", 25),
                  "renderAfterPrint": mode.get("renderAfterPrint", "always")}
        options = mode.get("options") or {}
        if kind == "timed":
            config["interval"] = options.get("interval", 10)
        else:
            config.update(retractionZHop=options.get("retractionZHop", 0.0), minDelay=options.get("minDelay", 5.0))
        return config

    def timelapse_message(self):
        config = self.timelapse_config()
        if config["type"] == "off":
            return None
        options = {k: v for k, v in config.items() if k in ("interval", "retractionZHop")}
        return {"type": config["type"], "options": options}

    def _timelapse_listing(self) -> dict:
        from zevents.timelapse.commands import listing

        try:
            return listing(self.config)
        except (OSError, ValueError) as exc:
            log.warning("gateway: cannot list the timelapses: %s", exc)
            return {"movies": [], "unrendered": []}

    def timelapse_files(self) -> list:
        """OctoPrint's entries for the rendered movies (``url`` root-relative, as OctoPrint's is)."""
        files = []
        for movie in self._timelapse_listing()["movies"]:
            name = f"{movie['printer']}/{movie['name']}"
            entry = {"name": movie["name"], "size": _human_size(movie["bytes"]), "bytes": movie["bytes"],
                     "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(movie["timestamp"])),
                     "timestamp": movie["timestamp"], "url": f"/downloads/timelapse/{name}"}
            if movie.get("thumbnail"):
                entry["thumbnail"] = f"/downloads/timelapse/{name}.thumb.jpg"
            files.append(entry)
        return files

    def timelapse_unrendered(self) -> list:
        return [{"name": job["name"], "size": _human_size(job["bytes"]), "bytes": job["bytes"],
                 "date": job["date"], "timestamp": None, "count": job["count"], "processing": job["state"] ==
                 "rendering", "rendering": job["state"] == "rendering", "recording": job["state"] == "capturing"}
                for job in self._timelapse_listing()["unrendered"]]

    def timelapse_download(self, printer: str, name: str) -> Path | None:
        """A movie or its thumbnail, only from the timelapse folder and only by its own names."""
        from zevents.timelapse import store

        if "/" in printer or "/" in name or printer.startswith(".") or name.startswith("."):
            return None
        folder = store.movie_folder(self.config, printer)
        candidate = folder / name
        try:
            candidate.resolve().relative_to(store.root(self.config).resolve())
        except ValueError:
            return None
        return candidate if candidate.is_file() else None

    # --- connectivity --------------------------------------------------------------------------------------------

    def online_check_settings(self) -> dict:
        check = ((self.config.get("server") or {}).get("onlineCheck") or {})
        return {"enabled": check.get("enabled"), "interval": check.get("interval", 900),
                "host": check.get("host", "1.1.1.1"), "port": check.get("port", 53),
                "name": check.get("name", "octoprint.org")}

    def _check_online(self) -> dict:
        """OctoPrint's check: a TCP connection to host:port (3 tries, 1 s apart), then the name resolves."""
        settings = self.online_check_settings()
        if not settings["enabled"]:
            return {"connection": True, "resolution": True}
        connection = False
        for attempt in range(3):
            try:
                with socket.create_connection((settings["host"], int(settings["port"])), timeout=3.05):
                    connection = True
                    break
            except OSError:
                if attempt < 2:
                    time.sleep(1.0)
        resolution = False
        if connection:
            name = settings.get("name")
            if not name:
                resolution = True
            else:
                try:
                    resolution = bool(socket.getaddrinfo(name, 80))
                except OSError:
                    resolution = False
        return {"connection": connection, "resolution": resolution}

    async def check_online(self) -> dict:
        result = await asyncio.get_running_loop().run_in_executor(self.executor, self._check_online)
        new = result["connection"] and result["resolution"]
        old = self.online
        self.online_state = result
        self.online = new
        if new != old:
            self.publish("ConnectivityChanged", {"old": old, "new": new, **result})
        return {"online": new, **result, "enabled": bool(self.online_check_settings()["enabled"])}

    async def _online_loop(self):
        settings = self.online_check_settings()
        if not settings["enabled"]:
            return
        interval = max(1.0, float(settings["interval"]))
        while True:
            try:
                await self.check_online()
            except Exception:                      # a check must never end the loop
                log.exception("gateway: online check failed")
            await asyncio.sleep(interval)

    # --- the bus -------------------------------------------------------------------------------------------------

    def _bus_thread(self, subscriber):
        while self._running.is_set():
            try:
                envelope = subscriber.recv(0.5)
            except Exception:                      # never let one bad frame end the forwarding
                log.exception("gateway: bus receive failed")
                continue
            if envelope is not None and self.loop is not None:
                self._inbox.append((envelope.name, envelope.payload))
                if not self._inbox_scheduled:
                    # one wake-up of the loop for whatever arrives until it runs, not one per event
                    self._inbox_scheduled = True
                    self.loop.call_soon_threadsafe(self._drain_inbox)
        subscriber.close()

    def _drain_inbox(self) -> None:
        """Events from the bus thread, in order; at most INBOX_BATCH at once, so a burst of events does not keep
        HTTP requests and socket writers waiting until all of it is handled."""
        self._inbox_scheduled = False            # before draining: an event appended from now on is drained here
        for _ in range(INBOX_BATCH):              # or by the next call, never lost
            if not self._inbox:
                return
            self._on_event(*self._inbox.popleft())
        if self._inbox and not self._inbox_scheduled:
            self._inbox_scheduled = True
            self.loop.call_soon(self._drain_inbox)

    def _on_event(self, name: str, payload) -> None:
        self.view.apply(name, payload if isinstance(payload, dict) else {})
        self.push.event(name, payload)
        if name == "SlicingProgress" and isinstance(payload, dict):
            self.push.message("slicingProgress", {"slicer": payload.get("slicer"),
                                                  "source_location": payload.get("stl_location"),
                                                  "source_path": payload.get("stl"),
                                                  "dest_location": payload.get("gcode_location"),
                                                  "dest_path": payload.get("gcode"),
                                                  "progress": payload.get("progress")})
        elif name == "MovieRenderProgress" and isinstance(payload, dict):
            self.push.message("renderProgress", {"progress": payload.get("progress")})

    # --- the command channel -------------------------------------------------------------------------------------

    def _channel_thread(self, server):
        import zmq

        poller = zmq.Poller()
        poller.register(server.sock, zmq.POLLIN)
        while self._running.is_set():
            if not poller.poll(250):
                continue
            request = server.receive()
            if request is None:
                continue
            reply_to, command, args = request
            future = asyncio.run_coroutine_threadsafe(self._command(command, args), self.loop)
            try:
                ok, result = future.result(60)
            except Exception as exc:                # noqa: BLE001 - the requester gets the reason
                ok, result = False, {"error": str(exc)}
            server.reply(reply_to, args, ok, **result)
        server.close()

    async def _command(self, command: str, args: dict) -> tuple:
        if command == "APPKEYS":
            return True, {"pending": self.appkeys.list_pending(), "keys": self.users.appkeys()}
        if command == "APPKEY_DECIDE":
            try:
                return True, self.appkeys.decide(str(args.get("token")), bool(args.get("approve")),
                                                 str(args.get("user")))
            except (KeyError, PermissionError) as exc:
                return False, {"error": exc.args[0] if exc.args else str(exc)}
        if command == "ONLINE_CHECK":
            return True, await self.check_online()
        if command == "STATUS":
            return True, {"listen": f"{self.host}:{self.port}", "clients": len(self.push.clients),
                          "online": self.online}
        return False, {"error": f"unknown command {command!r}"}

    # --- the HTTP app --------------------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if "//" in request.rel_url.raw_path:
            # Home Assistant asks for //api/printer/bed: OctoPrint serves it, so do we (no redirect: a POST would
            # have to be replayed)
            merged = request.rel_url.raw_path
            while "//" in merged:
                merged = merged.replace("//", "/")
            app = request.app
            request = request.clone(rel_url=request.rel_url.with_path(merged, encoded=True))
            match = await app.router.resolve(request)
            match.add_app(app)
            match.freeze()
            request._match_info = match
            handler = match.handler
        if request.method == "OPTIONS":
            return await self._options(request)
        identity = self.identify(request)
        request["identity"] = identity
        api = is_api_path(request.path)
        try:
            if api_mod.csrf_required(request, identity):
                name = self._cookie(request, "csrf_token")
                if not csrf_ok(request.cookies.get(name), request.headers.get("X-CSRF-Token")):
                    raise Abort(400, "CSRF validation failed")
            if request.path.startswith("/api/") and request.method not in ("GET", "HEAD", "OPTIONS") and \
                    not request.path.startswith("/api/files/") and (request.content_length or 0) > 100 * 1024:
                raise Abort(413, "The request body is larger than 100 KiB")
            response = await handler(request)
        except Abort as exc:
            response = error(exc.status, exc.message)
        except web.HTTPException as exc:
            if not api or exc.status < 400:
                raise
            text = {403: api_mod.FORBIDDEN, 404: api_mod.NOT_FOUND, 405: api_mod.NOT_ALLOWED}.get(exc.status,
                                                                                               exc.reason)
            response = error(exc.status, text)
        if isinstance(response, web.StreamResponse) and not response.prepared and api:
            response.headers.update(api_mod.CACHE_GET if request.method == "GET" else api_mod.CACHE_OTHER)
        if self.cors and request.headers.get("Origin") and isinstance(response, web.StreamResponse) \
                and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
        return response

    def identify(self, request: web.Request) -> Identity:
        session = request.cookies.get(self._cookie(request, "session"))
        if session:
            name = self.sessions.user(session)
            user = self.users.get(name) if name else None
            if user is not None and user.active:
                return Identity(user, "password", session)
        key = request.headers.get("X-Api-Key") or request.query.get("apikey")
        authorization = request.headers.get("Authorization", "")
        if not key and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if key:
            user, how = self.users.user_for_key(key)
            if user is not None:
                return Identity(user, how)
        return ANONYMOUS

    async def _options(self, request):
        if not self.cors:
            return web.Response(status=200, headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"})
        origin = request.headers.get("Origin", "*")
        return web.Response(status=200, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": request.headers.get("Access-Control-Request-Method", "GET"),
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ""),
            "Access-Control-Max-Age": "10"})

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=self.max_upload + (1 << 20))
        self.api.routes(app)
        self.appkeys.routes(app)
        self.push.routes(app)
        return app

    # --- life cycle ----------------------------------------------------------------------------------------------

    async def _setup(self):
        """Binds everything (the HTTP port, the channel) or raises ServiceError: done before ServiceStarted."""
        from zevents.printer.channel import bind

        self._stop = asyncio.Event()
        self.publisher = zbus.Publisher(self.config, src="gateway", printer=self.config.get("printer", "name"),
                                        context=self.context)
        subscriber = zbus.Subscriber(self.config, context=self.context)
        try:
            for envelope in subscriber.snapshot(["comm", "print", "printer", "file"]):
                self.view.apply(envelope.name, envelope.payload if isinstance(envelope.payload, dict) else {})
        except zbus.BusError as exc:
            log.info("gateway: no snapshot from the broker (%s); the view fills as events come", exc)
        try:
            channel = bind(endpoint(self.config), self.context, "the gateway", ServiceError)
        except ServiceError:
            subscriber.close()
            raise
        self.runner = web.AppRunner(self.make_app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            channel.close()
            subscriber.close()
            await self.runner.cleanup()
            self.runner = None
            raise ServiceError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]
        if not _is_loopback(self.host):
            log.warning("gateway: listening on %s:%d, beyond loopback, without TLS: put it behind a reverse proxy "
                        "with TLS, or anyone on the network sees passwords and keys", self.host, self.port)
        self._running.set()
        for target, args in ((self._bus_thread, (subscriber,)), (self._channel_thread, (channel,))):
            thread = threading.Thread(target=target, args=args, daemon=True, name=f"gateway-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        log.info("gateway: OctoPrint's API on http://%s:%d", self.host, self.port)

    async def _main(self):
        online = asyncio.create_task(self._online_loop())
        try:
            while not self._stop.is_set():
                self.push.tick()
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass
        finally:
            online.cancel()

    async def _teardown(self):
        self._running.clear()
        for client in list(self.push.clients):
            await client.ws.close()
        if self.runner is not None:
            await self.runner.cleanup()
        for thread in self._threads:
            thread.join(5)
        if self.publisher is not None:
            self.publisher.close(linger=2.0)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # the run_until_signalled protocol: start(), serve(), stop(), close()
    def start(self):
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._setup())
        except BaseException:
            self.loop.run_until_complete(self._teardown())
            raise

    def serve(self):
        self.loop.run_until_complete(self._main())

    def stop(self):
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    def close(self):
        if self.loop is not None and not self.loop.is_closed():
            self.loop.run_until_complete(self._teardown())
            self.loop.close()


def _human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    return f"{size:.1f}GB"


class GatewayClient:
    """The CLI's side of the gateway's command channel."""

    def __new__(cls, config):
        from zevents.printer.channel import CommandClient

        class _Client(CommandClient):
            commands = COMMANDS
            service = "the gateway"
            start_hint = "zevents run` (gateway.enabled: true) or `zevents gateway serve"

        return _Client(endpoint(config))


def run(config) -> int:
    """The gateway process: until SIGINT/SIGTERM; 1 if it cannot start."""
    from zevents.service import run_until_signalled

    return run_until_signalled("gateway", config, Gateway(config), (ServiceError, OSError, ValueError), log)
