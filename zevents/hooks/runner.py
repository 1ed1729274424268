"""Running hook commands: spawn without a shell, feed stdin, keep a bounded tail of the output, kill at timeout;
and :class:`Runs`, which runs many of them at once, up to a limit, from one thread's poll loop.

Spawning is the hot path of the hooks service: ``os.posix_spawn`` (glibc's is a vfork+exec: no copy of the
parent's memory, and the parent is held only until the child has exec'd); the child starts in a new session, hence
its own process group: at the timeout the whole group gets SIGTERM, then SIGKILL after
``KILL_GRACE`` seconds, so a hook's children die with it.  A command with a ``cwd`` goes through
``subprocess.Popen``, since posix_spawn cannot change directory portably.

The exit is watched through a pidfd, not by waiting for EOF on the pipes: a hook that leaves a background child
holding its stdout is done when its own process exits.

What a command leaves behind dies with it (unless its subscription says ``detach: true``): when it exits, its
process group is killed, and so is every process that carries its run's marker (:data:`RUN_MARKER` in the
environment, inherited by everything it starts) among the orphans this process adopts as a child subreaper
(:class:`Orphans`): a child that called ``setsid`` has left the group, but when its parent dies it is re-parented
here rather than to init, and is found.  A timeout kills everything the run started, detached or not.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import itertools
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


class Refused(Exception):
    """A run that must not start (``prepare`` raises it): reported as a failure saying why, with no traceback."""

    def __init__(self, message: str, argv=None):
        super().__init__(message)
        self.message = message
        self.argv = argv


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


def _posix_spawn(program: str, argv: list, env: dict, fds) -> int:
    # setsigdef: Python ignores SIGPIPE, and an ignored signal would stay ignored in the child.
    return os.posix_spawn(program, argv, env, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                          file_actions=[(_DUP2, fd, target) for fd, target in fds])


def _spawn(argv: list, env: dict, cwd: str | None, stdin_r: int, out_w: int, err_w: int, retry: bool = True) -> int:
    if cwd is None:
        path = env.get("PATH", os.defpath)
        program = _program(argv[0], path)
        try:
            return _posix_spawn(program, argv, env, ((stdin_r, 0), (out_w, 1), (err_w, 2)))
        except FileNotFoundError:
            if not retry or _resolved.pop((argv[0], path), None) is None:
                raise
            return _spawn(argv, env, cwd, stdin_r, out_w, err_w, retry=False)  # the program moved: search again
    proc = subprocess.Popen(argv, stdin=stdin_r, stdout=out_w, stderr=err_w, env=env, cwd=cwd,
                            start_new_session=True, close_fds=True)
    proc.returncode = 0  # reaped below through waitpid; stop Popen.__del__ from ever waiting for this pid
    return proc.pid


RUN_MARKER = "ZEVENTS_HOOK_RUN"
_MARKER_KEY = b"\0" + RUN_MARKER.encode() + b"="
PR_SET_CHILD_SUBREAPER = 36
ORPHAN_KILL_WAIT = 2.0   # seconds to wait for SIGKILLed leftovers to die (their children are then re-parented here)


def _set_subreaper(flag: int):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, flag, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


class Orphans:
    """This process as a child subreaper, and the processes hook runs leave behind.

    ``mains`` are the commands spawned and not yet reaped (reaped only by their :class:`Process`); every other child
    of this process is an orphan re-parented here.  :meth:`collect` kills the orphans of one run (found by the
    marker in their environment) and what they started, round by round: a killed orphan's own children are
    re-parented here in turn.  :meth:`reap` collects exited orphans (zombies); ``reap_all`` (the hooks service's
    own process, whose every child is a hook's) reaps every zombie, while a process that embeds the service (and
    may have children of its own) reaps only the orphans it has seen carrying a marker."""

    def __init__(self):
        self.enabled = False
        self.reap_all = False
        self.users = 0
        self.mains: set = set()
        self.adopted: set = set()   # marked orphans seen alive (detached runs' leftovers), reaped when they exit

    def become_subreaper(self, reap_all: bool = False) -> bool:
        """Make this process a child subreaper (until as many release() calls, unless ``reap_all``: then for
        good, as the hooks service's own process is)."""
        self.users += 1
        self.reap_all = self.reap_all or reap_all
        if not self.enabled:
            try:
                _set_subreaper(1)
            except (OSError, AttributeError) as exc:
                log.warning("cannot become a child subreaper (%s): a hook's children that leave its process group "
                            "(setsid) may outlive it", exc)
                return False
            self.enabled = True
        return True

    def release(self):
        """A user is done (a HooksService closed).  A process that only embeds the service stops being a subreaper
        with its last user: other orphans of its own would otherwise stay its zombies, never reaped by init."""
        self.users -= 1
        if self.users > 0 or not self.enabled or self.reap_all:
            return
        self.reap()
        try:
            _set_subreaper(0)
        except (OSError, AttributeError):
            return
        self.enabled = False

    @staticmethod
    def children() -> list:
        """The children of this process's main thread: where the kernel re-parents orphans (to the first live thread
        of the subreaper), so one small read per finished command, not one per thread."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children", "rb") as handle:
                return [int(pid) for pid in handle.read().split()]
        except OSError:
            return []

    @staticmethod
    def marker(pid: int) -> bytes | None:
        """The run marker in a process's environment (None for a zombie, or when it is not readable)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            return None
        environ = b"\0" + environ
        start = environ.find(_MARKER_KEY)
        if start < 0:
            return None
        start += len(_MARKER_KEY)
        end = environ.find(b"\0", start)
        return environ[start:end if end >= 0 else len(environ)]

    def collect(self, marker: str) -> int:
        """SIGKILL every orphan of the run marked ``marker`` and all it started; how many were killed."""
        if not self.enabled:
            return 0
        wanted = marker.encode()
        killed = 0
        deadline = time.monotonic() + ORPHAN_KILL_WAIT
        while time.monotonic() < deadline:
            victims = [pid for pid in self.children() if pid not in self.mains and self.marker(pid) == wanted]
            if not victims:
                break
            waiting = {}
            for pid in victims:
                try:
                    waiting[os.pidfd_open(pid)] = pid
                except OSError:
                    continue
                # It is our child and not yet reaped: neither its pid nor a group named after it can be reused.
                _kill_group(pid, signal.SIGKILL)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed += len(waiting)
            poller = select.poll()
            for fd in waiting:
                poller.register(fd, select.POLLIN)
            pending = set(waiting)
            while pending and time.monotonic() < deadline:
                for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    pending.discard(fd)
                    poller.unregister(fd)
            for fd, pid in waiting.items():
                os.close(fd)
                self._reap(pid)
        return killed

    def reap(self):
        """Collect exited orphans (see the class)."""
        if not self.enabled:
            return
        for pid in self.children():
            if pid in self.mains:
                continue
            if not self.reap_all and pid not in self.adopted:
                if self.marker(pid) is None:
                    continue
                self.adopted.add(pid)
            self._reap(pid)

    def _reap(self, pid: int):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            self.adopted.discard(pid)


ORPHANS = Orphans()
_run_numbers = itertools.count(1)


def new_run_marker() -> str:
    """A value for RUN_MARKER unique in this process, whichever of its services or runners asks (next() on a
    count is atomic under the GIL)."""
    return f"{os.getpid()}.{next(_run_numbers)}"


def _kill_group(pid: int, sig: int):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Process:
    """One started command: its pid, pipes, output tails and deadlines, driven by whoever polls ``watched()``.

    A command that cannot start is a Process that is already ``exited``, with ``result.error`` set."""

    def __init__(self, argv: list, env: dict, cwd: str | None = None, stdin_data: bytes = b"",
                 timeout: float = 60.0, tail: int = TAIL_BYTES, detach: bool = False):
        self.result = result = RunResult(argv)
        self.marker = env.get(RUN_MARKER)
        self.detach = detach
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
        ORPHANS.mains.add(self.pid)
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
            if not self.detach or result.timed_out:
                # What it left running, before it is reaped (until then no other group can take its id).
                _kill_group(self.pid, signal.SIGKILL)
                if self.marker:
                    ORPHANS.collect(self.marker)
            _, status = os.waitpid(self.pid, 0)
            ORPHANS.mains.discard(self.pid)
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
        on_started=None, tail: int = TAIL_BYTES, detach: bool = False) -> RunResult:
    """Run one command to its end (or its timeout) and return what happened; never raises for the command's sake."""
    _check_timeout(timeout)
    process = Process(argv, env, cwd, stdin_data, timeout, tail, detach)
    if process.pid is not None and on_started is not None:
        on_started(process.result)
    return drive(process)


def _check_timeout(timeout):
    # NaN never compares >= a deadline (the poll loop spun at 100 % CPU and never killed); inf never kills either.
    if not 0 < timeout < float("inf"):
        raise ValueError(f"a hook timeout must be a finite number of seconds > 0, not {timeout!r}")


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

    __slots__ = ("argvs", "env", "cwd", "stdin", "timeout", "detach")

    def __init__(self, argvs: list, env: dict, cwd: str | None, stdin: bytes, timeout: float, detach: bool = False):
        _check_timeout(timeout)
        self.argvs = argvs
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.timeout = timeout
        self.detach = detach


class _Run:
    __slots__ = ("job", "spec", "index", "results", "process")

    def __init__(self, job, spec: Commands):
        self.job = job
        self.spec = spec
        self.index = 0
        self.results: list = []
        self.process: Process | None = None


class Runs:
    """Many system-command runs at once, driven by the poll loop of one thread: at most ``limit`` processes alive,
    the jobs beyond that queued (at most ``max_queued``; more are refused and counted, never silently dropped).

    Why one thread and no worker pool: a spawn takes the parent only until the child has exec'd (posix_spawn is a
    vfork), and everything after is waiting on file descriptors, which one poll does for all of them.  Threads only
    added GIL hand-offs and wake-ups between the event and the spawn.  The owner polls :attr:`poller` (a
    ``zmq.Poller``, so the bus socket can be polled with the processes' pipes and pidfds), passes every ready fd to
    :meth:`handle` and calls :meth:`check_time` after each wake-up.

    ``prepare(job)`` returns :class:`Commands`, or a callable for other work (a G-code request), which runs on one
    background thread since it waits for a reply; ``complete(job, outcome)`` gets the list of :class:`RunResult`
    (or the callable's return value, or the exception raised), on the polling thread or the background one.
    Jobs submitted before :meth:`start` wait in :attr:`queue`."""

    def __init__(self, limit: int, prepare, complete, on_started=None, max_queued: int = 10000):
        import zmq  # the bus's poller, so that one poll serves the subscriber socket and the processes

        self.poller = zmq.Poller()
        self._in, self._out = zmq.POLLIN, zmq.POLLOUT
        self.limit = limit
        self.prepare = prepare
        self.complete = complete
        self.on_started = on_started
        self.max_queued = max_queued
        self.queue: collections.deque = collections.deque()
        self.active = 0
        self.max_active = 0
        self.not_started = 0
        self.refused = 0
        self.started = False
        self.stopping = False
        self._runs: set = set()         # runs with a live process
        self._owner: dict = {}          # fd being polled -> its run
        self._offload = None

    @property
    def backlog(self) -> int:
        return len(self.queue)

    def set_limit(self, limit: int):
        self.limit = limit
        self._fill()

    def start(self):
        self.started = True
        self._fill()

    def submit(self, job) -> bool:
        """Queue a job (started at once when a slot is free); False when the queue is full and the job refused."""
        if len(self.queue) >= self.max_queued:
            self.refused += 1
            return False
        self.queue.append(job)
        if self.started and self.active < self.limit:
            self._fill()
        return True

    def _fill(self):
        while self.queue and self.active < self.limit and self.started and not self.stopping:
            self._begin(self.queue.popleft())

    def _begin(self, job):
        try:
            spec = self.prepare(job)
        except Refused as exc:
            self._complete(job, exc)
            return
        except Exception as exc:  # reported to complete(), which publishes the failure
            log.exception("hook run failed inside zevents")
            self._complete(job, exc)
            return
        if not isinstance(spec, Commands):
            if self._offload is None:
                self._offload = _Offload(self._complete)
            self._offload.submit(job, spec)
            return
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
        self._advance(_Run(job, spec))

    def _advance(self, run: _Run):
        """Start the run's next command, or complete the run when it has none left or the last one failed."""
        spec = run.spec
        while run.index < len(spec.argvs) and (not run.results or run.results[-1].ok):
            process = Process(spec.argvs[run.index], spec.env, spec.cwd, spec.stdin, spec.timeout,
                              detach=spec.detach)
            run.index += 1
            if process.pid is None:
                run.results.append(process.finish())
                continue
            if self.on_started is not None:
                self.on_started(process.result)
            run.process = process
            self._runs.add(run)
            register, owner = self.poller.register, self._owner
            for fd in process.reading:
                register(fd, self._in)
                owner[fd] = run
            register(process.pidfd, self._in)
            owner[process.pidfd] = run
            if process.stdin_w >= 0:
                register(process.stdin_w, self._out)
                owner[process.stdin_w] = run
            return
        self.active -= 1
        self._complete(run.job, run.results)
        self._fill()

    def handle(self, fd: int):
        """Serve one ready fd of a running process."""
        run = self._owner.get(fd)
        if run is None:
            return
        process = run.process
        if process.handle(fd):
            self.poller.unregister(fd)
            del self._owner[fd]
        if process.exited:
            self._reap(run)

    def _reap(self, run: _Run):
        process = run.process
        for fd in process.open_fds():
            if self._owner.pop(fd, None) is not None:
                self.poller.unregister(fd)
        self._runs.discard(run)
        run.process = None
        run.results.append(process.finish())
        self._advance(run)

    def next_deadline(self) -> float:
        """The monotonic time of the next timeout or kill (inf with nothing running)."""
        return min((run.process.next_deadline() for run in self._runs), default=float("inf"))

    def check_time(self, now: float):
        for run in self._runs:
            run.process.check_time(now)

    def _complete(self, job, outcome):
        try:
            self.complete(job, outcome)
        except Exception:
            log.exception("hook result handling failed")

    def stop(self, grace: float = 5.0):
        """Start nothing more; running processes get ``grace`` seconds, then their groups are killed (their results
        are still completed).  Call from the polling thread, or once it has stopped polling."""
        self.stopping = True
        self.not_started += len(self.queue)
        self.queue.clear()
        deadline = time.monotonic() + grace
        killed = False
        while self._runs:
            now = time.monotonic()
            if not killed and now >= deadline:
                killed = True
                for run in list(self._runs):
                    run.process.kill()
            wake = self.next_deadline() if killed else min(deadline, self.next_deadline())
            for fd, _ in self.poller.poll(max(0.0, min(wake - now, 0.5)) * 1000):
                self.handle(fd)
            self.check_time(time.monotonic())
        if self._offload is not None:
            self._offload.stop(max(0.0, deadline - time.monotonic()) + KILL_GRACE)


class _Offload:
    """One background thread for runs that wait on something other than a process (a G-code request and its
    reply): they go one at a time, in order, whichever hook sends them."""

    def __init__(self, complete):
        self.complete = complete
        self.inbox = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="hook-gcode", daemon=True)
        self.thread.start()

    def submit(self, job, work):
        self.inbox.put((job, work))

    def _work(self):
        while True:
            item = self.inbox.get()
            if item is None:
                return
            job, work = item
            try:
                outcome = work()
            except Exception as exc:  # reported to complete(), which publishes the failure
                log.exception("hook run failed inside zevents")
                outcome = exc
            self.complete(job, outcome)

    def stop(self, timeout: float):
        self.inbox.put(None)
        self.thread.join(timeout)
