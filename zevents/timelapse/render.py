"""Rendering: one job's frames into a movie with the real ffmpeg, OctoPrint's command line, and its events.

``render(...)`` fills ``webcam.ffmpegCommandline`` (OctoPrint's placeholders: ffmpeg, fps, input, videocodec,
threads, bitrate, containerformat, filters, output) word by word — no shell: the template is split first, so a
placeholder is only ever one argument (``{filters}`` is the pair ``-vf <chain>``, or nothing) — adds ``-progress
pipe:1 -nostats``, and runs it ``nice``d, in its own session, killed with its parent and at ``render_timeout``.

Events: ``MovieRendering``, ``MovieRenderProgress{movie, progress}`` (ours, each new percent of frames encoded),
then ``MovieDone`` or ``MovieFailed{returncode, reason}`` (``returncode``, ``no_frames`` or ``unknown``), each with
OctoPrint's ``gcode``, ``movie`` (full path), ``movie_basename`` and ``movie_prefix``.

The movie is written as ``.<name>.part.<ext>`` beside its final name and renamed only once ffmpeg exited 0: a movie
that is listed is whole.  An ffmpeg killed by a signal (kill -9, the OOM killer) is not a verdict on the frames: the
job goes back to ``captured`` and is retried, up to ``render_attempts`` times, counted across restarts.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading

from zevents.timelapse import store
from zevents.timelapse.settings import DEFAULT_THUMBNAIL_COMMANDLINE, Settings

log = logging.getLogger("zevents.timelapse.render")

RETRY, DONE, FAILED = "retry", "done", "failed"


def filter_chain(settings: Settings) -> str:
    chain = ["format=yuv420p"]
    if settings.flip_h:
        chain.append("hflip")
    if settings.flip_v:
        chain.append("vflip")
    if settings.rotate90:
        chain.append("transpose=2")
    return ",".join(chain)


def fill(template: str, values: dict) -> list:
    """argv from a command-line template: split like a shell would, then each word filled on its own."""
    argv = []
    for word in shlex.split(template):
        if word == "{filters}":
            argv.extend(values.get("filters") or [])
            continue
        argv.append(word.format_map(_Plain(values)))
    return argv


class _Plain(dict):
    def __missing__(self, key):
        raise KeyError(f"unknown placeholder {{{key}}} in the ffmpeg command line")

    def __getitem__(self, key):
        value = super().__getitem__(key) if key in self else self.__missing__(key)
        return " ".join(value) if isinstance(value, list) else value


def command(settings: Settings, frames_pattern: str, output: str, fps: int | None = None) -> list:
    values = {"ffmpeg": settings.ffmpeg or "ffmpeg", "fps": str(fps or settings.fps), "input": frames_pattern,
              "videocodec": settings.codec, "threads": str(settings.threads), "bitrate": settings.bitrate,
              "containerformat": settings.container, "filters": ["-vf", filter_chain(settings)], "output": output}
    argv = fill(settings.commandline, values)
    if "-progress" not in argv:
        argv[1:1] = ["-progress", "pipe:1", "-nostats", "-loglevel", "error"]
    return argv


def _child_setup(niceness: int):
    def setup():
        os.setsid()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no ffmpeg outlives its renderer
        except OSError:
            pass
        if niceness:
            os.nice(niceness)
    return setup


def movie_payload(job: store.Job, data: dict, movie) -> dict:
    return {"gcode": data.get("gcode") or "unknown", "movie": str(movie),
            "movie_basename": os.path.basename(str(movie)), "movie_prefix": job.id}


def render(config, settings: Settings, job: store.Job, publish, stop: threading.Event | None = None,
           on_process=None) -> str:
    """Renders one job now (holding its lock); ``publish(name, payload)`` sends the events.  Returns DONE,
    FAILED or RETRY (ffmpeg was killed by a signal and attempts remain)."""
    with job.lock():
        data = job.read()
        postfix = data.get("postfix") or ""
        name = f"{job.id}{postfix}.{settings.extension}"
        folder = store.movie_folder(config, job.printer)
        movie = folder / name
        payload = movie_payload(job, data, movie)
        frames = job.frame_count()
        if frames == 0:
            job.update(state="failed", render=False, error="no frames")
            publish("MovieFailed", dict(payload, returncode=0, out="", error="", reason="no_frames"))
            return FAILED
        folder.mkdir(parents=True, exist_ok=True)
        attempts = int(data.get("attempts") or 0) + 1
        job.update(state="rendering", attempts=attempts)
        publish("MovieRendering", payload)
        partial = folder / f".{job.id}{postfix}.part.{settings.extension}"
        try:
            returncode, out, err = _run_ffmpeg(settings, command(
                settings, str(job.path / store.FRAME_PATTERN), str(partial), data.get("fps")),
                frames, lambda percent: publish("MovieRenderProgress", {"movie": str(movie), "progress": percent}),
                stop, on_process)
            if returncode == 0 and partial.exists():
                os.replace(partial, movie)
                thumbnail(settings, movie, job.frame(frames))
                job.remove()
                publish("MovieDone", payload)
                log.info("timelapse: rendered %s (%d frames)", movie, frames)
                return DONE
            if returncode < 0 and attempts < settings.render_attempts and not (stop and stop.is_set()):
                job.update(state="captured", render=True)
                log.warning("timelapse: ffmpeg was killed by signal %d while rendering %s; it will be retried "
                            "(attempt %d of %d)", -returncode, job.id, attempts, settings.render_attempts)
                return RETRY
            if stop is not None and stop.is_set():
                job.update(state="captured", render=True, attempts=attempts - 1)
                return RETRY
            job.update(state="failed", render=False, returncode=returncode, error=err[-2000:])
            publish("MovieFailed", dict(payload, returncode=returncode, out=out[-2000:], error=err[-2000:],
                                        reason="returncode"))
            log.error("timelapse: ffmpeg failed on %s with %s: %s", job.id, returncode, err[-500:])
            return FAILED
        except Exception as exc:
            log.exception("timelapse: render of %s failed", job.id)
            job.update(state="failed", render=False, error=repr(exc))
            publish("MovieFailed", dict(payload, returncode=255, out="Unknown error", error=str(exc) or repr(exc),
                                        reason="unknown"))
            return FAILED
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()


def _run_ffmpeg(settings: Settings, argv: list, frames: int, on_percent, stop, on_process) -> tuple:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=_child_setup(settings.nice))
    if on_process is not None:
        on_process(process)
    errors = collections.deque(maxlen=200)
    reader = threading.Thread(target=lambda: errors.extend(
        line.decode("utf-8", "replace") for line in process.stderr), daemon=True)
    reader.start()
    timed_out = threading.Event()

    def watchdog():
        if stop is not None:
            while process.poll() is None and not stop.wait(0.5):
                pass
        if process.poll() is None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(settings.render_timeout, lambda: (timed_out.set(), _kill(process)))
    timer.daemon = True
    timer.start()
    stopper = threading.Thread(target=watchdog, daemon=True) if stop is not None else None
    if stopper is not None:
        stopper.start()
    last = -1
    out_tail = collections.deque(maxlen=50)
    try:
        for raw in process.stdout:
            line = raw.decode("ascii", "replace").strip()
            out_tail.append(line)
            if line.startswith("frame="):
                try:
                    percent = min(100, int(line[6:]) * 100 // max(frames, 1))
                except ValueError:
                    continue
                if percent > last:
                    last = percent
                    on_percent(percent)
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            _kill(process)
            process.wait()
        reader.join(5)
    err = "".join(errors)
    if timed_out.is_set() and (stop is None or not stop.is_set()):
        err += f"\nkilled after render_timeout {settings.render_timeout:g} s"
        returncode = returncode if returncode > 0 else 1  # a hung ffmpeg is a verdict, not a crash to retry
    return returncode, "\n".join(out_tail), err


def _kill(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def thumbnail(settings: Settings, movie, last_frame=None) -> bool:
    """``<movie>.thumb.jpg``; a failure is only logged.  OctoPrint's default command line decodes the movie's last
    second to get its last frame: that frame is on disk already, so it is copied instead (a second ffmpeg run
    costs ~10 % of a render); a customised ``ffmpegThumbnailCommandline`` is run as written."""
    target = f"{movie}.thumb.jpg"
    if last_frame is not None and settings.thumbnail_commandline == DEFAULT_THUMBNAIL_COMMANDLINE:
        temporary = f"{os.path.dirname(target)}/.{os.path.basename(target)}.tmp"
        try:
            shutil.copyfile(last_frame, temporary)
            os.replace(temporary, target)
            return True
        except OSError as exc:
            log.warning("timelapse: no thumbnail for %s: %s", movie, exc)
            return False
    argv = fill(settings.thumbnail_commandline, {"ffmpeg": settings.ffmpeg or "ffmpeg", "input": str(movie),
                                                  "output": target})
    argv[1:1] = ["-loglevel", "error", "-y"]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                                preexec_fn=_child_setup(settings.nice))
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("timelapse: no thumbnail for %s: %s", movie, exc)
        return False
    if result.returncode != 0:
        log.warning("timelapse: no thumbnail for %s: %s", movie, result.stderr.decode("utf-8", "replace")[-300:])
        return False
    return True
