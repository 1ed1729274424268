"""Real cameras for the timelapse tests and benchmark: an HTTP snapshot server in a thread whose answers a test
chooses (good JPEGs, HTML pages, empty bodies, hangs, endless streams, 500s, basic/digest auth), frames on disk,
and ffprobe."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def jpeg(number: int = 0, size=(320, 240)) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, ((number * 37) % 256, 80, 160))
    ImageDraw.Draw(image).text((10, 10), f"frame {number}", fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def png(size=(64, 48)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(out, "PNG")
    return out.getvalue()


class Camera:
    """``answer(n)`` → one of "good", "html", "empty", "hang", "stream", "error", "png", "truncated" for request n
    (1-based); a good answer is ``frame``, or a JPEG drawn for that request.  Serves on a free loopback port;
    ``url``; ``close()``.  ``tls``: (certificate file, key file) to serve HTTPS."""

    def __init__(self, answer=lambda n: "good", auth: str | None = None, user="cam", password="secret",
                 frame: bytes | None = None, tls: tuple | None = None):
        self.answer = answer
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def do_GET(self):
                if auth and not camera._authorised(self, auth, user, password):
                    return
                with camera.lock:
                    camera.requests += 1
                    number = camera.requests
                kind = camera.answer(number)
                if kind == "hang":
                    camera.release.wait(30)
                    return
                if kind == "stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                    self.end_headers()
                    chunk = jpeg(number) * 4
                    try:
                        while not camera.release.is_set():
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                    return
                if kind == "error":
                    self.send_error(500, "camera busy")
                    return
                body, ctype = {"good": (frame or jpeg(number), "image/jpeg"), "png": (png(), "image/png"),
                               "html": (b"<html><body><h1>403 Forbidden</h1></body></html>" * 4, "text/html"),
                               "empty": (b"", "image/jpeg"),
                               "truncated": (jpeg(number)[:-200], "image/jpeg")}[kind]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:   # (certificate, key) files
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/snapshot"

    @staticmethod
    def _authorised(handler, kind, user, password) -> bool:
        header = handler.headers.get("Authorization") or ""
        if kind == "basic":
            import base64

            if header == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
                return True
            challenge = 'Basic realm="cam"'
        else:
            fields = dict(item.strip().split("=", 1) for item in header[7:].split(",") if "=" in item) \
                if header.startswith("Digest ") else {}
            fields = {k: v.strip('"') for k, v in fields.items()}
            if fields:
                md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731
                ha1 = md5(f"{user}:cam:{password}")
                ha2 = md5(f"GET:{fields.get('uri')}")
                expected = md5(f"{ha1}:{fields.get('nonce')}:{fields.get('nc')}:{fields.get('cnonce')}:auth:{ha2}")
                if fields.get("response") == expected and fields.get("username") == user:
                    return True
            challenge = 'Digest realm="cam", nonce="abc123", qop="auth", algorithm=MD5'
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", challenge)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def self_signed(directory) -> tuple:
    """A throw-away certificate for 127.0.0.1 (openssl, as a camera's own would be)."""
    cert, key = f"{directory}/cam.crt", f"{directory}/cam.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def every(n: int, bad: str):
    """Every n-th request answers ``bad``, the others a good frame."""
    return lambda number: bad if number % n == 0 else "good"


def write_frames(job, count: int, size=(320, 240)):
    data = [jpeg(i, size) for i in range(min(count, 8))]
    for number in range(1, count + 1):
        job.frame(number).write_bytes(data[number % len(data)])


def probe(movie) -> dict:
    """ffprobe's frame count (decoded) and duration of a movie's video stream."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames,duration", "-of", "json", str(movie)],
                         capture_output=True, check=True, timeout=120).stdout
    stream = json.loads(out)["streams"][0]
    return {"frames": int(stream["nb_read_frames"]), "duration": float(stream["duration"])}


counter = itertools.count(1)
