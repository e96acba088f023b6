"""The spawner: a small helper process that forks the supervisors of dry runs.

The gRPC server runs many threads, and forking a threaded process is unsafe
(locks held by other threads stay locked in the child). So the daemon *execs*
this helper once, before its server starts, and asks it for sandboxes::

    daemon ──(control socket: message + SCM_RIGHTS fd)──▶ spawner ──fork──▶ supervisor
       ▲                                                                      │
       └──────────────── per-request socket: plan in, result out ─────────────┘

The helper imports only the sandbox modules (no grpc), so it is small and its
forks are fast. It never reads plans itself: each supervisor reads its own plan
from the per-request socket and writes the result back on it. Closing that socket
from the daemon's side cancels the dry run.

Warm pool: the daemon announces its :class:`SandboxTemplate` (``T`` message);
the spawner keeps ``pool`` sandboxes prepared from it (``contain.serve_warm``),
each waiting for a request socket. A request (``R`` message) whose template key
matches goes to a warm sandbox; otherwise, or when none is ready, a cold
supervisor prepares one on the spot. Every sandbox serves exactly one request.

Reuse: a supervisor that served its request and tore its sandbox down builds the next one of the
same template itself and says so (``W`` on its pool socket), when it may be reused
(``contain._Host.again``: back in the host's namespaces, holding exactly the descriptors it
started with, a bounded number of runs and memory growth); otherwise it exits. The spawner keeps
it warm again, up to ``_REUSE_FACTOR`` times the pool's size per template or the pool's size
more than were busy at once within the last ``idle_s`` (concurrent clients, or one client whose
requests come faster than a supervisor's teardown and next sandbox; at most ``_MAX_REUSED``),
else retires it. A request never waits for one to come back: the pool still refills by forking as
soon as one is taken. Most dry runs then cost no fork and no exit of a Python process (decisions
§38). Warm sandboxes idle for longer than ``idle_s`` (``--warm-idle``, 30 s by default) are
retired, so none sees a host that changed long after it was built. A warm sandbox holds a copy
of every host mount in its private mount namespace, so it also pins each mounted file system: a
disk unmounted on the host stays busy (its loop device, its block device) while any sandbox
built before the unmount waits. So the spawner watches its mount table (``/proc/self/mountinfo``
signals POLLPRI on every mount or unmount) and retires the whole pool at once when a mount went
away; it refills once the table has been quiet for ``_SETTLE_S``. (A new mount needs no watch:
the daemon's next template has it, and a new template retires the pool.)

Per request the daemon sends a :class:`PlanOnWire`: the run spec, and the template still
pickled (pickled once per template), which a warm sandbox of the same key never unpickles.
Before a template, the daemon announces the sensitive-read globs when they change (``G``
message); the spawner compiles them (``reads.precompile``) so every later fork inherits them.

No threading: the helper process never imports ``threading`` (nor ``subprocess``, which imports
it; the daemon's side imports them where it uses them). Once imported, ``threading`` runs an
after-fork hook in every forked child, Python code that writes to ~100 inherited pages (copy
on write): ~0.35 ms of CPU in each process forked per dry run (supervisor, init, command; the
lost-work checker when there is one). ``tests/unit/sandbox/test_spawner_imports.py`` checks.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import pickle
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airlock._errors import Cancelled, SandboxError, Unavailable
from airlock.sandbox import _digest, _wire, reads
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.contain import OutputChunk
from airlock.sandbox.netcap import NetworkAttempt
from airlock.sandbox.plan import PlanOnWire, SandboxPlan

if TYPE_CHECKING:
    import subprocess

__all__ = ["Run", "Spawner", "main"]

_KEY_BYTES = 32
DEFAULT_IDLE_S = 30.0
# After a change of the mount table, the pool refills only once it has been quiet this long
# (an unmount often comes with more: the loop device's, a remount).
_SETTLE_S = 1.0
# Extra templates kept warm at once (Execute: one per recently used workspace).
_MAX_EXTRAS = 4
# Supervisors that served a request build their next sandbox and come back to the pool, up to
# this many times the pool's size per template (a burst of concurrent requests leaves that
# many warm until they idle out); the rest exit.
_REUSE_FACTOR = 2
# ... or as many as were busy at once lately (concurrent clients), up to this many.
_MAX_REUSED = 16
_TICK_S = 1.0
# A template is a few KiB; SEQPACKET messages are bounded by the socket buffer (~208 KiB).
_MAX_CONTROL = 200 * 1024


# --- Helper side ------------------------------------------------------------------------------


@dataclass
class _Warm:
    pid: int
    sock: socket.socket
    born: float
    key: bytes = b""
    # Serving a request since (time.monotonic); 0.0 while it waits with a sandbox ready.
    since: float = 0.0


@dataclass
class _Extra:
    """A template announced for one kind of request (Execute in one workspace).

    It gets ``size`` warm sandboxes like the main one, while in use."""

    template: Any
    used: float
    ready: list[_Warm]


class _Pool:
    """Warm sandboxes: ``size`` of the main (dry-run) template and of each recent extra."""

    def __init__(self, size: int, idle_s: float = DEFAULT_IDLE_S) -> None:
        self.size = size
        self.idle_s = idle_s
        # No refill before this (time.monotonic): the mount table changed a moment ago.
        self.settle_until = 0.0
        self.template: Any = None
        self.key = b""
        self.ready: list[_Warm] = []
        # Extra templates (Execute's, one per workspace), most recently used last.
        self.extras: dict[bytes, _Extra] = {}
        # Supervisors serving a request: each tells "W" when it has built its next sandbox of
        # the same template (contain.serve_warm), or closes its end when it exits.
        self.busy: list[_Warm] = []
        # When warm sandboxes were last retired for a mount that went away: one a supervisor
        # began building before then is retired when it reports.
        self.retired_at = 0.0
        # The most supervisors busy at once lately, and since when that many (monotonic).
        self.peak, self.peak_at = 0, 0.0

    def cap(self) -> int:
        """Warm sandboxes kept per template at most, counting supervisors that came back:
        ``_REUSE_FACTOR`` times the pool's size, or the pool's size more than were busy at once
        within the last ``idle_s``, never more than ``_MAX_REUSED``. Busy counts a supervisor
        until it is back with its next sandbox: a burst of concurrent requests, or one client
        faster than that, keeps its supervisors instead of forking new ones (the pool refills
        when fewer than its size are ready) and retiring those that come back."""
        if self.size == 0:
            return 0  # no warm pool (--warm-pool 0): every request is served cold
        if time.monotonic() - self.peak_at > self.idle_s:
            self.peak = len(self.busy)
        return min(max(self.size * _REUSE_FACTOR, self.peak + self.size), _MAX_REUSED)

    def go_busy(self, warm: _Warm) -> None:
        warm.since = time.monotonic()
        self.busy.append(warm)
        if len(self.busy) >= self.peak:
            self.peak, self.peak_at = len(self.busy), warm.since

    def came_back(self, warm: _Warm) -> None:
        """A busy supervisor has a sandbox ready again: keep it warm, or retire it."""
        self.busy.remove(warm)
        extra = self.extras.get(warm.key)
        ready = self.ready if warm.key == self.key else extra.ready if extra else None
        if (
            ready is None
            or warm.since <= self.retired_at
            or time.monotonic() < self.settle_until
            or len(ready) >= self.cap()
        ):
            # An older template; a mount went away (or the table is not quiet yet); or
            # enough are warm.
            self.retire(warm)
            return
        warm.since, warm.born = 0.0, time.monotonic()
        ready.append(warm)

    def gone(self, warm: _Warm) -> None:
        """A busy supervisor exited (it may not be reused, or failed): forget it."""
        self.busy.remove(warm)
        warm.sock.close()

    def retire(self, warm: _Warm) -> None:
        warm.sock.close()  # EOF: the warm supervisor tears its sandbox down and exits

    def all_warm(self) -> list[_Warm]:
        """Every supervisor this spawner holds a socket of (ready or busy)."""
        return self.ready + [w for e in self.extras.values() for w in e.ready] + self.busy

    def set_template(self, template: Any, key: bytes) -> None:
        for warm in self.ready:
            self.retire(warm)
        self.ready = []
        self.template, self.key = template, key
        if template is None:
            for key_ in list(self.extras):
                self.drop_extra(key_)

    def touch_extra(self, key: bytes, body: bytes) -> None:
        """An extra template is in use: keep sandboxes of it warm (the body is unpickled
        only the first time). The least recently used beyond ``_MAX_EXTRAS`` is dropped."""
        extra = self.extras.pop(key, None)
        if extra is None:
            extra = _Extra(_wire.loads(body[8:]), time.monotonic(), [])
        extra.used = time.monotonic()
        self.extras[key] = extra
        while len(self.extras) > _MAX_EXTRAS:
            self.drop_extra(next(iter(self.extras)))

    def drop_extra(self, key: bytes) -> None:
        extra = self.extras.pop(key)
        for warm in extra.ready:
            self.retire(warm)

    def _fork(self, control: socket.socket, key: bytes, body: Any, *args: Any) -> _Warm:
        """A supervisor running ``body(*args, its pool socket)``, holding no other socket of
        the spawner's."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = sc.fork()
        if pid == 0:
            control.close()
            ours.close()
            for warm in self.all_warm():
                warm.sock.close()
            _child(body, *args, theirs)
        theirs.close()
        return _Warm(pid, ours, time.monotonic(), key)

    def _fork_warm(self, control: socket.socket, template: Any, key: bytes) -> _Warm:
        return self._fork(control, key, _serve_warm, template, key)

    def fork_cold(self, control: socket.socket, request_fd: int, key: bytes) -> None:
        """A supervisor that builds a sandbox for this request, then joins the pool."""
        self.go_busy(self._fork(control, key, _serve_cold, request_fd))

    def close(self) -> None:
        """Shut down: every supervisor's socket closed, the busy ones' too. Each then tears
        down what it holds (a busy one, once its run is over, what it was building) and exits."""
        for warm in self.all_warm():
            self.retire(warm)
        self.ready, self.busy, self.extras = [], [], {}

    def retire_all(self) -> int:
        """Retire every warm sandbox (main and extras); the templates stay. How many went."""
        warm = self.ready + [w for e in self.extras.values() for w in e.ready]
        for w in warm:
            self.retire(w)
        self.ready = []
        for extra in self.extras.values():
            extra.ready = []
        self.retired_at = time.monotonic()  # the busy ones are retired when they come back
        return len(warm)

    def refill(self, control: socket.socket) -> None:
        if time.monotonic() < self.settle_until:
            return
        # A busy supervisor does not count: it comes back only once its run is over and its
        # next sandbox built, and a request in between must find one ready (a fork now
        # prepares while the request is on its way). Those that come back join the pool.
        while self.template is not None and len(self.ready) < self.size:
            self.ready.append(self._fork_warm(control, self.template, self.key))
        for key, extra in self.extras.items():
            while len(extra.ready) < self.size:
                extra.ready.append(self._fork_warm(control, extra.template, key))

    def take(self, key: bytes) -> _Warm | None:
        extra = self.extras.get(key)
        if key == self.key:
            ready = self.ready
        elif extra is not None:
            ready = extra.ready
        else:
            return None
        while ready:
            warm = ready.pop(0)
            if _alive(warm.sock):
                return warm
            self.retire(warm)
        return None

    def expire(self) -> None:
        now = time.monotonic()
        keep = []
        for warm in self.ready:
            if now - warm.born > self.idle_s or not _alive(warm.sock):
                self.retire(warm)
            else:
                keep.append(warm)
        self.ready = keep
        for key, extra in list(self.extras.items()):
            if now - extra.used > self.idle_s:
                self.drop_extra(key)  # not used for a while: no longer kept warm
            else:
                for warm in [w for w in extra.ready if not _alive(w.sock)]:
                    extra.ready.remove(warm)
                    self.retire(warm)


def _alive(sock: socket.socket) -> bool:
    """A warm supervisor that died (its set-up failed) closes its end: readable EOF."""
    import select

    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


# The spawner's watch on its mount table (main): no supervisor needs a copy of it.
_mount_watch = -1


def _child(body: Any, *args: Any) -> None:
    """In a forked child: default SIGCHLD (supervisors wait for their init), ``hashlib``
    loaded while still root (sandbox/_digest.py), run, exit."""
    if _mount_watch >= 0:
        os.close(_mount_watch)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _digest.load()
    try:
        body(*args)
    finally:
        os._exit(0)


def _serve_cold(request_fd: int, pool_sock: socket.socket) -> None:
    from airlock.sandbox.contain import serve_cold

    serve_cold(request_fd, pool_sock)


def _serve_warm(template: Any, key: bytes, pool_sock: socket.socket) -> None:
    from airlock.sandbox.contain import serve_warm

    serve_warm(template, key, pool_sock)


def _wait_for_supervisors() -> None:
    """Return once every supervisor has exited. Each tears its sandbox down itself, and one
    that was busy may be building its next sandbox, which makes the daemon's cgroup parent if
    it is missing: the daemon removes its cgroups only after this process has exited (it kills
    it after 5 s). Supervisors are this process's only children and the kernel reaps them
    (SIGCHLD ignored): wait() blocks until the last one has exited, then fails with ECHILD."""
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the helper: ``python -m airlock.sandbox.spawner FD [--pool N]``."""
    parser = argparse.ArgumentParser(prog="airlock-spawner")
    parser.add_argument("fd", type=int)
    parser.add_argument("--pool", type=int, default=0)
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    control = socket.socket(fileno=args.fd)
    control.set_inheritable(False)
    sc.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() == 1:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    # Warm the imports every supervisor needs, so forks do not repeat them.
    import airlock.sandbox.contain  # noqa: F401
    # (netcap, imported above, built its rules' netlink batch at import: sent as is per sandbox)

    pool = _Pool(args.pool, args.idle)
    control.settimeout(_TICK_S)
    # The mount table: POLLPRI (and POLLERR) whenever a mount comes or goes in this namespace.
    global _mount_watch
    _mount_watch = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    mount_ids = _mount_ids(set())
    while True:
        poller = select.poll()
        poller.register(control, select.POLLIN)
        poller.register(_mount_watch, select.POLLPRI | select.POLLERR)
        busy = {w.sock.fileno(): w for w in pool.busy}
        for fd in busy:
            poller.register(fd, select.POLLIN)
        try:
            ready = dict(poller.poll(_TICK_S * 1000))
        except InterruptedError:
            continue
        if _mount_watch in ready:
            _mounts_changed(pool, mount_ids)
        for fd, back in busy.items():
            if fd in ready:
                _busy_said(pool, back)
        if control.fileno() not in ready:
            pool.expire()
            pool.refill(control)
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, _MAX_CONTROL, 1)
        except (TimeoutError, InterruptedError):
            continue
        if not msg:  # the daemon closed the control socket: shut down
            pool.close()
            _wait_for_supervisors()
            return 0
        kind, body = msg[:1], msg[1:]
        if kind == b"T":
            template = _wire.loads(body[_KEY_BYTES + 8 :])
            pool.set_template(template, body[:_KEY_BYTES])
        elif kind == b"X":
            pool.touch_extra(body[:_KEY_BYTES], body[_KEY_BYTES:])
        elif kind == b"G":
            # The sensitive-read globs of the requests to come: compiled here, once, so that
            # every supervisor forked from now on inherits them (sandbox/reads.py).
            reads.precompile(_wire.loads(body[8:]))
        elif kind == b"R" and fds:
            taken = pool.take(body[:_KEY_BYTES])
            if taken is not None:
                try:
                    socket.send_fds(taken.sock, [b"R"], [fds[0]])
                except OSError:
                    taken.sock.close()
                    taken = None
                else:
                    pool.go_busy(taken)  # it may come back with its next sandbox
            if taken is None:
                pool.fork_cold(control, fds[0], body[:_KEY_BYTES])
        for fd in fds:
            os.close(fd)
        pool.refill(control)


def _busy_said(pool: _Pool, warm: _Warm) -> None:
    """A busy supervisor wrote: "W" (its next sandbox is ready) or nothing (it exited)."""
    try:
        said = warm.sock.recv(16)
    except OSError:
        said = b""
    if said == b"W":
        pool.came_back(warm)
    else:
        pool.gone(warm)


def _mount_ids(ids: set[str]) -> set[str]:
    """``ids`` made the ids of the mounts in the mount table now (first field of each line)."""
    chunks = []
    os.lseek(_mount_watch, 0, os.SEEK_SET)
    while chunk := os.read(_mount_watch, 65536):
        chunks.append(chunk)
    now = {line.split(b" ", 1)[0].decode() for line in b"".join(chunks).splitlines() if line}
    ids.clear()
    ids.update(now)
    return ids


def _mounts_changed(pool: _Pool, ids: set[str]) -> None:
    """The mount table changed. If a mount went away, every warm sandbox still holds it
    (and keeps the file system busy), so all of them go now, and the pool refills once the
    table is quiet. One log line (the daemon's format) per quiet period."""
    before = set(ids)
    if before <= _mount_ids(ids):
        return  # only new mounts: the daemon's next template has them
    quiet = time.monotonic() >= pool.settle_until
    retired = pool.retire_all()
    pool.settle_until = time.monotonic() + _SETTLE_S
    if retired and quiet:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "level": "info",
            "msg": "warm sandboxes retired: a mount went away on the host",
            "retired": retired,
        }
        with contextlib.suppress(OSError):
            sys.stderr.write(json.dumps(line) + "\n")
            sys.stderr.flush()


# --- Daemon side ------------------------------------------------------------------------------


class Run:
    """One dry run in flight: ``result()`` waits for it, ``cancel()`` tears it down."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def result(self) -> Any:
        try:
            return self._recv()
        finally:
            self._sock.close()

    def messages(self) -> Iterator[Any]:
        """Execute: every message the supervisor sends (output chunks, network attempts), the
        result last."""
        try:
            while True:
                message = self._recv()
                yield message
                if not isinstance(message, (OutputChunk, NetworkAttempt)):
                    return
        finally:
            self._sock.close()

    def _recv(self) -> Any:
        try:
            return _wire.recv(self._sock)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            if self._cancelled:
                raise Cancelled("the request was cancelled; the sandbox was torn down") from None
            raise SandboxError(f"the sandbox supervisor failed: {exc}") from None


class Spawner:
    """The daemon's handle on the helper process. Thread-safe."""

    def __init__(self, pool: int = 0, idle_s: float = DEFAULT_IDLE_S) -> None:
        self._pool = pool
        self._idle_s = idle_s
        import threading  # not at the top: the helper process must not import it

        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._announced = b""
        self._announced_body = b""
        self._extra_bodies: dict[bytes, bytes] = {}
        self._globs: tuple[str, ...] = ()

    def start(self) -> None:
        """Exec the helper. Call before any gRPC thread exists, and again to restart it."""
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airlock.sandbox.spawner",
                str(theirs.fileno()),
                "--pool",
                str(self._pool),
                "--idle",
                repr(self._idle_s),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        theirs.close()
        self._control = ours
        self._announced = b""
        self._globs = ()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def submit(self, plan: Any, *, pooled: bool | str = True) -> Run:
        """Hand a plan to a (warm or new) supervisor; returns at once.

        ``pooled=True``: the plan's template is the pool's main one (dry runs).
        ``pooled="extra"``: one of a few extra templates kept warm while in use (Execute,
        per workspace); the first request of one is served cold. ``pooled=False``: no
        template (Apply), always a fresh supervisor.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._control is None or (self._proc and self._proc.poll() is not None):
                    self.start()  # exec (not fork) from a threaded process is safe
                assert self._control is not None
                key: bytes = plan.template_key
                # Before the template: warm sandboxes forked for it inherit the globs compiled.
                run = getattr(plan, "run", None)
                globs = run.sensitive_globs if run is not None else ()
                if globs and globs != self._globs:
                    globs_body = _wire.dumps(globs)
                    if len(globs_body) + 1 <= _MAX_CONTROL:  # else each supervisor compiles
                        self._control.send(b"G" + globs_body)
                    self._globs = globs
                if pooled is True and key != self._announced:
                    body = _wire.dumps(plan.template)
                    if len(body) + 1 + len(key) > _MAX_CONTROL:
                        raise SandboxError(f"the sandbox template is too large ({len(body)} B)")
                    self._control.send(b"T" + key + body)
                    self._announced, self._announced_body = key, body
                elif pooled == "extra":
                    body = self._extra_bodies.get(key) or _wire.dumps(plan.template)
                    if len(body) + 1 + len(key) > _MAX_CONTROL:
                        raise SandboxError(f"the sandbox template is too large ({len(body)} B)")
                    self._extra_bodies = {
                        **{k: v for k, v in self._extra_bodies.items() if k != key},
                        key: body,
                    }
                    while len(self._extra_bodies) > _MAX_EXTRAS:
                        del self._extra_bodies[next(iter(self._extra_bodies))]
                    self._control.send(b"X" + key + body)
                message: Any = plan
                if isinstance(plan, SandboxPlan):
                    # The template goes pickled once per template, not once per request; a
                    # warm supervisor never unpickles it (contain.serve_request).
                    if pooled is True:
                        body = self._announced_body
                    elif pooled != "extra":
                        body = _wire.dumps(plan.template)
                    message = PlanOnWire(key, plan.run, body)
                self._control.sendmsg(
                    [b"R" + key],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
                )
        except OSError as exc:
            ours.close()
            raise Unavailable(f"the sandbox helper is not running: {exc}") from None
        finally:
            theirs.close()
        try:
            _wire.send(ours, message)
        except OSError as exc:
            ours.close()
            raise SandboxError(f"could not hand the plan to the sandbox: {exc}") from None
        return Run(ours)

    def stop(self) -> None:
        with self._lock:
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._proc is not None:
                import subprocess

                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


if __name__ == "__main__":
    sys.exit(main())
