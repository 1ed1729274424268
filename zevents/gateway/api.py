"""OctoPrint's REST API, the part real clients use (``octoprint-api.md``), on aiohttp.

Owns the routes, their status codes and JSON shapes, and the rules every request goes through (in OctoPrint's
order): who is asking (:mod:`zevents.gateway.auth`), CSRF for cookie requests (checked before permissions, so an
unauthenticated POST is a 400 as in OctoPrint), then the permission.  Nothing here holds printer or file state:
files go through the files service's channel, printer commands through the link's, the printer's state is the
bus's (:class:`zevents.gateway.printer_view.PrinterView`).  Blocking channel requests run in a thread pool.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from pathlib import PurePosixPath
from urllib.parse import quote

from aiohttp import web

from zevents.gateway.auth import SAFE_METHODS, Identity

log = logging.getLogger("zevents.gateway")

VERSION = "1.11.8"          # the OctoPrint version whose API this is; clients check `text` starts with OctoPrint
FORBIDDEN = ("You don't have the permission to access the requested resource. It is either read-protected or not "
             "readable by the server.")
NOT_FOUND = ("The requested URL was not found on the server. If you entered the URL manually please check your "
             "spelling and try again.")
NOT_ALLOWED = "The method is not allowed for the requested URL."
BAD_REQUEST = "The browser (or proxy) sent a request that this server could not understand."
NOT_OPERATIONAL = "Printer is not operational"
GCODE_EXTENSIONS = (".gcode", ".gco", ".g")
MODEL_EXTENSIONS = (".stl", ".3mf", ".obj")
TRUE = ("true", "yes", "y", "1")
CACHE_GET = {"Cache-Control": "max-age=0"}
CACHE_OTHER = {"Cache-Control": "no-store, no-cache, must-revalidate, post-check=0, pre-check=0, max-age=0",
               "Pragma": "no-cache", "Expires": "-1"}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def no_content() -> web.Response:
    return web.Response(status=204, content_type="text/plain")


def flag(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE if value is not None else False


class Abort(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def require(identity: Identity, *permissions: str) -> None:
    for permission in permissions:
        if not identity.can(permission):
            raise Abort(403, FORBIDDEN)


async def json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise Abort(415, "Did not attempt to load JSON data because the request Content-Type was not "
                         "'application/json'.")
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise Abort(400, BAD_REQUEST) from None
    if not isinstance(data, dict):
        raise Abort(400, BAD_REQUEST)
    return data


def command_of(data: dict, valid: dict) -> str:
    """OctoPrint's command endpoints: 400 for an unknown command or a missing mandatory parameter."""
    command = data.get("command")
    if command not in valid:
        raise Abort(400, "command is invalid")
    if any(key not in data for key in valid[command]):
        raise Abort(400, "Mandatory parameters missing")
    return command


class Api:
    """The routes; ``gateway`` is the running :class:`zevents.gateway.service.Gateway` (stores, channels, view)."""

    def __init__(self, gateway):
        self.gw = gateway

    # --- plumbing ------------------------------------------------------------------------------------------------

    def base_url(self, request: web.Request) -> str:
        headers = request.headers
        trust = self.gw.trust_forwarded
        scheme = (headers.get("X-Forwarded-Proto") or headers.get("X-Scheme")) if trust else None
        scheme = (scheme or request.scheme).split(",")[0].strip()
        host = headers.get("X-Forwarded-Host") if trust else None
        host = (host or headers.get("Host") or f"{request.url.host}:{request.url.port}").split(",")[0].strip()
        if trust and headers.get("X-Forwarded-Port") and ":" not in host.rsplit("]", 1)[-1]:
            host = f"{host}:{headers['X-Forwarded-Port']}"
        prefix = (headers.get("X-Script-Name") or headers.get("X-Forwarded-Prefix") or "") if trust else ""
        return f"{scheme}://{host}{prefix.rstrip('/')}"

    def file_refs(self, request, origin: str, path: str, folder: bool = False) -> dict:
        base = self.base_url(request)
        quoted = quote(path)
        refs = {"resource": f"{base}/api/files/{origin}/{quoted}"}
        if origin == "local" and not folder:
            refs["download"] = f"{base}/downloads/files/local/{quoted}"
        return refs

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.gw.executor, fn, *args)

    async def files(self, command: str, args: dict, timeout: float = 30.0) -> dict:
        return await self._request(self.gw.files_client, command, args, timeout)

    async def printer(self, command: str, args: dict | None = None, timeout: float = 10.0) -> dict:
        return await self._request(self.gw.printer_client, command, args, timeout)

    async def _request(self, make_client, command: str, args: dict | None, timeout: float) -> dict:
        """One request to another service's channel, off the event loop; a refusal is the matching HTTP error."""
        from zevents.printer.channel import ChannelError

        def call():
            client = make_client()
            try:
                return client.request(command, args or {}, timeout=timeout)
            finally:
                client.close()
        try:
            return await self.blocking(call)
        except ChannelError as exc:
            raise Abort(*self._channel_status(str(exc))) from None

    @staticmethod
    def _channel_status(message: str) -> tuple:
        lowered = message.lower()
        if "did not answer" in lowered or "is not running" in lowered:
            return 503, message
        if "no such" in lowered or "not found" in lowered:
            return 404, message
        if "exists" in lowered or "being printed" in lowered or "in use" in lowered or "printing" in lowered \
                or "not connected" in lowered or "busy" in lowered:
            return 409, message
        if "not a g-code" in lowered or "type" in lowered and "neither" in lowered:
            return 415, message
        return 400, message

    # --- version, server, users ----------------------------------------------------------------------------------

    async def version(self, request):
        require(request["identity"], "STATUS")
        return web.json_response({"api": "0.1", "server": VERSION, "text": f"OctoPrint {VERSION}"})

    async def server(self, request):
        require(request["identity"], "STATUS")
        return web.json_response({"version": VERSION, "safemode": None})

    def _login_record(self, identity: Identity, session: str | None) -> dict:
        user = identity.user
        permissions = sorted(user.permissions) if user else []
        return {"name": user.name, "active": user.active, "user": True, "admin": user.admin,
                "apikey": user.apikey, "groups": list(user.groups), "permissions": [], "roles":
                    ["user"] + (["admin"] if user.admin else []), "settings": dict(user.settings),
                "needs": {"group": list(user.groups), "role": [p.lower() for p in permissions]},
                "session": session, "_is_external_client": False,
                "_login_mechanism": identity.mechanism if identity.mechanism != "appkey" else "apikey",
                "_credentials_seen": False}

    async def login(self, request):
        data = {}
        if request.content_type == "application/json":
            try:
                data = await request.json()
            except ValueError:
                raise Abort(400, BAD_REQUEST) from None
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            data = dict(await request.post())
        data = {**dict(request.query), **(data if isinstance(data, dict) else {})}
        identity: Identity = request["identity"]
        client = request.remote or "?"
        if "user" in data and "pass" in data:
            if self.gw.login_limiter.blocked(client):
                return error(429, "You have made too many failed login attempts. Please try again later.")
            user = await self.blocking(self.gw.users.check_password, str(data["user"]), str(data["pass"]))
            if user is None:
                self.gw.login_limiter.hit(client)
                return error(403, "User unknown or password incorrect")
            session = self.gw.sessions.new(user.name)
            response = web.json_response(self._login_record(Identity(user, "password"), session))
            self.gw.set_session_cookie(request, response, session, remember=flag(data.get("remember")))
            if identity.name != user.name:
                self.gw.publish("UserLoggedIn", {"username": user.name})
            return response
        if "passive" in data:
            if identity.user is None:
                return web.json_response({"needs": {"group": ["guests"]}, "_is_external_client": False,
                                          "_credentials_seen": False})
            # A passive login makes a new session (what the push socket's auth names) but no UserLoggedIn: nobody
            # logged in (OctoPrint fires one on every passive login; a client polling it would flood hooks).
            session = identity.session if identity.mechanism == "password" and identity.session else \
                self.gw.sessions.new(identity.user.name)
            return web.json_response(self._login_record(identity, session))
        return error(400, "Neither user and pass attributes nor passive flag present")

    async def logout(self, request):
        identity: Identity = request["identity"]
        response = web.json_response({"needs": {"group": ["guests"]}})
        if identity.session:
            self.gw.sessions.end(identity.session)
            self.gw.end_socket_sessions(identity.session, "logout")
        self.gw.clear_session_cookie(request, response)
        if identity.user is not None and identity.mechanism == "password":
            self.gw.publish("UserLoggedOut", {"username": identity.user.name})
        return response

    async def currentuser(self, request):
        identity: Identity = request["identity"]
        if identity.user is None:
            return web.json_response({"name": None, "groups": ["guests"], "permissions": []})
        return web.json_response({"name": identity.user.name, "permissions": sorted(identity.permissions),
                                  "groups": list(identity.user.groups)})

    # --- settings ------------------------------------------------------------------------------------------------

    async def settings(self, request):
        identity: Identity = request["identity"]
        require(identity, "SETTINGS_READ")
        return web.json_response(self.gw.settings_tree(identity, self.base_url(request)))

    async def save_settings(self, request):
        identity: Identity = request["identity"]
        require(identity, "SETTINGS")
        data = await json_body(request)
        name = (data.get("appearance") or {}).get("name") if isinstance(data.get("appearance"), dict) else None
        if name is not None:
            self.gw.save_appearance_name(str(name))
            self.gw.publish("SettingsUpdated", {})
        return web.json_response(self.gw.settings_tree(identity, self.base_url(request)))

    # --- files ---------------------------------------------------------------------------------------------------

    def _entry(self, request, entry: dict, origin: str) -> dict:
        out = {"name": entry.get("name"), "display": entry.get("display") or entry.get("name"),
               "path": entry.get("path"), "origin": origin, "type": entry.get("type"),
               "typePath": entry.get("typePath")}
        folder = entry.get("type") == "folder"
        for key in ("size", "date", "hash", "user", "userdata", "prints", "statistics"):
            if entry.get(key) is not None:
                out[key] = entry[key]
        analysis = entry.get("analysis") or entry.get("gcodeAnalysis")
        if analysis:
            out["gcodeAnalysis"] = {k: analysis[k] for k in ("estimatedPrintTime", "filament", "dimensions",
                                                             "printingArea", "travelArea", "travelDimensions")
                                    if k in analysis}
        out["refs"] = self.file_refs(request, origin, entry.get("path") or "", folder)
        if folder:
            out["children"] = [self._entry(request, child, origin) for child in entry.get("children") or []]
            out.setdefault("prints", {"success": 0, "failure": 0})
        return out

    async def _list(self, request, origin: str, path: str = "") -> list:
        recursive = flag(request.query.get("recursive"))
        reply = await self.files("LIST", {"path": path, "recursive": recursive, "storage": origin})
        entries = [self._entry(request, entry, origin) for entry in reply.get("files") or []]
        wanted = request.query.get("filter")
        if wanted:
            entries = [e for e in entries if e["type"] == "folder" or wanted in (e.get("typePath") or [])]
        return entries

    def _free(self) -> dict:
        try:
            usage = os.statvfs(self.gw.uploads)
            return {"free": usage.f_bavail * usage.f_frsize, "total": usage.f_blocks * usage.f_frsize}
        except OSError:
            return {"free": None, "total": None}

    async def files_all(self, request):
        require(request["identity"], "FILES_LIST")
        files = await self._list(request, "local")
        if self.gw.sd_support:
            try:
                files += await self._list(request, "sdcard")
            except Abort:
                pass                                 # an offline printer has no SD card to list
        return web.json_response({"files": files, **self._free()}, headers=CACHE_GET)

    async def files_origin(self, request):
        require(request["identity"], "FILES_LIST")
        origin = request.match_info["origin"]
        if origin not in ("local", "sdcard") or (origin == "sdcard" and not self.gw.sd_support):
            raise Abort(404, NOT_FOUND)
        files = await self._list(request, origin)
        body = {"files": files, **self._free()} if origin == "local" else {"files": files}
        return web.json_response(body, headers=CACHE_GET)

    async def file_entry(self, request):
        require(request["identity"], "FILES_LIST")
        origin, path = request.match_info["origin"], request.match_info["path"]
        if origin not in ("local", "sdcard"):
            raise Abort(404, NOT_FOUND)
        try:
            reply = await self.files("INFO", {"path": path, "storage": origin})
        except Abort as exc:
            raise Abort(404, NOT_FOUND) if exc.status in (400, 404) else exc
        entry = reply["file"]
        if entry.get("type") == "folder":
            listing = await self.files("LIST", {"path": entry["path"], "storage": origin})
            entry = dict(entry, children=listing.get("files") or [])
        return web.json_response(self._entry(request, entry, origin), headers=CACHE_GET)

    async def upload(self, request):
        identity: Identity = request["identity"]
        require(identity, "FILES_UPLOAD")
        origin = request.match_info["origin"]
        if origin not in ("local", "sdcard") or (origin == "sdcard" and not self.gw.sd_support):
            raise Abort(404, NOT_FOUND)
        if request.content_length is None:
            raise Abort(411, "A Content-Length header is required for uploads")
        if request.content_length > self.gw.max_upload:
            raise Abort(413, f"The upload is larger than the limit of {self.gw.max_upload} bytes")
        if not request.content_type.startswith("multipart/"):
            raise Abort(400, "No file to upload and no folder to create")
        fields, stored = {}, None
        try:
            try:
                reader = await request.multipart()
                while True:
                    part = await reader.next()
                    if part is None:
                        break
                    name = part.name or ""
                    if name.endswith((".name", ".path", ".content_type", ".size")):
                        raise Abort(400, f"Form field {name} is reserved")
                    if name == "file" and part.filename is not None and stored is None:
                        stored = (part.filename, await self._receive(part))
                    else:
                        fields[name] = (await part.read(decode=True)).decode("utf-8", "replace")
            except (ValueError, AssertionError, UnicodeDecodeError) as exc:
                raise Abort(400, f"The upload is not well-formed multipart data: {exc}") from None
            if stored is None:
                if fields.get("foldername"):
                    return await self._make_folder(request, origin, fields)
                raise Abort(400, "No file to upload and no folder to create")
            return await self._store_upload(request, identity, origin, fields, *stored)
        finally:
            if stored is not None:
                try:
                    os.unlink(stored[1])
                except FileNotFoundError:
                    pass

    async def _receive(self, part) -> str:
        """The file part streamed to a temporary file beside the uploads (never whole in memory)."""
        self.gw.upload_tmp.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.gw.upload_tmp)
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                while True:
                    chunk = await part.read_chunk(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.gw.max_upload:
                        raise Abort(413, f"The upload is larger than the limit of {self.gw.max_upload} bytes")
                    await self.blocking(handle.write, chunk)
        except BaseException:
            os.unlink(temp)
            raise
        return temp

    @staticmethod
    def _clean_path(folder: str, name: str) -> str:
        if "\\" in folder or "\\" in name or "\0" in folder or "\0" in name or not name.strip():
            raise Abort(400, "Can not upload file, invalid file name")
        parts = [p for p in PurePosixPath(folder).parts if p not in ("/", "")] if folder else []
        if folder.startswith("/") or any(p in (".", "..") for p in parts) or name in (".", "..") or "/" in name:
            raise Abort(400, "Can not upload file, invalid file name")
        return "/".join(parts + [name])

    async def _make_folder(self, request, origin: str, fields: dict):
        if origin != "local":
            raise Abort(400, "Folders can only be created on local storage")
        path = self._clean_path(fields.get("path", ""), fields["foldername"])
        await self.files("MKDIR", {"path": path})
        location = f"{self.base_url(request)}/api/files/local/{quote(path)}"
        return web.json_response({"done": True, "folder": {"name": PurePosixPath(path).name, "path": path,
                                                            "origin": "local",
                                                            "refs": {"resource": location}}},
                                 status=201, headers={"Location": location})

    async def _store_upload(self, request, identity: Identity, origin: str, fields: dict, filename: str,
                            temp: str):
        name = fields.get("filename") or PurePosixPath(filename.replace("\\", "/")).name
        path = self._clean_path(fields.get("path", ""), name)
        suffix = PurePosixPath(name).suffix.lower()
        allowed = GCODE_EXTENSIONS + (MODEL_EXTENSIONS if self.gw.slicing_available() and origin == "local" else ())
        if suffix not in allowed:
            raise Abort(415, "Could not upload file, invalid type")
        userdata = None
        if fields.get("userdata"):
            try:
                userdata = json.loads(fields["userdata"])
            except ValueError:
                raise Abort(400, "userdata contains invalid JSON") from None
        select = flag(fields.get("select")) and identity.can("FILES_SELECT")
        start = flag(fields.get("print")) and identity.can("PRINT")
        args = {"source": temp, "path": path, "storage": origin, "remove_source": True,
                "overwrite": not flag(fields.get("noOverwrite")), "select": select, "print": start,
                "user": identity.name, "fire_upload": True}
        if userdata is not None:
            args["userdata"] = userdata
        reply = await self.files("UPLOAD", args, timeout=600.0)
        stored = reply.get("path") or path
        base = self.base_url(request)
        if origin == "sdcard":
            remote = reply.get("remote") or stored
            location = f"{base}/api/files/sdcard/{quote(remote)}"
            files = {"local": {"name": PurePosixPath(path).name, "path": path, "origin": "local",
                               "refs": self.file_refs(request, "local", path)},
                     "sdcard": {"name": remote, "path": remote, "origin": "sdcard",
                                "refs": {"resource": location}}}
            done = False
        else:
            location = f"{base}/api/files/local/{quote(stored)}"
            files = {"local": {"name": PurePosixPath(stored).name, "path": stored, "origin": "local",
                               "refs": self.file_refs(request, "local", stored)}}
            done = True
        return web.json_response({"done": done, "effectiveSelect": bool(reply.get("effective_select")),
                                  "effectivePrint": bool(reply.get("effective_print")), "files": files},
                                 status=201, headers={"Location": location})

    async def file_command(self, request):
        identity: Identity = request["identity"]
        origin, path = request.match_info["origin"], request.match_info["path"]
        if origin not in ("local", "sdcard"):
            raise Abort(404, NOT_FOUND)
        data = await json_body(request)
        command = command_of(data, {"select": (), "unselect": (), "copy": ("destination",),
                                    "move": ("destination",), "analyse": (), "slice": (), "uploadSd": ()})
        if command == "select":
            require(identity, "FILES_SELECT")
            if flag(data.get("print")):
                require(identity, "PRINT")
            info = (await self.files("INFO", {"path": path, "storage": origin}))["file"]
            if info.get("type") != "machinecode":
                raise Abort(415, "Cannot select file for printing, not a machinecode file")
            if not self.gw.view.operational:
                raise Abort(409, "Printer is not operational")
            if flag(data.get("print")) and self.gw.view.state_id != "OPERATIONAL":
                raise Abort(409, "Printer is already printing, cannot select a new file")
            disk = str(self.gw.uploads / info["path"]) if origin == "local" else info["path"]
            await self.printer("SELECT", {"path": disk, "origin": origin})
            if flag(data.get("print")):
                await self.printer("PRINT", {})
            return no_content()
        if command == "unselect":
            require(identity, "FILES_SELECT")
            if self.gw.view.state_id in ("PRINTING", "PAUSED", "PAUSING", "STARTING"):
                return web.Response(status=409, text="Cannot unselect the file of the active print",
                                    content_type="text/plain")
            await self.printer("DESELECT", {})
            return no_content()
        if command in ("copy", "move"):
            require(identity, "FILES_UPLOAD", *(("FILES_DELETE",) if command == "move" else ()))
            if origin != "local":
                raise Abort(400, f"Cannot {command} on {origin}")
            reply = await self.files(command.upper(), {"source": path, "destination": data["destination"]})
            target = reply.get("path") or data["destination"]
            location = f"{self.base_url(request)}/api/files/local/{quote(target)}"
            return web.json_response({"name": PurePosixPath(target).name, "path": target, "origin": "local",
                                      "refs": self.file_refs(request, "local", target)},
                                     status=201, headers={"Location": location})
        if command == "analyse":
            require(identity, "FILES_UPLOAD")
            await self.files("ANALYSE", {"path": path})
            return no_content()
        if command == "slice":
            require(identity, "SLICE")
            return await self._slice(request, path, data)
        require(identity, "FILES_UPLOAD")
        raise Abort(400, "uploadSd is done with an upload to /api/files/sdcard")

    async def _slice(self, request, path: str, data: dict):
        from zevents.printer.channel import ChannelError

        dest = data.get("gcode") or data.get("destination")
        if dest and data.get("path"):
            dest = f"{str(data['path']).strip('/')}/{dest}".lstrip("/")
        overrides = {key[len("profile."):]: value for key, value in data.items() if key.startswith("profile.")}

        def call():
            client = self.gw.slicing_client()
            try:
                return client.request("SLICE", {"model": path, "slicer": data.get("slicer"),
                                                "profile": data.get("profile"),
                                                "printer_profile": data.get("printerProfile"), "dest": dest,
                                                "select": flag(data.get("select")),
                                                "print": flag(data.get("print")), "overrides": overrides},
                                      timeout=30.0)
            finally:
                client.close()
        try:
            reply = await self.blocking(call)
        except ChannelError as exc:
            message = str(exc)
            status = 404 if "profile" in message or "unknown slicer" in message else \
                415 if "not a model" in message or "no slicer" in message else 400
            raise Abort(status, message) from None
        target = reply["gcode"]
        location = f"{self.base_url(request)}/api/files/local/{quote(target)}"
        return web.json_response({"name": PurePosixPath(target).name, "path": target,
                                  "display": PurePosixPath(target).name, "origin": "local",
                                  "refs": self.file_refs(request, "local", target)},
                                 status=202, headers={"Location": location})

    async def delete_file(self, request):
        require(request["identity"], "FILES_DELETE")
        origin, path = request.match_info["origin"], request.match_info["path"]
        if origin not in ("local", "sdcard"):
            raise Abort(404, NOT_FOUND)
        info = (await self.files("INFO", {"path": path, "storage": origin}))["file"]
        if info.get("printing"):
            raise Abort(409, "Trying to delete a file that is currently in use")
        if info.get("type") == "folder":
            await self.files("RMDIR", {"path": info["path"], "recursive": True})
        else:
            await self.files("REMOVE", {"path": info["path"], "storage": origin})
        return no_content()

    async def download(self, request):
        identity: Identity = request["identity"]
        if not identity.can("FILES_DOWNLOAD"):
            return web.Response(status=403, text="<h1>403 Forbidden</h1>", content_type="text/html")
        path = request.match_info["path"]
        parts = PurePosixPath(path).parts
        if any(p in ("..", ".") or p.startswith(".") for p in parts) or path.startswith("/"):
            return web.Response(status=404, text="<h1>404 Not Found</h1>", content_type="text/html")
        disk = (self.gw.uploads / path)
        try:
            disk.resolve().relative_to(self.gw.uploads.resolve())
        except ValueError:
            return web.Response(status=404, text="<h1>404 Not Found</h1>", content_type="text/html")
        if not disk.is_file() or disk.suffix.lower() not in GCODE_EXTENSIONS + MODEL_EXTENSIONS:
            return web.Response(status=404, text="<h1>404 Not Found</h1>", content_type="text/html")
        return web.FileResponse(disk, headers={"Content-Disposition": f"attachment; filename*=UTF-8''"
                                                                      f"{quote(disk.name)}"})

    # --- job, printer, connection --------------------------------------------------------------------------------

    async def job(self, request):
        require(request["identity"], "STATUS")
        data = self.gw.view.job()
        if self.gw.view.error:
            data["error"] = self.gw.view.error
        return web.json_response(data, headers=CACHE_GET)

    async def job_command(self, request):
        identity: Identity = request["identity"]
        view = self.gw.view
        if not view.operational:
            raise Abort(409, NOT_OPERATIONAL)
        data = await json_body(request)
        command = command_of(data, {"start": (), "restart": (), "pause": (), "cancel": ()})
        require(identity, "PRINT")
        active = view.state_id in ("PRINTING", "PAUSED", "PAUSING", "RESUMING", "STARTING")
        if command == "start":
            if active:
                raise Abort(409, "Printer already has an active print job, did you mean 'restart'?")
            if view.file is None:
                return no_content()                   # OctoPrint: nothing selected is a 204 that does nothing
            await self.printer("PRINT", {})
        elif command == "restart":
            if view.state_id != "PAUSED":
                raise Abort(409, "Printer does not have an active print job or is not paused")
            await self.printer("CANCEL", {})
            await self.printer("PRINT", {})
        elif command == "pause":
            action = data.get("action", "toggle")
            if action not in ("pause", "resume", "toggle"):
                raise Abort(400, "Unknown action")
            if not active:
                raise Abort(409, "Printer is neither printing nor paused, 'pause' command cannot be performed")
            if action == "toggle":
                action = "resume" if view.state_id == "PAUSED" else "pause"
            if action == "pause" and view.state_id != "PAUSED":
                await self.printer("PAUSE", {})
            elif action == "resume" and view.state_id == "PAUSED":
                await self.printer("RESUME", {})
        else:
            if not active:
                raise Abort(409, "Printer is neither printing nor paused, 'cancel' command cannot be performed")
            await self.printer("CANCEL", {})
        return no_content()

    def _operational(self, identity: Identity, permission: str = "STATUS"):
        require(identity, permission)
        if not self.gw.view.operational:
            raise Abort(409, NOT_OPERATIONAL)

    async def printer_state(self, request):
        self._operational(request["identity"])
        exclude = {p.strip() for p in request.query.get("exclude", "").split(",") if p.strip()}
        data = {}
        if "temperature" not in exclude:
            try:
                limit = int(request.query.get("limit", 300))
            except ValueError:
                limit = 300
            data["temperature"] = self.gw.view.temperature(flag(request.query.get("history")), limit)
        if "sd" not in exclude and self.gw.sd_support:
            data["sd"] = {"ready": self.gw.view.operational}
        if "state" not in exclude:
            data["state"] = self.gw.view.state()
        return web.json_response(data, headers=CACHE_GET)

    async def printer_tool_state(self, request):
        self._operational(request["identity"])
        temperature = self.gw.view.temperature(flag(request.query.get("history")))
        return web.json_response({k: v for k, v in temperature.items() if k.startswith("tool") or k == "history"})

    async def printer_bed_state(self, request):
        self._operational(request["identity"])
        if not self.gw.view.heated_bed:
            raise Abort(409, "Printer does not have a heated bed")
        temperature = self.gw.view.temperature(flag(request.query.get("history")))
        return web.json_response({k: v for k, v in temperature.items() if k in ("bed", "history")})

    async def printer_sd_state(self, request):
        self._operational(request["identity"])
        if not self.gw.sd_support:
            raise Abort(404, NOT_FOUND)
        return web.json_response({"ready": True})

    async def _gcode(self, lines: list):
        reply = await self.printer("GCODE", {"lines": lines, "src": "user"})
        if reply.get("suppressed"):
            log.info("gateway: suppressed by the link: %s", reply["suppressed"])

    async def printer_tool(self, request):
        self._operational(request["identity"], "CONTROL")
        data = await json_body(request)
        command = command_of(data, {"target": ("targets",), "offset": ("offsets",), "select": ("tool",),
                                    "extrude": ("amount",), "flowrate": ("factor",)})
        if command == "target":
            targets = data["targets"]
            if not isinstance(targets, dict) or not all(
                    re.fullmatch(r"tool\d*", k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in targets.items()):
                raise Abort(400, "targets contains invalid tool/value")
            await self._gcode([f"M104 T{k[4:] or 0} S{v:g}" for k, v in targets.items()])
        elif command == "offset":
            offsets = data["offsets"]
            if not isinstance(offsets, dict) or not all(
                    re.fullmatch(r"tool\d*", k) and isinstance(v, (int, float)) and -50 <= v <= 50
                    for k, v in offsets.items()):
                raise Abort(400, "offsets contains invalid tool/value")
        elif command == "select":
            tool = str(data["tool"])
            if not re.fullmatch(r"tool\d+", tool):
                raise Abort(400, "tool is invalid")
            await self._gcode([f"T{tool[4:]}"])
        elif command == "extrude":
            if self.gw.view.state_id in ("PRINTING", "PAUSING", "RESUMING", "STARTING"):
                raise Abort(409, "Printer is currently printing")
            amount = data["amount"]
            if not isinstance(amount, (int, float)) or isinstance(amount, bool):
                raise Abort(400, "amount must be a number")
            speed = data.get("speed") or 300
            await self._gcode(["G91", "M83", f"G1 E{amount:g} F{speed:g}", "M82", "G90"])
        else:
            factor = data["factor"]
            if not isinstance(factor, (int, float)) or not 75 <= (factor if factor > 2 else factor * 100) <= 125:
                raise Abort(400, "factor must be a number between 75 and 125")
            await self._gcode([f"M221 S{factor if factor > 2 else factor * 100:g}"])
        return no_content()

    async def printer_bed(self, request):
        self._operational(request["identity"], "CONTROL")
        if not self.gw.view.heated_bed:
            raise Abort(409, "Printer does not have a heated bed")
        data = await json_body(request)
        command = command_of(data, {"target": ("target",), "offset": ("offset",)})
        value = data[command]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Abort(400, f"{command} must be a number")
        if command == "target":
            await self._gcode([f"M140 S{value:g}"])
        elif not -50 <= value <= 50:
            raise Abort(400, "offset must be between -50 and 50")
        return no_content()

    async def printer_command(self, request):
        self._operational(request["identity"], "CONTROL")
        data = await json_body(request)
        if "command" in data and "commands" in data:
            raise Abort(400, "'command' and 'commands' are mutually exclusive")
        if "script" in data:
            raise Abort(404, f"Unknown script: {data['script']}")
        if "command" in data:
            lines = [data["command"]]
        elif isinstance(data.get("commands"), list):
            lines = data["commands"]
        else:
            raise Abort(400, "need either 'command' or 'commands' (a list)")
        parameters = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
        try:
            lines = [str(line) % parameters if parameters else str(line) for line in lines]
        except (KeyError, ValueError, TypeError) as exc:
            raise Abort(400, f"parameters do not fit the commands: {exc}") from None
        await self._gcode(lines)
        return no_content()

    async def printhead(self, request):
        self._operational(request["identity"], "CONTROL")
        data = await json_body(request)
        command = command_of(data, {"jog": (), "home": ("axes",), "feedrate": ("factor",)})
        if command != "feedrate" and self.gw.view.state_id in ("PRINTING", "PAUSING", "RESUMING", "STARTING"):
            raise Abort(409, "Printer is currently printing")
        if command == "jog":
            moves = []
            for axis in "xyz":
                value = data.get(axis)
                if value is not None:
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise Abort(400, f"Not a number for axis {axis}: {value!r}")
                    moves.append(f"{axis.upper()}{value:g}")
            if moves:
                speed = data.get("speed")
                absolute = flag(data.get("absolute"))
                line = "G1 " + " ".join(moves) + (f" F{speed:g}" if isinstance(speed, (int, float)) else "")
                await self._gcode(([] if absolute else ["G91"]) + [line] + ([] if absolute else ["G90"]))
        elif command == "home":
            axes = data["axes"]
            if not isinstance(axes, list) or not set(axes) <= {"x", "y", "z"}:
                raise Abort(400, "Invalid axes")
            await self._gcode(["G28 " + " ".join(a.upper() + "0" for a in axes)])
        else:
            factor = data["factor"]
            if not isinstance(factor, (int, float)):
                raise Abort(400, "factor must be a number")
            await self._gcode([f"M220 S{factor if factor > 2 else factor * 100:g}"])
        return no_content()

    async def connection(self, request):
        require(request["identity"], "STATUS")
        view = self.gw.view
        profiles = self.gw.profiles.all()
        current_profile = self.gw.current_profile_id()
        state = view.state_string if view.operational or view.state_id not in ("OFFLINE", "CLOSED") else "Closed"
        ports = self.gw.serial_ports()
        return web.json_response({
            "current": {"state": state, "port": view.port, "baudrate": view.baudrate,
                        "printerProfile": current_profile},
            "options": {"ports": ports, "baudrates": [250000, 230400, 115200, 57600, 38400, 19200, 9600],
                        "printerProfiles": [{"id": p["id"], "name": p["name"]} for p in profiles.values()],
                        "portPreference": self.gw.config.get("printer", "port"),
                        "baudratePreference": self.gw.config.get("printer", "baudrate"),
                        "printerProfilePreference": current_profile}})

    async def connection_command(self, request):
        require(request["identity"], "CONNECTION")
        data = await json_body(request)
        command = command_of(data, {"connect": (), "disconnect": (), "fake_ack": ()})
        if command == "connect":
            args = {}
            if data.get("port") is not None:
                if data["port"] not in self.gw.serial_ports() and data["port"] != "AUTO":
                    raise Abort(400, "port is invalid")
                args["port"] = data["port"]
            if data.get("baudrate") is not None:
                if data["baudrate"] not in (0, 250000, 230400, 115200, 57600, 38400, 19200, 9600):
                    raise Abort(400, "baudrate is invalid")
                args["baudrate"] = data["baudrate"]
            if data.get("printerProfile") is not None and not self.gw.profiles.exists(data["printerProfile"]):
                raise Abort(400, "printerProfile is invalid")
            # 204 at once; the link connects in the background (its events say how it goes)
            asyncio.get_running_loop().create_task(self._background(self.printer("CONNECT", args, timeout=60)))
        elif command == "disconnect":
            asyncio.get_running_loop().create_task(self._background(self.printer("DISCONNECT", {}, timeout=30)))
        return no_content()

    @staticmethod
    async def _background(awaitable):
        try:
            await awaitable
        except Abort as exc:
            log.warning("gateway: %s", exc.message)

    # --- profiles, timelapse, slicing, system --------------------------------------------------------------------

    def _profile(self, request, profile: dict, current: str, default: str) -> dict:
        keep = ("id", "name", "model", "color", "volume", "heatedBed", "heatedChamber", "extruder", "axes")
        return {**{k: profile[k] for k in keep if k in profile}, "current": profile["id"] == current,
                "default": profile["id"] == default,
                "resource": f"{self.base_url(request)}/api/printerprofiles/{quote(profile['id'])}"}

    async def printerprofiles(self, request):
        require(request["identity"], "CONNECTION")
        current, default = self.gw.current_profile_id(), self.gw.profiles.default_id()
        return web.json_response({"profiles": {pid: self._profile(request, p, current, default)
                                               for pid, p in self.gw.profiles.all().items()}}, headers=CACHE_GET)

    async def printerprofile(self, request):
        require(request["identity"], "CONNECTION")
        from zevents.printer.profiles import ProfileError

        try:
            profile = self.gw.profiles.get(request.match_info["identifier"])
        except ProfileError:
            raise Abort(404, NOT_FOUND) from None
        return web.json_response(self._profile(request, profile, self.gw.current_profile_id(),
                                               self.gw.profiles.default_id()))

    async def timelapse(self, request):
        require(request["identity"], "TIMELAPSE_LIST")
        body = {"config": self.gw.timelapse_config(), "enabled": True, "files": self.gw.timelapse_files()}
        if flag(request.query.get("unrendered")):
            body["unrendered"] = self.gw.timelapse_unrendered()
        return web.json_response(body, headers=CACHE_GET)

    async def timelapse_download(self, request):
        if not request["identity"].can("TIMELAPSE_DOWNLOAD"):
            return web.Response(status=403, text="<h1>403 Forbidden</h1>", content_type="text/html")
        path = self.gw.timelapse_download(request.match_info["printer"], request.match_info["name"])
        if path is None:
            return web.Response(status=404, text="<h1>404 Not Found</h1>", content_type="text/html")
        return web.FileResponse(path, headers={"Content-Disposition": f"attachment; filename*=UTF-8''"
                                                                      f"{quote(path.name)}"})

    async def slicing(self, request):
        require(request["identity"], "SLICE")
        from zevents.slicing import slicers
        from zevents.slicing.profiles import SlicingProfiles

        store = SlicingProfiles.for_config(self.gw.config)
        configured_only = flag(request.query.get("configured"))
        default_slicer = self.gw.config.get("slicing", "default_slicer")
        body = {}
        found = await self.blocking(lambda: [s for s in (slicers.find(i, self.gw.config, with_version=False)
                                                         for i in slicers.SLICER_IDS)])
        first_available = next((s.id for s in found if s.available), None)
        for slicer in found:
            if configured_only and not slicer.available:
                continue
            default_profile = store.default(slicer.id)
            body[slicer.id] = {
                "key": slicer.id, "displayName": slicer.name, "sameDevice": True,
                "default": slicer.id == (default_slicer or first_available), "configured": slicer.available,
                "extensions": {"source": ["stl", "3mf", "obj"], "destination": ["gco", "gcode", "g"]},
                "profiles": {name: {"key": name, "default": name == default_profile, "displayName": name,
                                    "resource": f"{self.base_url(request)}/api/slicing/{slicer.id}/profiles/"
                                                f"{quote(name)}"}
                             for name in store.names(slicer.id)}}
        return web.json_response(body, headers=CACHE_GET)

    async def system_commands(self, request):
        require(request["identity"], "SYSTEM")
        return web.json_response({"core": [], "custom": [], "plugin": []})

    async def system_command(self, request):
        require(request["identity"], "SYSTEM")
        # zevents runs no shutdown/reboot/restart commands: OctoPrint answers 404 for unconfigured ones too
        raise Abort(404, NOT_FOUND)

    # --- pages that set the CSRF cookie --------------------------------------------------------------------------

    async def page(self, request):
        response = web.Response(text="<!doctype html><title>zevents</title><p>zevents gateway: OctoPrint's API at "
                                     "/api, the push socket at /sockjs.</p>", content_type="text/html")
        self.gw.set_csrf_cookie(request, response)
        return response

    # --- the routes ----------------------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("GET", "/api/version", self.version)
        add("GET", "/api/server", self.server)
        add("POST", "/api/login", self.login)
        add("POST", "/api/logout", self.logout)
        add("GET", "/api/currentuser", self.currentuser)
        add("GET", "/api/settings", self.settings)
        add("POST", "/api/settings", self.save_settings)
        add("GET", "/api/files", self.files_all)
        add("GET", "/api/files/{origin}", self.files_origin)
        add("POST", "/api/files/{origin}", self.upload)
        add("GET", "/api/files/{origin}/{path:.+}", self.file_entry)
        add("POST", "/api/files/{origin}/{path:.+}", self.file_command)
        add("DELETE", "/api/files/{origin}/{path:.+}", self.delete_file)
        add("GET", "/downloads/files/local/{path:.+}", self.download)
        add("GET", "/api/job", self.job)
        add("POST", "/api/job", self.job_command)
        add("GET", "/api/printer", self.printer_state)
        add("GET", "/api/printer/tool", self.printer_tool_state)
        add("POST", "/api/printer/tool", self.printer_tool)
        add("GET", "/api/printer/bed", self.printer_bed_state)
        add("POST", "/api/printer/bed", self.printer_bed)
        add("GET", "/api/printer/sd", self.printer_sd_state)
        add("POST", "/api/printer/command", self.printer_command)
        add("POST", "/api/printer/printhead", self.printhead)
        add("GET", "/api/connection", self.connection)
        add("POST", "/api/connection", self.connection_command)
        add("GET", "/api/printerprofiles", self.printerprofiles)
        add("GET", "/api/printerprofiles/{identifier}", self.printerprofile)
        add("GET", "/api/timelapse", self.timelapse)
        add("GET", "/downloads/timelapse/{printer}/{name}", self.timelapse_download)
        add("GET", "/api/slicing", self.slicing)
        add("GET", "/api/system/commands", self.system_commands)
        add("POST", "/api/system/commands/{source}/{action}", self.system_command)
        add("GET", "/", self.page)
        add("GET", "/login", self.page)


def is_api_path(path: str) -> bool:
    return path.startswith(("/api/", "/plugin/")) or path == "/api"


def csrf_required(request: web.Request, identity: Identity) -> bool:
    """OctoPrint's rule: non-safe requests to the API need the double-submitted token unless a key was used."""
    if request.method in SAFE_METHODS or identity.by_key:
        return False
    path = request.path
    if not path.startswith(("/api/", "/plugin/")):
        return False
    return path not in ("/plugin/appkeys/request",) and not path.startswith("/plugin/appkeys/request/")

