"""Running hook commands: spawn without a shell, feed stdin, keep a bounded tail of the output, kill at timeout;
and the :class:`Executor` that runs many of them at once, up to a limit, from one thread.

Spawning is the hot path of the hooks service, so it uses ``os.posix_spawn`` (vfork+exec in glibc, about a third of
``subprocess.Popen``'s cost here) with the child in a new session, hence its own process group: at the timeout the
whole group gets SIGTERM, then SIGKILL after ``KILL_GRACE`` seconds, so a hook's children die with it.  A command with
a ``cwd`` goes through ``subprocess.Popen``, since posix_spawn cannot change directory from Python.

The exit is watched through a pidfd, not by waiting for EOF on the pipes: a hook that leaves a background child
holding its stdout is done when its own process exits.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import threading
import time

log = logging.getLogger("zevents.hooks")

TAIL_BYTES = 4096
KILL_GRACE = 2.0
_READ = 65536
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_DUP2 = os.POSIX_SPAWN_DUP2
_DEFAULT_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGPIPE", "SIGXFSZ", "SIGXFZ")) if s)


class RunResult:
    __slots__ = ("argv", "pid", "returncode", "timed_out", "stdout", "stderr", "error", "started_ns", "duration")

    def __init__(self, argv, returncode=None, timed_out=False, stdout=b"", stderr=b"", error=None, started_ns=0,
                 duration=0.0):
        self.argv = argv
        self.pid = None
        self.returncode = returncode
        self.timed_out = timed_out
        self.stdout = stdout
        self.stderr = stderr
        self.error = error
        self.started_ns = started_ns
        self.duration = duration

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None


class _Tail:
    """The last ``limit`` bytes written to a stream."""

    __slots__ = ("buf", "limit", "total")

    def __init__(self, limit: int):
        self.buf = bytearray()
        self.limit = limit
        self.total = 0

    def add(self, data: bytes):
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.limit:
            del self.buf[:-self.limit]

    def value(self) -> bytes:
        data = bytes(self.buf[-self.limit:])
        return data if self.total <= self.limit else b"[...]" + data


def ensure_std_fds():
    """Open /dev/null on any of fds 0-2 that is closed, so new pipes never land there (the DUP2 actions of
    posix_spawn would then clobber them)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


_resolved: dict = {}


def _program(name: str, path: str | None) -> str:
    """The executable for a program name, searched in the hook's PATH once and remembered (a failed execve per
    PATH entry before the right one costs more than the rest of the spawn's Python side)."""
    if "/" in name:
        return name
    key = (name, path)
    found = _resolved.get(key)
    if found is None:
        found = shutil.which(name, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "not found in PATH", name)
        _resolved[key] = found
    return found


def _spawn(argv: list, env: dict, cwd: str | None, stdin_r: int, out_w: int, err_w: int, retry: bool = True) -> int:
    if cwd is None:
        path = env.get("PATH", os.defpath)
        program = _program(argv[0], path)
        try:
            # setsigdef: Python ignores SIGPIPE, and an ignored signal would stay ignored in the child.
            return os.posix_spawn(program, argv, env, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                                  file_actions=[(_DUP2, stdin_r, 0), (_DUP2, out_w, 1), (_DUP2, err_w, 2)])
        except FileNotFoundError:
            if not retry or _resolved.pop((argv[0], path), None) is None:
                raise
            return _spawn(argv, env, cwd, stdin_r, out_w, err_w, retry=False)  # the program moved: search again
    proc = subprocess.Popen(argv, stdin=stdin_r, stdout=out_w, stderr=err_w, env=env, cwd=cwd,
                            start_new_session=True, close_fds=True)
    proc.returncode = 0  # reaped below through waitpid; stop Popen.__del__ from ever waiting for this pid
    return proc.pid


def _kill_group(pid: int, sig: int):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Process:
    """One started command: its pid, pipes, output tails and deadlines, driven by whoever polls ``watched()``.

    A command that cannot start is a Process that is already ``exited``, with ``result.error`` set."""

    def __init__(self, argv: list, env: dict, cwd: str | None = None, stdin_data: bytes = b"",
                 timeout: float = 60.0, tail: int = TAIL_BYTES):
        self.result = result = RunResult(argv)
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.kill_at = None
        self.killed = False
        self.exited = False
        self.pidfd = self.stdin_w = -1
        self.stdout = _Tail(tail)
        self.stderr = _Tail(tail)
        self.reading: dict = {}     # open output pipe → its tail
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = _spawn(argv, env, cwd, stdin_r, out_w, err_w)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = f" in {cwd!r}" if isinstance(exc, OSError) and cwd and exc.filename == cwd else ""
            result.error = f"cannot run {argv[0]!r}{where}: {reason}"
            result.returncode = 127 if isinstance(exc, FileNotFoundError) else 126
            result.stderr = result.error.encode()
            self.pid = None
            self.exited = True
            return
        result.pid = self.pid
        result.started_ns = time.time_ns()
        os.close(stdin_r)
        os.close(out_w)
        os.close(err_w)
        self.pidfd = os.pidfd_open(self.pid)
        self.reading = {out_r: self.stdout, err_r: self.stderr}
        self.pending = None
        if stdin_data:
            os.set_blocking(stdin_w, False)
            self.pending = _feed(stdin_w, memoryview(stdin_data))
        if self.pending is None:
            os.close(stdin_w)
        else:
            self.stdin_w = stdin_w

    def watched(self) -> list:
        """(fd, poll events) to watch while it runs."""
        if self.pid is None:
            return []
        fds = [(fd, _POLLIN) for fd in self.reading] + [(self.pidfd, select.POLLIN)]
        if self.stdin_w >= 0:
            fds.append((self.stdin_w, select.POLLOUT))
        return fds

    def handle(self, fd: int) -> bool:
        """Serve a ready fd; True when that fd is done with (EOF, stdin written) and must no longer be polled."""
        if fd == self.pidfd:
            self.exited = True
            return False
        if fd == self.stdin_w:
            self.pending = _feed(fd, self.pending)
            if self.pending is None:
                os.close(fd)
                self.stdin_w = -1
                return True
            return False
        data = os.read(fd, _READ)
        if data:
            self.reading[fd].add(data)
            return False
        del self.reading[fd]
        os.close(fd)
        return True

    def next_deadline(self) -> float:
        if not self.result.timed_out:
            return self.deadline
        return self.kill_at if not self.killed else float("inf")

    def check_time(self, now: float):
        """At the timeout SIGTERM to the group; ``KILL_GRACE`` later SIGKILL to whatever is left of it."""
        if self.pid is None or self.exited:
            return
        if not self.result.timed_out:
            if now >= self.deadline:
                self.result.timed_out = True
                self.kill_at = now + KILL_GRACE
                _kill_group(self.pid, signal.SIGTERM)
        elif not self.killed and now >= self.kill_at:
            self.killed = True
            _kill_group(self.pid, signal.SIGKILL)

    def open_fds(self) -> list:
        return [fd for fd in (*self.reading, self.pidfd, self.stdin_w) if fd >= 0]

    def finish(self) -> RunResult:
        """Once exited: reap it, keep what it left in its pipes, close everything (unregister the fds first)."""
        result = self.result
        if self.pid is not None:
            if result.timed_out and not self.killed:
                _kill_group(self.pid, signal.SIGKILL)  # children that outlived the SIGTERMed parent
            _, status = os.waitpid(self.pid, 0)
            result.returncode = os.waitstatus_to_exitcode(status)
            for fd, tail in self.reading.items():
                _drain(fd, tail)
            for fd in self.open_fds():
                os.close(fd)
            self.reading = {}
            self.pidfd = self.stdin_w = -1
            result.stdout = self.stdout.value()
            result.stderr = self.stderr.value()
        result.duration = time.monotonic() - self.started
        return result


def run(argv: list, env: dict, cwd: str | None = None, stdin_data: bytes = b"", timeout: float = 60.0,
        on_started=None, tail: int = TAIL_BYTES) -> RunResult:
    """Run one command to its end (or its timeout) and return what happened; never raises for the command's sake."""
    process = Process(argv, env, cwd, stdin_data, timeout, tail)
    if process.pid is not None and on_started is not None:
        on_started(process.result)
    poller = select.poll()
    for fd, events in process.watched():
        poller.register(fd, events)
    while not process.exited:
        wait = max(0.0, process.next_deadline() - time.monotonic())
        for fd, _ in poller.poll(None if wait == float("inf") else wait * 1000):
            if process.handle(fd):
                poller.unregister(fd)
        process.check_time(time.monotonic())
    return process.finish()


def _feed(fd: int, pending: memoryview):
    """Write what the pipe takes now; the rest (or None when all is written or the reader is gone)."""
    try:
        written = os.write(fd, pending)
    except BlockingIOError:
        return pending
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.EBADF):
            return None
        raise
    rest = pending[written:]
    return rest if len(rest) else None


def _drain(fd: int, tail: _Tail):
    """What the exited process left in a pipe, without waiting for writers it may have left behind."""
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        if not data:
            return
        tail.add(data)


# --- many runs at once -----------------------------------------------------------------------------------------

class Commands:
    """What a system hook run executes: commands in order, stopping at the first that fails."""

    __slots__ = ("argvs", "env", "cwd", "stdin", "timeout")

    def __init__(self, argvs: list, env: dict, cwd: str | None, stdin: bytes, timeout: float):
        self.argvs = argvs
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.timeout = timeout


class _Run:
    __slots__ = ("job", "spec", "next_index", "results", "process")

    def __init__(self, job, spec):
        self.job = job
        self.spec = spec
        self.next_index = 0
        self.results: list = []
        self.process: Process | None = None


class Executor:
    """Runs jobs with at most ``limit`` in flight, all processes driven by one thread and one poll().

    One thread instead of a thread per worker: every syscall of a run gives up the GIL and has to win it back, and
    with several worker threads that hand-over costs more than the work itself.  ``prepare(job)`` (called on this
    thread) returns :class:`Commands`, or a callable for blocking work (a G-code request) that runs on a thread of
    its own and still takes a slot; ``complete(job, outcome)`` gets the list of :class:`RunResult` (or what the
    callable returned, or the exception it raised) on this thread."""

    def __init__(self, limit: int, prepare, complete, on_started=None, name: str = "hook-executor"):
        self.limit = limit
        self.prepare = prepare
        self.complete = complete
        self.on_started = on_started
        self.name = name
        self.inbox = queue.SimpleQueue()
        self.active = 0
        self.max_active = 0
        self.not_started = 0
        self._backlog: collections.deque = collections.deque()
        self._finished = queue.SimpleQueue()
        self._runs: set = set()
        self._owner: dict = {}
        self._poller = select.poll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller.register(self._wake, select.POLLIN)
        self._stopping = False
        self._stop_deadline = None
        self._thread = None
        self._blocking = 0          # blocking jobs still running on their threads (they write to _wake)
        self._lock = threading.Lock()

    # --- other threads ---

    def submit(self, job):
        self.inbox.put(job)
        os.eventfd_write(self._wake, 1)

    def set_limit(self, limit: int):
        self.limit = limit
        os.eventfd_write(self._wake, 1)

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, grace: float = 5.0):
        """Start nothing more; running processes get ``grace`` seconds, then their groups are killed."""
        self._stop_deadline = time.monotonic() + grace
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(grace + KILL_GRACE + 5)
        with self._lock:
            if not self._blocking and self._wake >= 0:
                os.close(self._wake)  # left open while a blocking job may still write to it
                self._wake = -1

    @property
    def backlog(self) -> int:
        return len(self._backlog) + self.inbox.qsize()

    # --- the executor thread ---

    def _loop(self):
        try:
            while True:
                self._take_new()
                if self._stopping:
                    self.not_started += len(self._backlog)
                    self._backlog.clear()
                    if not self.active:
                        return
                    if time.monotonic() >= self._stop_deadline:
                        self._kill_all()
                while self._backlog and self.active < self.limit and not self._stopping:
                    self._begin(self._backlog.popleft())
                self._wait()
        except Exception:
            log.exception("hook executor stopped by an internal error")
            raise

    def _take_new(self):
        inbox = self.inbox
        while True:
            try:
                self._backlog.append(inbox.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                run, outcome = self._finished.get_nowait()
            except queue.Empty:
                return
            self._end(run, outcome)

    def _wait(self):
        deadline = min((run.process.next_deadline() for run in self._runs if run.process is not None),
                       default=float("inf"))
        if self._stopping:
            deadline = min(deadline, self._stop_deadline)
        wait = deadline - time.monotonic()
        timeout = None if wait == float("inf") else max(0, wait * 1000)
        for fd, _ in self._poller.poll(timeout):
            if fd == self._wake:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                continue
            run = self._owner.get(fd)
            if run is None:
                continue
            process = run.process
            if process.handle(fd):
                self._poller.unregister(fd)
                del self._owner[fd]
            if process.exited:
                self._command_done(run)
        now = time.monotonic()
        for run in list(self._runs):
            if run.process is not None:
                run.process.check_time(now)

    def _begin(self, job):
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
        try:
            spec = self.prepare(job)
        except Exception as exc:
            log.exception("cannot prepare a hook run")
            self._end(_Run(job, None), exc)
            return
        run = _Run(job, spec)
        if isinstance(spec, Commands):
            self._runs.add(run)
            self._next_command(run)
        else:
            with self._lock:
                self._blocking += 1
            threading.Thread(target=self._run_blocking, args=(run, spec), name=f"{self.name}-blocking",
                             daemon=True).start()

    def _run_blocking(self, run, work):
        try:
            outcome = work()
        except Exception as exc:  # reported to complete(), which publishes the failure
            outcome = exc
        self._finished.put((run, outcome))
        with self._lock:
            self._blocking -= 1
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def _next_command(self, run):
        while run.next_index < len(run.spec.argvs):
            spec = run.spec
            process = Process(spec.argvs[run.next_index], spec.env, spec.cwd, spec.stdin, spec.timeout)
            run.next_index += 1
            if process.pid is None:
                run.results.append(process.finish())
                break
            if self.on_started is not None:
                self.on_started(process.result)
            run.process = process
            for fd, events in process.watched():
                self._poller.register(fd, events)
                self._owner[fd] = run
            return
        self._runs.discard(run)
        self._end(run, run.results)

    def _command_done(self, run):
        process = run.process
        for fd in process.open_fds():
            self._poller.unregister(fd)
            self._owner.pop(fd, None)
        result = process.finish()
        run.results.append(result)
        run.process = None
        if result.ok:
            self._next_command(run)
        else:
            self._runs.discard(run)
            self._end(run, run.results)

    def _end(self, run, outcome):
        self.active -= 1
        try:
            self.complete(run.job, outcome)
        except Exception:
            log.exception("hook result handling failed")

    def _kill_all(self):
        for run in self._runs:
            process = run.process
            if process is not None and process.pid is not None and not process.killed:
                process.result.timed_out = True
                process.killed = True
                _kill_group(process.pid, signal.SIGKILL)
