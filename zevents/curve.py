"""CURVE encryption and ZAP authentication of the bus (``bus.curve``), and `zevents keys new`.

With ``bus.curve`` set, the broker's ingest, publish and control sockets are CURVE servers (its ``server_secret``)
and a ZAP handler in the broker admits only the clients whose public key is in ``allowed_clients`` (plus the node's
own ``client_public``).  Every zevents client (publisher, subscriber, control) then connects with ``server_public``
and its own ``client_public``/``client_secret``.  A client with another key is refused by the handshake: it
receives nothing and what it sends is never read.

Without it, the bus is unauthenticated: fine on ipc:// (a 0700 directory) and loopback, and the broker warns at
start when an endpoint is TCP beyond loopback.
"""
from __future__ import annotations

import ipaddress
import logging

import zmq

log = logging.getLogger("zevents.curve")

ZAP_DOMAIN = "zevents"


class CurveError(ValueError):
    """``bus.curve`` lacks a key a socket needs."""


def new_keypair() -> tuple[str, str]:
    """(public, secret), Z85 text of 40 characters each."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def _key(curve: dict, name: str) -> bytes:
    value = curve.get(name)
    if not value:
        raise CurveError(f"bus.curve.{name} is needed here (zevents keys new makes a pair)")
    return value.encode()


def client(sock: zmq.Socket, curve: dict):
    """Make ``sock`` a CURVE client of the broker (before connect)."""
    sock.curve_serverkey = _key(curve, "server_public")
    sock.curve_publickey = _key(curve, "client_public")
    sock.curve_secretkey = _key(curve, "client_secret")


def server(sock: zmq.Socket, curve: dict):
    """Make ``sock`` a CURVE server whose clients the ZAP handler checks (before bind)."""
    sock.curve_server = True
    sock.curve_secretkey = _key(curve, "server_secret")
    sock.zap_domain = ZAP_DOMAIN.encode()


def allowed_keys(curve: dict) -> set[str]:
    allowed = set(curve.get("allowed_clients") or ())
    if curve.get("client_public"):
        allowed.add(curve["client_public"])
    return allowed


class _Allowed:
    """The ZAP credentials check: a client's public key must be one of the allowed ones."""

    def __init__(self, allowed: set[str]):
        self.allowed = {key.encode() for key in allowed}
        self.refused = 0

    def callback(self, domain, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("bus: refused a client with an unknown CURVE key (%d refused so far)", self.refused)
        return False


def start_authenticator(context: zmq.Context, curve: dict):
    """The ZAP handler of the broker's context (a thread); returns it (``stop()`` it at close)."""
    from zmq.auth.thread import ThreadAuthenticator

    allowed = allowed_keys(curve)
    if not allowed:
        log.warning("bus.curve has no allowed_clients and no client_public: every client will be refused")
    auth = ThreadAuthenticator(context, log=logging.getLogger("zevents.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_Allowed(allowed))
    return auth


def exposed_endpoints(endpoints) -> list[str]:
    """The TCP endpoints bound beyond loopback (any interface, a routable address, a host name)."""
    exposed = []
    for endpoint in endpoints:
        if not endpoint.startswith("tcp://"):
            continue
        host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
        if host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass   # "*", an interface or host name: reachable from the network
        exposed.append(endpoint)
    return exposed


def keys_new() -> str:
    """`zevents keys new`: a fresh key pair, as YAML for bus.curve."""
    public, secret = new_keypair()
    return (f"# a CURVE key pair for bus.curve (keep the secret one secret)\n"
            f"public: \"{public}\"\n"
            f"secret: \"{secret}\"\n")
