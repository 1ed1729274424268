"""Who a request is: OctoPrint's credential rules for the gateway.

Owns the order credentials are looked at (session cookie first, then an API key from ``X-Api-Key``,
``Authorization: Bearer`` or an ``apikey`` query/form value), login sessions (also what the push socket's ``auth``
message names; stale after ``gateway.session_stale_after`` seconds without use), the CSRF double-submit rule for
cookie requests, and the throttling of failed logins and app-key requests per client address.
"""
from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

from zevents.gateway.users import User

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class Identity:
    user: User | None
    mechanism: str | None          # "apikey", "appkey", "password", or None (anonymous)
    session: str | None = None

    @property
    def name(self) -> str | None:
        return self.user.name if self.user else None

    @property
    def permissions(self) -> frozenset:
        return self.user.permissions if self.user else frozenset()

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def by_key(self) -> bool:
        return self.mechanism in ("apikey", "appkey")


ANONYMOUS = Identity(None, None)


@dataclass
class Session:
    user: str
    created: float
    seen: float


class Sessions:
    """Login sessions by id: made by a login (active or passive), used by cookies and by the socket's ``auth``."""

    def __init__(self, stale_after: float = 900.0):
        self.stale_after = stale_after
        self._sessions: dict = {}

    def new(self, user: str) -> str:
        self._prune()
        token = secrets.token_hex(32)
        now = time.monotonic()
        self._sessions[token] = Session(user, now, now)
        return token

    def user(self, token: str | None, touch: bool = True) -> str | None:
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.stale_after:
            del self._sessions[token]
            return None
        if touch:
            session.seen = now
        return session.user

    def end(self, token: str | None) -> str | None:
        session = self._sessions.pop(token, None) if token else None
        return session.user if session else None

    def end_user(self, user: str) -> None:
        for token in [t for t, s in self._sessions.items() if s.user == user]:
            del self._sessions[token]

    def _prune(self):
        now = time.monotonic()
        for token in [t for t, s in self._sessions.items() if now - s.seen > self.stale_after]:
            del self._sessions[token]


def csrf_ok(cookie_value: str | None, header_value: str | None) -> bool:
    return bool(cookie_value) and bool(header_value) and hmac.compare_digest(cookie_value.encode(),
                                                                             header_value.encode())


class RateLimiter:
    """OctoPrint's limits on failed logins and app-key requests: 3 a minute, 5 in 10 minutes, 10 an hour."""

    WINDOWS = ((60.0, 3), (600.0, 5), (3600.0, 10))

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._hits: dict = {}

    def blocked(self, client: str) -> bool:
        if not self.enabled:
            return False
        hits = self._hits.get(client)
        if not hits:
            return False
        now = time.monotonic()
        while hits and now - hits[0] > self.WINDOWS[-1][0]:
            hits.popleft()
        return any(sum(1 for t in hits if now - t <= span) >= limit for span, limit in self.WINDOWS)

    def hit(self, client: str) -> None:
        if self.enabled:
            self._hits.setdefault(client, deque(maxlen=64)).append(time.monotonic())
