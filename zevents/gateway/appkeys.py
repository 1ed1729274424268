"""The app-key flow (``/plugin/appkeys/*``) that Home Assistant and Cura use to get a key without the user typing
one: a pending request per application, polled by the client, decided by a user.

zevents has no web UI, so a request is decided with ``zevents user appkey approve TOKEN`` (or ``deny``), which
reaches the gateway over its command channel; ``zevents user appkey ls`` lists what waits.  OctoPrint's timing is
kept: a request not polled for 5 s expires, none lives longer than 10 minutes, the key is handed out exactly once
(then 404), and the same user and application always get the same key.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from aiohttp import web

POLL_TIMEOUT = 5.0
MAX_AGE = 600.0


@dataclass
class Pending:
    app: str
    user: str | None              # who may approve it (None: any user with PLUGIN_APPKEYS_GRANT)
    app_token: str
    user_token: str
    remote: str
    created: float
    polled: float
    decided_by: str | None = None
    key: str | None = None
    denied: bool = False

    def expired(self, now: float) -> bool:
        return now - self.polled > POLL_TIMEOUT or now - self.created > MAX_AGE

    def as_dict(self) -> dict:
        return {"app_id": self.app, "user_id": self.user, "user_token": self.user_token,
                "remote_address": self.remote, "age": round(time.monotonic() - self.created, 1)}


class AppKeys:
    def __init__(self, gateway):
        self.gw = gateway
        self.pending: dict = {}                   # app_token -> Pending

    def _prune(self):
        now = time.monotonic()
        for token in [t for t, p in self.pending.items() if p.expired(now)]:
            del self.pending[token]

    def list_pending(self, user: str | None = None) -> list:
        self._prune()
        return [p.as_dict() for p in self.pending.values()
                if p.key is None and not p.denied and (user is None or p.user in (None, user))]

    def decide(self, user_token: str, approve: bool, user_name: str) -> dict:
        """The decision of ``user_name`` on a pending request; raises KeyError or PermissionError."""
        self._prune()
        for pending in self.pending.values():
            if pending.user_token == user_token or pending.app_token == user_token:
                break
        else:
            raise KeyError(f"no pending app-key request {user_token!r} (requests expire 5 s after their last "
                           "poll)")
        user = self.gw.users.get(user_name)
        if user is None or "PLUGIN_APPKEYS_GRANT" not in user.permissions:
            raise PermissionError(f"user {user_name!r} may not grant app keys")
        if pending.user not in (None, user_name):
            raise PermissionError(f"the request of {pending.app!r} is for user {pending.user!r}")
        if approve:
            pending.key = self.gw.users.grant_appkey(user_name, pending.app)
            pending.decided_by = user_name
        else:
            pending.denied = True
        self.gw.push_plugin_message("appkeys", {"type": "end_request", "user_token": pending.user_token})
        return {"app": pending.app, "approved": approve, "user": user_name}

    # --- routes --------------------------------------------------------------------------------------------------

    async def probe(self, request):
        return web.Response(status=204, content_type="text/plain")

    async def request(self, request):
        client = request.remote or "?"
        if self.gw.appkey_limiter.blocked(client):
            return web.json_response({"error": "You have made too many app key requests. Please try again later."},
                                     status=429)
        self.gw.appkey_limiter.hit(client)
        if request.content_type != "application/json":
            return web.json_response({"error": "Did not attempt to load JSON data because the request Content-Type "
                                               "was not 'application/json'."}, status=415)
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "Missing data"}, status=400)
        if not isinstance(data, dict):
            return web.json_response({"error": "Missing data"}, status=400)
        app = data.get("app")
        if not isinstance(app, str) or not app.strip():
            return web.json_response({"error": "No app name provided"}, status=400)
        user = data.get("user") if isinstance(data.get("user"), str) and data.get("user") else None
        self._prune()
        now = time.monotonic()
        pending = Pending(app.strip()[:200], user, secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                          client, now, now)
        self.pending[pending.app_token] = pending
        base = self.gw.api.base_url(request)
        location = f"{base}/plugin/appkeys/request/{pending.app_token}"
        self.gw.push_plugin_message("appkeys", {"type": "request_access", "app_name": pending.app,
                                                "user_token": pending.user_token, "user_id": user,
                                                "remote_address": client})
        self.gw.log.info("app-key request from %s for %r%s: approve with `zevents user appkey approve %s`",
                         client, pending.app, f" (user {user})" if user else "", pending.user_token)
        dialog = f"{base}/plugin/appkeys/auth/{pending.app_token}" + (f"?user={user}" if user else "")
        return web.json_response({"app_token": pending.app_token, "auth_dialog": dialog}, status=201,
                                 headers={"Location": location})

    async def poll(self, request):
        self._prune()
        pending = self.pending.get(request.match_info["token"])
        if pending is None or pending.denied:
            self.pending.pop(request.match_info["token"], None)
            return web.json_response({"error": "Not found"}, status=404)
        pending.polled = time.monotonic()
        if pending.key is None:
            return web.json_response({"message": "Awaiting decision"}, status=202)
        del self.pending[pending.app_token]         # handed out exactly once
        return web.json_response({"api_key": pending.key})

    async def auth_dialog(self, request):
        pending = self.pending.get(request.match_info["token"])
        if pending is None:
            return web.Response(status=404, text="<h1>404 Not Found</h1>", content_type="text/html")
        return web.Response(text=f"<!doctype html><title>zevents: app key</title><p>{_html(pending.app)} asks for "
                                 f"an API key. On the zevents host, run:</p><pre>zevents user appkey approve "
                                 f"{pending.user_token}</pre>", content_type="text/html")

    async def user_view(self, request):
        identity = request["identity"]
        if identity.user is None:
            return web.json_response({"error": "You don't have the permission to access the requested resource. "
                                               "It is either read-protected or not readable by the server."},
                                     status=403)
        keys = [{"app_id": k["app"], "user_id": k["user"]} for k in self.gw.users.appkeys()
                if identity.user.admin or k["user"] == identity.user.name]
        pending = {p["user_token"]: p for p in self.list_pending(None if identity.user.admin else identity.name)}
        return web.json_response({"keys": keys, "pending": pending})

    async def decision(self, request):
        identity = request["identity"]
        if identity.user is None or identity.mechanism != "password":
            return web.json_response({"error": "You don't have the permission to access the requested resource. "
                                               "It is either read-protected or not readable by the server."},
                                     status=403)
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "Missing data"}, status=400)
        try:
            self.decide(request.match_info["token"], bool((data or {}).get("decision")), identity.user.name)
        except KeyError:
            return web.json_response({"error": "Not found"}, status=404)
        except PermissionError as exc:
            return web.json_response({"error": str(exc)}, status=403)
        return web.Response(status=204, content_type="text/plain")

    def routes(self, app: web.Application) -> None:
        app.router.add_route("GET", "/plugin/appkeys/probe", self.probe)
        app.router.add_route("POST", "/plugin/appkeys/request", self.request)
        app.router.add_route("GET", "/plugin/appkeys/request/{token}", self.poll)
        app.router.add_route("GET", "/plugin/appkeys/auth/{token}", self.auth_dialog)
        app.router.add_route("POST", "/plugin/appkeys/decision/{token}", self.decision)
        app.router.add_route("GET", "/api/plugin/appkeys", self.user_view)


def _html(text: str) -> str:
    import html

    return html.escape(text)
