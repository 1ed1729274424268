"""Camera sources: one frame from an HTTP(S) snapshot URL or from a command, checked to be a whole image.

A frame is a failure (``FrameError``, with a message for ``CaptureFailed.error``) unless it is a whole JPEG (SOI ...
EOI) or PNG (signature ... IEND) between ``min_frame_bytes`` and ``max_frame_bytes``: an HTML error page, an empty
body, a truncated JPEG or a camera that streams forever are failed frames, never frames.  HTTP: basic or digest
auth, a timeout per attempt, ``retries`` more attempts with doubling backoff.  A command runs without a shell, its
image on stdout; it is killed at its timeout.  PNG frames are stored as JPEG (ffmpeg's input pattern wants one
format).
"""
from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

from zevents.timelapse.settings import VIRTUAL, Camera

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
VIRTUAL_CAMERA_FILE = "virtual-camera.json"


class FrameError(Exception):
    pass


def image_kind(data: bytes) -> str:
    """'jpeg' or 'png' for a whole image; raises FrameError saying what the bytes are instead."""
    if not data:
        raise FrameError("the camera answered 0 bytes")
    if data.startswith(JPEG_START):
        if data.rstrip(b"\x00\r\n ").endswith(JPEG_END):
            return "jpeg"
        raise FrameError(f"a truncated JPEG ({len(data)} bytes, no end marker)")
    if data.startswith(PNG_SIGNATURE):
        if data.endswith(PNG_END):
            return "png"
        raise FrameError(f"a truncated PNG ({len(data)} bytes, no IEND)")
    head = data[:60].decode("utf-8", "replace").replace("\n", " ").strip()
    raise FrameError(f"not a JPEG or PNG image ({len(data)} bytes starting {head!r})")


def as_jpeg(data: bytes, kind: str) -> bytes:
    if kind == "jpeg":
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=92)
        return out.getvalue()


def virtual_camera_url(runtime: Path) -> str:
    """The URL the node's virtual camera serves on (it writes it when it starts)."""
    try:
        return json.loads((runtime / VIRTUAL_CAMERA_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise FrameError("the virtual camera is not running (no virtual-camera.json in the runtime directory)") \
            from None


class Source:
    """Takes frames from one camera.  ``async grab() -> bytes`` (JPEG); create and use it in one event loop."""

    def __init__(self, camera: Camera, min_bytes: int = 100, max_bytes: int = 20_000_000,
                 runtime: Path | None = None):
        self.camera = camera
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.runtime = runtime
        self._session = None

    async def grab(self) -> bytes:
        """A frame, after up to ``retries`` more attempts; FrameError with every attempt's reason otherwise."""
        camera = self.camera
        errors = []
        delay = camera.retry_backoff
        for attempt in range(camera.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                data = await (self._run_command() if camera.command else self._fetch())
                if len(data) < self.min_bytes:
                    raise FrameError(f"the camera answered 0 bytes" if not data else
                                     f"{len(data)} bytes is too small for a frame (min_frame_bytes {self.min_bytes})")
                return as_jpeg(data, image_kind(data))
            except FrameError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise FrameError(errors[0])
        raise FrameError(f"{len(errors)} attempts failed: " + "; ".join(errors))

    def _url(self) -> str:
        url = self.camera.snapshot
        if url == VIRTUAL:
            if self.runtime is None:
                raise FrameError("no runtime directory to find the virtual camera in")
            url = virtual_camera_url(self.runtime)
        return url

    async def _fetch(self) -> bytes:
        import aiohttp

        camera = self.camera
        if self._session is None:
            middlewares, headers = (), {}
            if camera.auth == "basic":
                headers["Authorization"] = aiohttp.encode_basic_auth(camera.username or "", camera.password or "")
            elif camera.auth == "digest":
                middlewares = (aiohttp.DigestAuthMiddleware(camera.username or "", camera.password or ""),)
            self._session = aiohttp.ClientSession(headers=headers, middlewares=middlewares,
                                                  connector=aiohttp.TCPConnector(limit=2))
        url = self._url()
        timeout = aiohttp.ClientTimeout(total=camera.timeout)
        try:
            async with self._session.get(url, timeout=timeout, ssl=True if camera.ssl_validation else False,
                                         allow_redirects=True) as response:
                if response.status != 200:
                    raise FrameError(f"HTTP {response.status} {response.reason or ''} from {url}".strip())
                if response.content_length is not None and response.content_length > self.max_bytes:
                    raise FrameError(f"the camera announced {response.content_length} bytes, more than "
                                     f"max_frame_bytes {self.max_bytes}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FrameError(f"the camera sent more than max_frame_bytes {self.max_bytes} "
                                         "(a stream URL instead of a snapshot URL?)")
                return bytes(body)
        except asyncio.TimeoutError:
            raise FrameError(f"no whole answer from {url} within {camera.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise FrameError(f"{type(exc).__name__}: {exc} ({url})") from None

    async def _run_command(self) -> bytes:
        camera = self.camera
        try:
            process = await asyncio.create_subprocess_exec(
                *camera.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise FrameError(f"cannot run {camera.command[0]!r}: {exc.strerror or exc}") from None
        try:
            stdout, stderr = await asyncio.wait_for(self._read_limited(process), camera.timeout)
        except asyncio.TimeoutError:
            _kill_group(process)
            await process.wait()
            raise FrameError(f"{camera.command[0]} did not finish within {camera.timeout:g} s (killed)") from None
        except FrameError:
            _kill_group(process)
            await process.wait()
            raise
        if process.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[-300:]
            raise FrameError(f"{camera.command[0]} exited with {process.returncode}" + (f": {tail}" if tail else ""))
        return stdout

    async def _read_limited(self, process):
        out = bytearray()
        err_task = asyncio.ensure_future(process.stderr.read())
        while True:
            chunk = await process.stdout.read(65536)
            if not chunk:
                break
            out += chunk
            if len(out) > self.max_bytes:
                err_task.cancel()
                raise FrameError(f"{self.camera.command[0]} wrote more than max_frame_bytes {self.max_bytes}")
        stderr = await err_task
        await process.wait()
        return bytes(out), stderr

    async def close(self):
        if self._session is not None:
            await self._session.close()
            self._session = None


def _kill_group(process):
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        try:
            process.kill()
        except ProcessLookupError:
            pass


def snapshot_once(camera: Camera, min_bytes: int = 100, max_bytes: int = 20_000_000,
                  runtime: Path | None = None) -> bytes:
    """One frame now, from a plain thread (`zevents snapshot`)."""
    async def grab():
        source = Source(camera, min_bytes, max_bytes, runtime)
        try:
            return await source.grab()
        finally:
            await source.close()

    return asyncio.run(grab())
