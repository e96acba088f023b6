"""Validations waiting for an approval: the details an approver reviews, and watchers.

The state store keeps what a pending validation *is* (command, cwd, uid, summary: it
survives a restart); this board keeps, in memory and bounded, what an approver should
*see* before approving (the dry run's whole answer: findings, changes and diffs, network
attempts) and the agent context of the ask, and wakes the callers that watch for new asks
(``WatchPendingValidations``).

Bounded work: at most :data:`MAX_KEPT` answers and :data:`MAX_KEPT_BYTES` of their
output and diffs are kept (oldest dropped first: an approver then sees the summary only);
each kept answer's output is cut to :data:`OUTPUT_KEPT` bytes a stream. A watch holds one
of the gRPC server's threads, so the daemon allows :data:`MAX_WATCHES` at once and
:data:`MAX_WATCHES_PER_UID` per user, each for at most ``max_watch_s`` seconds (the
client opens a new one), with a heartbeat every ``heartbeat_s`` seconds so a client can
tell a quiet daemon from a dead one; :meth:`PendingBoard.close` ends them all (drain).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from airlock._errors import ResourceExhausted
from airlock.types import AgentContext, PeerCred, Validation, Verdict

__all__ = [
    "MAX_KEPT",
    "MAX_KEPT_BYTES",
    "MAX_WATCHES",
    "MAX_WATCHES_PER_UID",
    "OUTPUT_KEPT",
    "PendingBoard",
    "Watch",
]

MAX_KEPT = 256
MAX_KEPT_BYTES = 64 * 1024 * 1024
OUTPUT_KEPT = 16 * 1024
MAX_WATCHES = 4
MAX_WATCHES_PER_UID = 2


def _cost(v: Validation) -> int:
    return (
        len(v.stdout)
        + len(v.stderr)
        + sum(len(c.unified_diff) + len(c.path) + 256 for c in v.changes)
        + 512 * (len(v.network_attempts) + len(v.processes) + len(v.findings))
    )


def _kept(v: Validation) -> Validation:
    return dataclasses.replace(v, stdout=v.stdout[:OUTPUT_KEPT], stderr=v.stderr[:OUTPUT_KEPT])


class PendingBoard:
    """The review details of recent asks, and the watches waiting for new ones. Thread-safe."""

    def __init__(self, *, heartbeat_s: float = 15.0, max_watch_s: float = 600.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.max_watch_s = max_watch_s
        self._cond = threading.Condition()
        self._kept: collections.OrderedDict[str, tuple[Validation, AgentContext | None, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._serial = 0  # one more for each ask posted
        self._recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=MAX_KEPT)
        self._watches: dict[int, int] = {}
        self._closed = False

    # --- asks -----------------------------------------------------------------------------

    def post(self, v: Validation, agent: AgentContext | None) -> None:
        """Keep the answer of a new ask for review, and wake the watches."""
        if v.verdict is not Verdict.ASK:
            return
        kept = _kept(v)
        cost = _cost(kept)
        with self._cond:
            self._kept[v.validation_id] = (kept, agent, cost)
            self._bytes += cost
            while self._kept and (len(self._kept) > MAX_KEPT or self._bytes > MAX_KEPT_BYTES):
                _, (_, _, dropped) = self._kept.popitem(last=False)
                self._bytes -= dropped
            self._serial += 1
            self._recent.append((self._serial, v.validation_id))
            self._cond.notify_all()

    def details(self, validation_id: str) -> tuple[Validation | None, AgentContext | None]:
        """The kept answer and agent context of an ask (None, None once dropped)."""
        with self._cond:
            found = self._kept.get(validation_id)
        return (found[0], found[1]) if found else (None, None)

    # --- watches ---------------------------------------------------------------------------

    def watch(self, peer: PeerCred) -> Watch:
        """Start a watch of new asks for ``peer`` (close it when done).

        At most MAX_WATCHES at once, MAX_WATCHES_PER_UID per uid: else ResourceExhausted
        (TOO_MANY_WATCHES).
        """
        with self._cond:
            mine = self._watches.get(peer.uid, 0)
            total = sum(self._watches.values())
            if mine >= MAX_WATCHES_PER_UID or total >= MAX_WATCHES:
                raise ResourceExhausted(
                    f"uid {peer.uid} holds {mine} watch(es) of pending validations and the "
                    f"daemon {total}; at most {MAX_WATCHES_PER_UID} per user and "
                    f"{MAX_WATCHES} in all",
                    reason="TOO_MANY_WATCHES",
                )
            self._watches[peer.uid] = mine + 1
            return Watch(self, peer.uid, self._serial, time.monotonic() + self.max_watch_s)

    def _wait(self, watch: Watch, cancelled: threading.Event) -> tuple[str, ...] | None:
        with self._cond:
            timeout = min(self.heartbeat_s, watch.end - time.monotonic())
            if timeout > 0:
                self._cond.wait_for(
                    lambda: self._serial > watch.seen or self._closed or cancelled.is_set(),
                    timeout=timeout,
                )
            if self._closed or cancelled.is_set():
                return None
            new = tuple(vid for serial, vid in self._recent if serial > watch.seen)
            watch.seen = self._serial
        if not new and time.monotonic() >= watch.end:
            return None
        return new

    def _release(self, uid: int) -> None:
        with self._cond:
            left = self._watches.get(uid, 1) - 1
            if left:
                self._watches[uid] = left
            else:
                self._watches.pop(uid, None)

    def wake(self) -> Callable[[], None]:
        """A callback that wakes every watch (to notice a cancellation)."""

        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        return wake

    def close(self) -> None:
        """End every watch (the daemon is draining): they return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Watch:
    """One caller's watch of new asks (:meth:`PendingBoard.watch`)."""

    def __init__(self, board: PendingBoard, uid: int, seen: int, end: float) -> None:
        self._board = board
        self._uid = uid
        self.seen = seen
        self.end = end
        self._open = True

    def next(self, cancelled: threading.Event) -> tuple[str, ...] | None:
        """The ids of the asks posted since the last call (empty: a heartbeat, after
        ``heartbeat_s`` without one), or None: the watch is over (cancelled, the board
        closed, or ``max_watch_s`` passed)."""
        if not self._open:
            return None
        return self._board._wait(self, cancelled)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._board._release(self._uid)
