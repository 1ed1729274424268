"""A gateway node for tests: broker (the running_broker fixture), files service, printer service on the virtual
printer and the gateway itself, each a real process on ipc sockets under a short tmp dir and a free TCP port; plus
a small synchronous HTTP client that speaks exactly what a client sends (headers, body bytes, cookies)."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.conftest import start_service_process
from tests.files_helpers import stop_service as stop  # noqa: F401  (re-exported for the gateway tests)

ZEVENTS = [sys.executable, "-m", "zevents"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, bus_config, port: int, gateway: dict | None = None, **sections) -> Path:
    data = {
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "files": {"commands": f"ipc://{directory}/files.sock", "analysis": {"run_at": "never"}, "watch": False},
        "slicing": {"commands": f"ipc://{directory}/slicing.sock"},
        "printer": {"commands": f"ipc://{directory}/printer.sock", "timeout": 3.0,
                    "virtual": {"firmware": "marlin", "speed": 0, "tools": 1}},
        "gateway": {"listen": f"127.0.0.1:{port}", "commands": f"ipc://{directory}/gateway.sock", **(gateway or {})},
        "data_dir": str(directory / "data"),
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(config: Path, *args, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(ZEVENTS + list(args) + ["-c", str(config)], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def start(config: Path, bus_config, service: str, argv: list, stderr=None) -> subprocess.Popen:
    return start_service_process(ZEVENTS + argv + ["-c", str(config)], bus_config, service, stderr=stderr)


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class Client:
    """HTTP/1.1 to the gateway with an optional API key; keeps cookies only when ``cookies`` is true (a browser)."""

    def __init__(self, port: int, key: str | None = None, cookies: bool = False):
        self.port = port
        self.key = key
        self.jar: dict = {} if cookies else None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                content_type: str | None = None) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            sent = dict(headers or {})
            if self.key:
                sent.setdefault("X-Api-Key", self.key)
            if content_type:
                sent["Content-Type"] = content_type
            if self.jar:
                sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.jar.items())
            connection.request(method, path, body=body, headers=sent)
            reply = connection.getresponse()
            data = reply.read()
            cookies = reply.headers.get_all("Set-Cookie") or []
            if self.jar is not None:
                for cookie in cookies:
                    name, _, rest = cookie.partition("=")
                    value = rest.split(";", 1)[0]
                    if 'expires=Thu, 01 Jan 1970' in cookie or 'Max-Age=0' in cookie:
                        self.jar.pop(name, None)
                    else:
                        self.jar[name] = value.strip('"')
            response = Response(reply.status, reply.headers, data)
            response.set_cookies = cookies
            return response
        finally:
            connection.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post_json(self, path: str, data, headers: dict | None = None) -> Response:
        return self.request("POST", path, json.dumps(data).encode(), headers, "application/json")

    def upload(self, path: str, fields: list, headers: dict | None = None) -> Response:
        """multipart/form-data with the fields in the given order: (name, value) or (name, filename, bytes)."""
        boundary = uuid.uuid4().hex
        parts = []
        for field in fields:
            if len(field) == 3:
                name, filename, data = field
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                             f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                             + data + b"\r\n")
            else:
                name, value = field
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                             f'{value}\r\n'.encode())
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", path, body, headers, f"multipart/form-data; boundary={boundary}")


async def raw_socket(http, port: int, key: str, subscribe: dict):
    """An authenticated raw push socket (``/sockjs/websocket``) on an aiohttp session, as farm managers open one:
    passive login with the key, ``connected`` read, then ``auth`` with ``subscribe`` in one message."""
    login = await (await http.post(f"http://127.0.0.1:{port}/api/login", json={"passive": True},
                                   headers={"X-Api-Key": key})).json()
    ws = await http.ws_connect(f"ws://127.0.0.1:{port}/sockjs/websocket", max_msg_size=0)
    await ws.receive(timeout=30)                         # connected
    await ws.send_str(json.dumps({"auth": f"{login['name']}:{login['session']}", "subscribe": subscribe}))
    return ws
