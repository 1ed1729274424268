"""Running one hook command: spawn without a shell, feed stdin, keep a bounded tail of the output, kill at timeout.

Spawning is the hot path of the hooks service, so it uses ``os.posix_spawnp`` (vfork+exec in glibc, about a third of
``subprocess.Popen``'s cost here) with the child in a new session, hence its own process group: at the timeout the
whole group gets SIGTERM, then SIGKILL after ``KILL_GRACE`` seconds, so a hook's children die with it.  A command with
a ``cwd`` goes through ``subprocess.Popen``, since posix_spawn cannot change directory from Python.

The exit is watched through a pidfd, not by waiting for EOF on the pipes: a hook that leaves a background child
holding its stdout is done when its own process exits.
"""
from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import time

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


def run(argv: list, env: dict, cwd: str | None = None, stdin_data: bytes = b"", timeout: float = 60.0,
        on_started=None, tail: int = TAIL_BYTES) -> RunResult:
    """Run one command to its end (or its timeout) and return what happened; never raises for the command's sake."""
    result = RunResult(argv)
    started = time.monotonic()
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _spawn(argv, env, cwd, stdin_r, out_w, err_w)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" in {cwd!r}" if isinstance(exc, OSError) and cwd and exc.filename == cwd else ""
        result.error = f"cannot run {argv[0]!r}{where}: {reason}"
        result.returncode = 127 if isinstance(exc, FileNotFoundError) else 126
        result.stderr = result.error.encode()
        result.duration = time.monotonic() - started
        return result
    result.pid = pid
    result.started_ns = time.time_ns()
    if on_started is not None:
        on_started(result)
    os.close(stdin_r)
    os.close(out_w)
    os.close(err_w)
    pidfd = os.pidfd_open(pid)
    tails = {out_r: _Tail(tail), err_r: _Tail(tail)}
    poller = select.poll()
    for fd in tails:
        poller.register(fd, _POLLIN)
    poller.register(pidfd, select.POLLIN)
    pending = memoryview(stdin_data) if stdin_data else None
    if pending is not None:
        os.set_blocking(stdin_w, False)
        pending = _feed(stdin_w, pending)
    if pending is None:
        os.close(stdin_w)
        stdin_w = -1
    else:
        poller.register(stdin_w, select.POLLOUT)
    open_fds = set(tails)
    deadline = started + timeout
    exited = False
    try:
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                break
            for fd, _ in poller.poll(remaining * 1000):
                if fd == pidfd:
                    exited = True
                elif fd == stdin_w:
                    pending = _feed(stdin_w, pending)
                    if pending is None:
                        poller.unregister(stdin_w)
                        os.close(stdin_w)
                        stdin_w = -1
                elif fd in open_fds:
                    data = os.read(fd, _READ)
                    if data:
                        tails[fd].add(data)
                    else:
                        poller.unregister(fd)
                        open_fds.discard(fd)
        if result.timed_out:
            _kill_group(pid, signal.SIGTERM)
            select.select([pidfd], [], [], KILL_GRACE)
            # Whatever of the group survived SIGTERM (or ignored it) goes now.
            _kill_group(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        result.returncode = os.waitstatus_to_exitcode(status)
        for fd in open_fds:
            _drain(fd, tails[fd])
    finally:
        for fd in (stdin_w, out_r, err_r, pidfd):
            if fd >= 0:
                os.close(fd)
    result.stdout = tails[out_r].value()
    result.stderr = tails[err_r].value()
    result.duration = time.monotonic() - started
    return result


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
