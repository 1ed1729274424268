"""Running hook commands: spawn without a shell, feed stdin, keep a bounded tail of the output, kill at timeout;
and the :class:`Executor`, a pool of threads that runs many of them at once, up to a limit.

Spawning is the hot path of the hooks service.  It calls glibc's ``posix_spawn`` (vfork+exec, no copy of the
parent's memory) through ctypes so that the GIL is free while the parent waits for the child's exec; the child starts
in a new session, hence its own process group: at the timeout the whole group gets SIGTERM, then SIGKILL after
``KILL_GRACE`` seconds, so a hook's children die with it.  A command with a ``cwd`` goes through
``subprocess.Popen``, since posix_spawn cannot change directory portably.

The exit is watched through a pidfd, not by waiting for EOF on the pipes: a hook that leaves a background child
holding its stdout is done when its own process exits.
"""
from __future__ import annotations

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


class _LibcSpawn:
    """glibc's posix_spawn called through ctypes, which lets go of the GIL for the call: os.posix_spawn keeps it
    while the parent is held in vfork until the child has exec'd (up to a millisecond or more when the CPUs are
    busy), so hooks could only ever start one at a time and every other thread of the service stalled meanwhile."""

    _SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)  # the C library Python itself is linked with
        self.libc = libc
        self.spawn = libc.posix_spawn
        self.spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p]
        # Opaque glibc structures, with room to spare (80, 336 and 128 bytes on x86-64 and arm64).
        self.attr = ctypes.create_string_buffer(1024)
        sigdef = ctypes.create_string_buffer(256)
        mask = ctypes.create_string_buffer(256)
        libc.sigemptyset(sigdef)
        for number in _DEFAULT_SIGNALS:
            libc.sigaddset(sigdef, int(number))
        libc.sigemptyset(mask)
        if (libc.posix_spawnattr_init(self.attr) or libc.posix_spawnattr_setsigdefault(self.attr, sigdef)
                or libc.posix_spawnattr_setsigmask(self.attr, mask)
                or libc.posix_spawnattr_setflags(self.attr, ctypes.c_short(
                    self._SETSIGDEF | self._SETSIGMASK | self._SETSID))):
            raise OSError("posix_spawnattr setup failed")
        self._keep = (sigdef, mask)

    def __call__(self, program: str, argv: list, env: dict, fds) -> int:
        ctypes = self.ctypes
        if "\0" in "".join(argv) or "\0" in "".join(env.values()):
            raise ValueError("embedded null byte")  # C would silently cut the string there
        c_argv = (ctypes.c_char_p * (len(argv) + 1))()
        c_argv[:-1] = [a.encode("utf-8", "surrogateescape") for a in argv]
        c_env = (ctypes.c_char_p * (len(env) + 1))()
        c_env[:-1] = [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()]
        actions = ctypes.create_string_buffer(256)
        libc = self.libc
        libc.posix_spawn_file_actions_init(actions)
        try:
            for fd, target in fds:
                libc.posix_spawn_file_actions_adddup2(actions, fd, target)
            pid = ctypes.c_int()
            err = self.spawn(ctypes.byref(pid), os.fsencode(program), actions, self.attr, c_argv, c_env)
        finally:
            libc.posix_spawn_file_actions_destroy(actions)
        if err:
            raise OSError(err, os.strerror(err), program)
        return pid.value


def _os_spawn(program: str, argv: list, env: dict, fds) -> int:
    # setsigdef: Python ignores SIGPIPE, and an ignored signal would stay ignored in the child.
    return os.posix_spawn(program, argv, env, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                          file_actions=[(_DUP2, fd, target) for fd, target in fds])


_posix_spawn = None


def _spawner():
    global _posix_spawn
    if _posix_spawn is None:
        try:
            _posix_spawn = _LibcSpawn()
        except (OSError, AttributeError):  # no usable posix_spawn symbol: the GIL-holding one still works
            _posix_spawn = _os_spawn
    return _posix_spawn


def _spawn(argv: list, env: dict, cwd: str | None, stdin_r: int, out_w: int, err_w: int, retry: bool = True) -> int:
    if cwd is None:
        path = env.get("PATH", os.defpath)
        program = _program(argv[0], path)
        try:
            return (_posix_spawn or _spawner())(program, argv, env, ((stdin_r, 0), (out_w, 1), (err_w, 2)))
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

    def kill(self):
        """At shutdown, from another thread: SIGKILL the whole group now (reported like a timeout)."""
        if self.pid is not None and not self.exited and not self.killed:
            self.killed = True
            self.result.timed_out = True
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


def drive(process: Process) -> RunResult:
    """Serve one process until it exits (killing it at its timeout); its result."""
    poller = select.poll()
    for fd, events in process.watched():
        poller.register(fd, events)
    while not process.exited:
        wait = process.next_deadline() - time.monotonic()
        for fd, _ in poller.poll(None if wait == float("inf") else max(0.0, wait) * 1000):
            if process.handle(fd):
                poller.unregister(fd)
        process.check_time(time.monotonic())
    return process.finish()


def run(argv: list, env: dict, cwd: str | None = None, stdin_data: bytes = b"", timeout: float = 60.0,
        on_started=None, tail: int = TAIL_BYTES) -> RunResult:
    """Run one command to its end (or its timeout) and return what happened; never raises for the command's sake."""
    process = Process(argv, env, cwd, stdin_data, timeout, tail)
    if process.pid is not None and on_started is not None:
        on_started(process.result)
    return drive(process)


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


_RETIRE = object()


class Executor:
    """Runs jobs on a pool of ``limit`` threads: at most ``limit`` in flight, each job's commands in order.

    ``prepare(job)`` returns :class:`Commands`, or a callable for other work (a G-code request);
    ``complete(job, outcome)`` gets the list of :class:`RunResult` (or what the callable returned, or the exception
    it raised), on the worker's thread.  ``inbox`` is the queue of jobs not started yet."""

    def __init__(self, limit: int, prepare, complete, on_started=None, name: str = "hook-worker"):
        self.limit = limit
        self.prepare = prepare
        self.complete = complete
        self.on_started = on_started
        self.name = name
        self.inbox = queue.SimpleQueue()
        self.active = 0
        self.max_active = 0
        self.not_started = 0
        self._threads: list = []
        self._running: set = set()      # processes alive now, for the kill at stop
        self._lock = threading.Lock()
        self._started = False
        self._stopping = False

    def submit(self, job):
        self.inbox.put(job)

    def set_limit(self, limit: int):
        self.limit = limit
        if self._started:
            self._resize()

    def start(self):
        self._started = True
        self._resize()

    def _resize(self):
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            missing = self.limit - len(self._threads)
            for _ in range(max(0, missing)):
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        for _ in range(max(0, -missing)):
            self.inbox.put(_RETIRE)  # a worker retires when it reaches this, after the jobs queued before it

    def stop(self, grace: float = 5.0):
        """Start nothing more; running processes get ``grace`` seconds, then their groups are killed."""
        self._stopping = True
        threads = list(self._threads)
        for _ in threads:
            self.inbox.put(_RETIRE)
        deadline = time.monotonic() + grace
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            with self._lock:
                running = list(self._running)
            for process in running:
                process.kill()
            for thread in threads:
                thread.join(KILL_GRACE + 5)
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is not _RETIRE:
                with self._lock:
                    self.not_started += 1

    @property
    def backlog(self) -> int:
        return self.inbox.qsize()

    def _work(self):
        while True:
            job = self.inbox.get()
            if job is _RETIRE:
                return
            with self._lock:
                if self._stopping:
                    self.not_started += 1
                    continue
                self.active += 1
                if self.active > self.max_active:
                    self.max_active = self.active
            try:
                spec = self.prepare(job)
                outcome = self._execute(spec) if isinstance(spec, Commands) else spec()
            except Exception as exc:  # reported to complete(), which publishes the failure
                log.exception("hook run failed inside zevents")
                outcome = exc
            finally:
                with self._lock:
                    self.active -= 1
            try:
                self.complete(job, outcome)
            except Exception:
                log.exception("hook result handling failed")

    def _execute(self, spec: Commands) -> list:
        results = []
        for argv in spec.argvs:
            process = Process(argv, spec.env, spec.cwd, spec.stdin, spec.timeout)
            if process.pid is not None:
                if self.on_started is not None:
                    self.on_started(process.result)
                with self._lock:
                    self._running.add(process)
                try:
                    results.append(drive(process))
                finally:
                    with self._lock:
                        self._running.discard(process)
            else:
                results.append(process.finish())
            if not results[-1].ok:
                break
        return results
