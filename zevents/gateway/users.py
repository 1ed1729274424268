"""The gateway's users and keys: ``<data_dir>/users.yaml`` (OctoPrint's groups and per-user API keys, passwords
hashed with Argon2id) and the application keys issued through the app-key flow, in ``<data_dir>/appkeys.yaml``.

Owns who exists, what they may do (OctoPrint's permission names and default group grants), how a password or a key
is checked (Argon2 verification; keys compared in constant time), and writing both files atomically.  The gateway
re-reads them when they change on disk, so ``zevents user ...`` works on a running node.
"""
from __future__ import annotations

import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zevents.fileutil import atomic_write

PERMISSIONS = ("ADMIN", "STATUS", "CONNECTION", "WEBCAM", "SYSTEM", "FILES_LIST", "FILES_UPLOAD", "FILES_DOWNLOAD",
               "FILES_DELETE", "FILES_SELECT", "PRINT", "GCODE_VIEWER", "MONITOR_TERMINAL", "CONTROL", "SLICE",
               "TIMELAPSE_LIST", "TIMELAPSE_DOWNLOAD", "TIMELAPSE_DELETE", "TIMELAPSE_MANAGE_UNRENDERED",
               "TIMELAPSE_ADMIN", "SETTINGS_READ", "SETTINGS", "PLUGIN_APPKEYS_GRANT", "PLUGIN_APPKEYS_ADMIN")
_ADMIN_ONLY = {"ADMIN", "SYSTEM", "SETTINGS", "PLUGIN_APPKEYS_ADMIN"}
GROUPS = {
    "admins": frozenset(PERMISSIONS),
    "users": frozenset(p for p in PERMISSIONS if p not in _ADMIN_ONLY),
    "readonly": frozenset({"STATUS", "WEBCAM", "FILES_LIST", "FILES_DOWNLOAD", "GCODE_VIEWER", "MONITOR_TERMINAL",
                           "TIMELAPSE_LIST", "TIMELAPSE_DOWNLOAD", "SETTINGS_READ"}),
    "guests": frozenset(),
}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class UserError(ValueError):
    """A user operation that cannot be done; the message says why."""


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    if not password:
        raise UserError("the password is empty")
    return _hasher().hash(password)


def new_key() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class User:
    name: str
    groups: tuple = ("users",)
    active: bool = True
    password: str | None = None
    apikey: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def permissions(self) -> frozenset:
        granted = set()
        for group in self.groups:
            granted |= GROUPS.get(group, frozenset())
        return frozenset(granted)

    @property
    def admin(self) -> bool:
        return "ADMIN" in self.permissions

    def as_stored(self) -> dict:
        return {"groups": list(self.groups), "active": self.active, "password": self.password,
                "apikey": self.apikey, "settings": self.settings}


class UserStore:
    """users.yaml and appkeys.yaml of one node; thread-safe, re-read when another process changed them."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / "users.yaml"
        self.keys_path = Path(data_dir) / "appkeys.yaml"
        self._lock = threading.RLock()
        self._users: dict = {}
        self._appkeys: list = []
        self._stamp = None

    def _stat(self):
        stamps = []
        for path in (self.path, self.keys_path):
            try:
                info = path.stat()
                stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self):
        stamp = self._stat()
        if stamp == self._stamp:
            return
        users = {}
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            data = {}
        for name, item in (data.items() if isinstance(data, dict) else ()):
            if isinstance(item, dict):
                users[str(name)] = User(str(name), tuple(item.get("groups") or ("users",)),
                                        bool(item.get("active", True)), item.get("password"), item.get("apikey"),
                                        dict(item.get("settings") or {}))
        try:
            keys = yaml.safe_load(self.keys_path.read_text(encoding="utf-8")) or []
        except FileNotFoundError:
            keys = []
        self._users = users
        self._appkeys = [k for k in keys if isinstance(k, dict) and {"user", "app", "key"} <= set(k)] \
            if isinstance(keys, list) else []
        self._stamp = stamp

    def _save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, yaml.safe_dump({n: u.as_stored() for n, u in self._users.items()}, sort_keys=True))
        os.chmod(self.path, 0o600)
        atomic_write(self.keys_path, yaml.safe_dump(self._appkeys, sort_keys=False))
        os.chmod(self.keys_path, 0o600)
        self._stamp = self._stat()

    # --- queries -------------------------------------------------------------------------------------------------

    def users(self) -> list:
        with self._lock:
            self._load()
            return list(self._users.values())

    def get(self, name: str) -> User | None:
        with self._lock:
            self._load()
            return self._users.get(name)

    def check_password(self, name: str, password: str) -> User | None:
        """The active user whose password this is, else None (the same work is done for an unknown name, so the
        answer's timing does not tell which names exist)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        user = self.get(name)
        stored = user.password if user is not None and user.active else None
        try:
            _hasher().verify(stored or _dummy(), password or "")
        except (VerificationError, InvalidHashError):
            return None
        return user if stored else None

    def user_for_key(self, key: str) -> tuple[User | None, str | None]:
        """(user, how) for an API key: a user's own key or an app key; compared in constant time."""
        if not key:
            return None, None
        with self._lock:
            self._load()
            found = None
            for user in self._users.values():
                if user.apikey and hmac.compare_digest(user.apikey.encode(), key.encode()) and user.active:
                    found = (user, "apikey")
            for entry in self._appkeys:
                if hmac.compare_digest(str(entry["key"]).encode(), key.encode()):
                    user = self._users.get(entry["user"])
                    if user is not None and user.active:
                        found = (user, "appkey")
            return found or (None, None)

    def appkeys(self) -> list:
        with self._lock:
            self._load()
            return [dict(k) for k in self._appkeys]

    # --- changes -------------------------------------------------------------------------------------------------

    def add(self, name: str, password: str, admin: bool = False, groups: tuple | None = None) -> User:
        if not _NAME.match(name or ""):
            raise UserError(f"{name!r} is not a usable user name (1-64 letters, digits, _ . @ -)")
        with self._lock:
            self._load()
            if name in self._users:
                raise UserError(f"user {name!r} exists already")
            groups = groups or (("admins", "users") if admin else ("users",))
            unknown = [g for g in groups if g not in GROUPS]
            if unknown:
                raise UserError(f"unknown group(s) {', '.join(unknown)} (known: {', '.join(GROUPS)})")
            user = User(name, tuple(groups), True, hash_password(password), None)
            self._users[name] = user
            self._save()
            return user

    def remove(self, name: str) -> None:
        with self._lock:
            self._load()
            if name not in self._users:
                raise UserError(f"no user {name!r}")
            del self._users[name]
            self._appkeys = [k for k in self._appkeys if k["user"] != name]
            self._save()

    def set_password(self, name: str, password: str) -> None:
        with self._lock:
            self._load()
            user = self._users.get(name)
            if user is None:
                raise UserError(f"no user {name!r}")
            user.password = hash_password(password)
            self._save()

    def new_apikey(self, name: str) -> str:
        with self._lock:
            self._load()
            user = self._users.get(name)
            if user is None:
                raise UserError(f"no user {name!r}")
            user.apikey = new_key()
            self._save()
            return user.apikey

    def grant_appkey(self, user_name: str, app: str) -> str:
        """The key of ``app`` for ``user_name``: the same user and app name (case-insensitive) keep one key."""
        with self._lock:
            self._load()
            if user_name not in self._users:
                raise UserError(f"no user {user_name!r}")
            for entry in self._appkeys:
                if entry["user"] == user_name and entry["app"].lower() == app.lower():
                    return entry["key"]
            key = new_key()
            self._appkeys.append({"user": user_name, "app": app, "key": key})
            self._save()
            return key

    def revoke_appkey(self, user_name: str, app: str) -> bool:
        with self._lock:
            self._load()
            before = len(self._appkeys)
            self._appkeys = [k for k in self._appkeys
                             if not (k["user"] == user_name and k["app"].lower() == app.lower())]
            if len(self._appkeys) != before:
                self._save()
                return True
            return False


_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash of a random password: verifying an unknown name against it costs what a real verification costs."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher().hash(secrets.token_hex(16))
    return _dummy_hash
