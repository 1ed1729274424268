"""The virtual camera (`python -m zevents.service camera`, started by the node beside a VIRTUAL printer): an HTTP
snapshot endpoint whose JPEG shows the part the virtual printer has printed so far.

How it knows the toolpath: it listens on the bus like any subscriber.  ``PrintStarted`` names the file (a local
path: it reads it), ``PrintProgress`` says how far the print is (``fileposition``, in bytes) and ``LayerChanged``
which layer it reached (the parser's own layer offsets, so a frame taken on a layer change shows that layer
begun, however coarse the progress events are).  Every extruding move before that byte offset is drawn, in an
isometric view, coloured by height; ``PrintDone`` draws the whole file.  The picture is kept and only the new
moves are drawn on each request.

It serves ``GET /snapshot`` (and mjpg-streamer's ``/?action=snapshot``) on loopback, on ``timelapse.virtual_camera
.port`` (0: any free port), and writes its URL to ``<runtime dir>/<node>/virtual-camera.json`` for the timelapse's
``snapshot: virtual`` camera.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("zevents.camera")

_WORD = re.compile(rb"([XYZEG])\s*(-?\d*\.?\d+)")
COS30, SIN30 = math.cos(math.radians(30)), 0.5
BACKGROUND, BED, TEXT = (24, 26, 30), (70, 74, 82), (220, 220, 220)


class Toolpath:
    """The extruding moves of a G-code file (byte offset, x0, y0, x1, y1, z) and where each layer begins."""

    def __init__(self, path: str):
        self.path = path
        self.segments: list = []
        self.layer_offsets: dict = {}
        data = Path(path).read_bytes()
        self._moves(data)
        self._layers(data)
        if self.segments:
            # The part, not the purge line along the bed's edge: frame what is printed above the first layer.
            first_z = min(s[5] for s in self.segments)
            part = [s for s in self.segments if s[5] > first_z] or self.segments
            xs = [s[1] for s in part] + [s[3] for s in part]
            ys = [s[2] for s in part] + [s[4] for s in part]
            zs = [s[5] for s in part]
            self.bounds = (min(xs), max(xs), min(ys), max(ys), 0.0, max(zs))
        else:
            self.bounds = (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)

    def _moves(self, data: bytes):
        x = y = z = e = 0.0
        absolute, absolute_e = True, True
        offset = 0
        for raw in data.splitlines(keepends=True):
            line = raw.split(b";", 1)[0].strip().upper()
            here, offset = offset, offset + len(raw)
            if not line:
                continue
            if line.startswith((b"G0", b"G1", b"G2", b"G3")) and line[2:3] in (b" ", b"X", b"Y", b"Z", b"E", b"F", b""):
                words = {k: float(v) for k, v in _WORD.findall(line[2:])}
                nx = (words[b"X"] if absolute else x + words[b"X"]) if b"X" in words else x
                ny = (words[b"Y"] if absolute else y + words[b"Y"]) if b"Y" in words else y
                nz = (words[b"Z"] if absolute else z + words[b"Z"]) if b"Z" in words else z
                extruding = False
                if b"E" in words:
                    ne = words[b"E"] if absolute_e else e + words[b"E"]
                    extruding = ne > e
                    e = ne
                if extruding and (nx != x or ny != y):
                    self.segments.append((here, x, y, nx, ny, nz))
                x, y, z = nx, ny, nz
            elif line.startswith(b"G90"):
                absolute = absolute_e = True
            elif line.startswith(b"G91"):
                absolute = absolute_e = False
            elif line.startswith(b"M82"):
                absolute_e = True
            elif line.startswith(b"M83"):
                absolute_e = False
            elif line.startswith(b"G92"):
                words = {k: float(v) for k, v in _WORD.findall(line[3:])}
                e = words.get(b"E", e)

    def _layers(self, data: bytes):
        """Layer starts as the printer link's parser sees them (the same LayerChanged numbers)."""
        from zevents.parser import Parser

        parser = Parser(config={"blocked_commands": [], "ignored_commands": []})
        for event in parser.feed_sent(data) + parser.flush():
            if event.name == "LayerChanged":
                self.layer_offsets.setdefault(event.payload["layer"], event.offset)


class Picture:
    """The drawing, kept between requests: only moves not yet drawn are added."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.toolpath: Toolpath | None = None
        self.image = None
        self.drawn = 0          # segments drawn so far
        self.lock = threading.Lock()

    def _project(self, x, y, z):
        return self.ox + (x - y) * COS30 * self.scale, self.oy + ((x + y) * SIN30 - z) * self.scale

    def reset(self, toolpath: Toolpath | None):
        from PIL import Image, ImageDraw

        self.toolpath = toolpath
        self.drawn = 0
        self.image = Image.new("RGB", (self.width, self.height), BACKGROUND)
        x0, x1, y0, y1, _, z1 = toolpath.bounds if toolpath else (0, 1, 0, 1, 0, 1)
        corners = [((x - y) * COS30, (x + y) * SIN30 - z) for x in (x0, x1) for y in (y0, y1) for z in (0, z1)]
        us, vs = [c[0] for c in corners], [c[1] for c in corners]
        margin = 0.1
        self.scale = min(self.width * (1 - 2 * margin) / max(max(us) - min(us), 1e-6),
                         self.height * (1 - 2 * margin) / max(max(vs) - min(vs), 1e-6))
        self.ox = self.width / 2 - (max(us) + min(us)) / 2 * self.scale
        self.oy = self.height / 2 - (max(vs) + min(vs)) / 2 * self.scale
        pad = 5
        bed = [self._project(x, y, 0) for x, y in ((x0 - pad, y0 - pad), (x1 + pad, y0 - pad), (x1 + pad, y1 + pad),
                                                   (x0 - pad, y1 + pad))]
        ImageDraw.Draw(self.image).polygon(bed, fill=BED)

    def jpeg(self, position: int, caption: str) -> bytes:
        from PIL import ImageDraw

        with self.lock:
            if self.image is None:
                self.reset(None)
            toolpath = self.toolpath
            if toolpath is not None:
                draw = ImageDraw.Draw(self.image)
                top = toolpath.bounds[5] or 1.0
                segments = toolpath.segments
                index = self.drawn
                width = max(1, int(self.scale * 0.45))
                while index < len(segments) and segments[index][0] < position:
                    _, x0, y0, x1, y1, z = segments[index]
                    shade = 0.45 + 0.55 * min(z / top, 1.0)
                    draw.line([self._project(x0, y0, z), self._project(x1, y1, z)],
                              fill=(int(250 * shade), int(140 * shade), int(40 * shade)), width=width)
                    index += 1
                self.drawn = index
            frame = self.image.copy()
        ImageDraw.Draw(frame).text((10, 10), caption, fill=TEXT)
        out = io.BytesIO()
        frame.save(out, "JPEG", quality=85)
        return out.getvalue()


class VirtualCamera:
    """State from the bus + the picture; ``snapshot()`` is the JPEG of now."""

    def __init__(self, width: int = 640, height: int = 480):
        self.picture = Picture(width, height)
        self.position = 0
        self.layer = None
        self.name = None
        self.state_lock = threading.Lock()

    def on_event(self, name: str, payload: dict):
        if name == "PrintStarted":
            path = payload.get("path")
            toolpath = None
            if payload.get("origin", "local") == "local" and path and os.path.isfile(path):
                try:
                    toolpath = Toolpath(path)
                except (OSError, ValueError) as exc:
                    log.warning("camera: cannot read %s: %s", path, exc)
            with self.picture.lock:
                self.picture.reset(toolpath)
            with self.state_lock:
                self.position, self.layer, self.name = 0, None, payload.get("name")
        elif name == "PrintProgress":
            with self.state_lock:
                self.position = max(self.position, int(payload.get("fileposition") or 0))
        elif name == "LayerChanged":
            toolpath = self.picture.toolpath
            with self.state_lock:
                self.layer = payload.get("layer")
                if toolpath is not None and self.layer in toolpath.layer_offsets:
                    self.position = max(self.position, toolpath.layer_offsets[self.layer])
        elif name == "PrintDone":
            with self.state_lock:
                self.position = 1 << 62

    def snapshot(self) -> bytes:
        with self.state_lock:
            position, layer, name = self.position, self.layer, self.name
        caption = f"zevents virtual camera  {name or 'idle'}" + (f"  layer {layer}" if layer is not None else "")
        return self.picture.jpeg(position, caption)


class _Handler(BaseHTTPRequestHandler):
    camera: VirtualCamera = None
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def do_GET(self):
        if self.path.split("?")[0] not in ("/snapshot", "/") or (self.path.startswith("/?") and
                                                                 "action=snapshot" not in self.path):
            self.send_error(404, "try /snapshot")
            return
        body = self.camera.snapshot()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(camera: VirtualCamera, port: int = 0) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"camera": camera})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="camera-http", daemon=True).start()
    return server


def run(config) -> int:
    """The node's virtual camera: until SIGTERM."""
    from zevents import bus, config as zconfig
    from zevents.service import freeze_startup_heap
    from zevents.timelapse.sources import VIRTUAL_CAMERA_FILE
    from zevents.timelapse.store import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.nice(19)   # a stand-in for a camera's own hardware: its drawing must not take the link's CPU
    settings = config.get("timelapse", "virtual_camera") or {}
    camera = VirtualCamera(int(settings.get("width", 640)), int(settings.get("height", 480)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    subscriber = bus.Subscriber(config.bus, groups=["print", "gcode"],
                                events=["PrintStarted", "PrintProgress", "LayerChanged", "PrintDone"])
    server = serve(camera, int(settings.get("port", 0)))
    url_file = zconfig.runtime_dir() / config.node / VIRTUAL_CAMERA_FILE
    url_file.parent.mkdir(mode=0o700, exist_ok=True)
    url = f"http://127.0.0.1:{server.server_address[1]}/snapshot"
    write_json_atomic(url_file, {"url": url, "pid": os.getpid()})
    log.info("camera: virtual camera at %s", url)
    bus.announce_started(config, "camera")
    freeze_startup_heap()
    try:
        while not stop.is_set():
            envelope = subscriber.recv(timeout=0.2)
            if envelope is not None:
                camera.on_event(envelope.name, envelope.payload or {})
    finally:
        subscriber.close()
        server.shutdown()
        server.server_close()
        try:
            if json.loads(url_file.read_text()).get("pid") == os.getpid():
                url_file.unlink()
        except (OSError, ValueError):
            pass
    return 0
