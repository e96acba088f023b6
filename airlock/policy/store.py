"""The policy bundle in force, and its reloads.

The bundle is loaded from a directory at start (an invalid bundle then stops the
daemon: fail closed). It is reloaded on SIGHUP and whenever a file in the
directory changes. A reload is atomic and conservative:

1. it waits until the files are at rest: two snapshots (each file's size, mtime and
   the hash of all their bytes) ``settle_s`` apart must be equal, for at most
   ``settle_max_s``; files still changing then are a refusal;
2. it validates the *whole* new bundle (schema, semantics and every inline test), and
   takes it only if it was compiled from exactly the bytes found at rest;
3. it refuses a bundle that drops a file or a rule (by id) of the bundle in force,
   unless the operator accepted exactly that bundle: a file ``.airlock-accept-removals``
   in the directory whose first word is the new bundle's version (the rest of the file
   is the operator's note). The acceptance is reported (``on_accept``, which the daemon
   records in its audit log) before the swap and the file is then removed: it is good
   for one bundle, once.

A refused or invalid bundle leaves the previous one in force; the reason, the version
read and the rules and files it added and removed are kept for ``GetPolicy``. Readers
take a snapshot (:attr:`PolicyStore.bundle`): one validation is judged by one bundle
from start to end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from airlock.policy.loader import (
    PolicyBundle,
    PolicyError,
    PolicyProblem,
    SchemaCheck,
    check_in_process,
    load_bundle,
    snapshot,
)
from airlock.types import PolicyInfo

__all__ = [
    "ACCEPT_FILE",
    "Acceptance",
    "PolicyStore",
    "ReloadChange",
    "default_policy_dir",
]

_log = logging.getLogger("airlock.policy")

# The operator's acceptance of a bundle that drops files or rules (a dot file: the loader
# never reads it as policy).
ACCEPT_FILE = ".airlock-accept-removals"
_ACCEPT_MAX_BYTES = 4096
_MIN_VERSION_PREFIX = 12


def default_policy_dir() -> Path:
    """The shipped default policy: package data, ``airlock/policy/default``."""
    return Path(__file__).resolve().parent / "default"


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a policy file (or the acceptance file) is added, removed or edited."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")) or name == ACCEPT_FILE:
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((path, st.st_mtime_ns, st.st_size))
    return tuple(found)


@dataclass(frozen=True)
class ReloadChange:
    """What a new bundle changes against the one in force: rule ids and files (relative)."""

    rules_added: tuple[str, ...] = ()
    rules_removed: tuple[str, ...] = ()
    files_added: tuple[str, ...] = ()
    files_removed: tuple[str, ...] = ()

    @property
    def removes(self) -> bool:
        return bool(self.rules_removed or self.files_removed)

    def text(self) -> str:
        parts = []
        for what, items in (
            ("rules removed", self.rules_removed),
            ("files removed", self.files_removed),
            ("rules added", self.rules_added),
            ("files added", self.files_added),
        ):
            if items:
                parts.append(f"{what}: {', '.join(items)}")
        return "; ".join(parts) or "no rule or file added or removed"


@dataclass(frozen=True)
class Acceptance:
    """The operator accepted a bundle that drops files or rules (see ``ACCEPT_FILE``)."""

    directory: str
    old_version: str
    new_version: str
    change: ReloadChange
    uid: int  # the owner of the acceptance file
    note: str  # the rest of the acceptance file, the operator's words


@dataclass(frozen=True)
class _Status:
    """The outcome of the last reload attempt, replaced as a whole (readers never lock)."""

    error: str = ""
    attempt: float = 0.0
    refused: bool = False
    version: str = ""  # the version read, "" when none could be read at rest
    change: ReloadChange = ReloadChange()


def _rule_ids(bundle: PolicyBundle) -> set[str]:
    return {r.id for r in bundle.rules} | {r.id for r in bundle.effect_rules}


class PolicyStore:
    """Holds the bundle in force; thread-safe."""

    def __init__(
        self,
        directory: str | Path,
        *,
        settle_s: float = 0.5,
        settle_max_s: float = 10.0,
        on_accept: Callable[[Acceptance], None] | None = None,
        schema: SchemaCheck = check_in_process,
    ) -> None:
        self.directory = Path(directory).resolve()
        # How the files are checked against the schema: the daemon's store checks in a child
        # process, so that the daemon never holds jsonschema (policy/_schema.py).
        self._schema = schema
        self.settle_s = settle_s
        self.settle_max_s = settle_max_s
        self.on_accept = on_accept
        self._lock = threading.Lock()
        self._bundle = self._first_load()  # PolicyError propagates: fail closed
        self._loaded_at = time.time()
        self._status = _Status(attempt=self._loaded_at, version=self._bundle.version)

    def _first_load(self) -> PolicyBundle:
        """The bundle at start, compiled from files at rest: unchanged while it was read,
        and for ``settle_s`` after if one was written that recently (there is nothing yet
        to compare it with: a file saved half-way and left so is loaded as it is; one
        being written is waited for, within ``settle_max_s``)."""
        deadline = time.monotonic() + self.settle_max_s
        while True:
            self._fingerprint = _fingerprint(self.directory)
            before = snapshot(self.directory)
            error: PolicyError | None = None
            try:
                bundle: PolicyBundle | None = load_bundle(self.directory, schema=self._schema)
            except PolicyError as exc:
                bundle, error = None, exc
            consistent = bundle is None or bundle.version == before[0]
            if consistent and self._still(before):
                if error is not None:
                    raise error  # invalid at rest: fail closed
                assert bundle is not None
                return bundle
            if time.monotonic() >= deadline:
                where = str(self.directory)
                raise PolicyError(
                    [PolicyProblem(where, 0, 0, "the policy files kept changing while loaded")]
                )

    def _still(self, before: tuple[str, tuple[tuple[str, int, int], ...]]) -> bool:
        """Whether the files are as ``before`` and, if one was written within ``settle_s``,
        still so ``settle_s`` later."""
        after = snapshot(self.directory)
        if after != before:
            time.sleep(self.settle_s)
            return False
        newest = max((mtime for _rel, _size, mtime in after[1]), default=0)
        if newest < time.time_ns() - self.settle_s * 1e9:
            return True
        time.sleep(self.settle_s)
        return snapshot(self.directory) == before

    @property
    def bundle(self) -> PolicyBundle:
        return self._bundle

    def _rel(self, files: tuple[str, ...]) -> set[str]:
        return {os.path.relpath(f, self.directory) for f in files}

    def _change_to(self, new: PolicyBundle) -> ReloadChange:
        old = self._bundle
        old_rules, new_rules = _rule_ids(old), _rule_ids(new)
        old_files, new_files = self._rel(old.files), self._rel(new.files)
        return ReloadChange(
            rules_added=tuple(sorted(new_rules - old_rules)),
            rules_removed=tuple(sorted(old_rules - new_rules)),
            files_added=tuple(sorted(new_files - old_files)),
            files_removed=tuple(sorted(old_files - new_files)),
        )

    def _at_rest(self, deadline: float) -> str | None:
        """The version of the files once two snapshots ``settle_s`` apart agree; None if
        they still change at ``deadline``."""
        before = snapshot(self.directory)
        self._fingerprint = _fingerprint(self.directory)
        while True:
            time.sleep(self.settle_s)
            now = snapshot(self.directory)
            if now == before:
                return now[0]
            _log.info("policy files are changing; waiting for them to settle")
            if time.monotonic() >= deadline:
                return None
            before = now
            self._fingerprint = _fingerprint(self.directory)

    def _acceptance(self, version: str, change: ReloadChange) -> Acceptance | None:
        """The operator's acceptance of ``version``, if ``ACCEPT_FILE`` names it."""
        path = self.directory / ACCEPT_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            data = f.read(_ACCEPT_MAX_BYTES + 1)
        text = data[:_ACCEPT_MAX_BYTES].decode("utf-8", "replace")
        word, _, note = text.strip().partition("\n")
        word, _, rest = word.strip().partition(" ")
        word = word.strip().lower()
        if len(word) < _MIN_VERSION_PREFIX or not version.startswith(word):
            _log.warning(
                "the acceptance file names another bundle; ignored",
                extra={"file": str(path), "names": word[:64], "version": version},
            )
            return None
        return Acceptance(
            directory=str(self.directory),
            old_version=self._bundle.version,
            new_version=version,
            change=change,
            uid=st.st_uid,
            note=" ".join((rest + " " + note).split())[:1024],
        )

    def _refuse(
        self,
        reason: str,
        message: str,
        *,
        attempt: float,
        version: str = "",
        change: ReloadChange | None = None,
        **extra: object,
    ) -> bool:
        self._status = _Status(message, attempt, True, version, change or ReloadChange())
        _log.error(
            f"policy reload {reason}; the previous bundle stays in force",
            extra={"error": message, "version": self._bundle.version, **extra},
        )
        return False

    def reload(self, reason: str) -> bool:
        """Load the directory again; swap it in only if the whole bundle is valid, was read
        at rest, and drops nothing the operator did not accept. True if it is in force."""
        with self._lock:
            attempt = time.time()
            deadline = time.monotonic() + self.settle_max_s
            while True:
                version = self._at_rest(deadline)
                if version is None:
                    return self._refuse(
                        "refused",
                        f"the policy files in {self.directory} were still changing after "
                        f"{self.settle_max_s:g} s; reload again once they are saved",
                        attempt=attempt,
                        cause=reason,
                    )
                try:
                    bundle = load_bundle(self.directory, schema=self._schema)
                except PolicyError as exc:
                    return self._refuse("rejected", str(exc), attempt=attempt, cause=reason)
                except OSError as exc:
                    return self._refuse(
                        "failed",
                        f"cannot read {self.directory}: {exc}",
                        attempt=attempt,
                        cause=reason,
                    )
                if bundle.version == version:
                    break  # compiled from exactly the bytes found at rest
                if time.monotonic() >= deadline:
                    return self._refuse(
                        "refused",
                        f"the policy files in {self.directory} changed while they were "
                        "loaded; reload again once they are saved",
                        attempt=attempt,
                        cause=reason,
                    )
            if bundle.version == self._bundle.version:
                self._status = _Status(attempt=attempt, version=version)
                _log.info("policy reloaded: unchanged", extra={"cause": reason, "version": version})
                return True
            change = self._change_to(bundle)
            if change.removes and not self._accept(bundle.version, change, reason, attempt):
                return False
            self._bundle, self._loaded_at = bundle, time.time()
            self._status = _Status(attempt=attempt, version=version, change=change)
        _log.info(
            "policy reloaded",
            extra={
                "cause": reason,
                "version": bundle.version,
                "rules": len(bundle.rules) + len(bundle.effect_rules),
                "rules_added": list(change.rules_added),
                "rules_removed": list(change.rules_removed),
                "files_added": list(change.files_added),
                "files_removed": list(change.files_removed),
            },
        )
        return True

    def _accept(self, version: str, change: ReloadChange, reason: str, attempt: float) -> bool:
        """Whether the operator accepted the removals of ``version`` (and it is recorded)."""
        accepted = self._acceptance(version, change)
        extra = {
            "cause": reason,
            "new_version": version,
            "rules_removed": list(change.rules_removed),
            "files_removed": list(change.files_removed),
        }
        if accepted is None:
            return self._refuse(
                "REFUSED",
                f"the new bundle drops what the bundle in force has ({change.text()}). "
                "If that is intended, accept exactly this bundle: write its version "
                f"{version} into {self.directory / ACCEPT_FILE} (a note may follow on the "
                "next line); the daemon then reloads",
                attempt=attempt,
                version=version,
                change=change,
                **extra,
            )
        if self.on_accept is not None:
            try:
                self.on_accept(accepted)
            except Exception as exc:  # the acceptance cannot be recorded: fail closed
                return self._refuse(
                    "refused",
                    f"the operator's acceptance of {version} cannot be recorded: {exc}",
                    attempt=attempt,
                    version=version,
                    change=change,
                    **extra,
                )
        with contextlib.suppress(FileNotFoundError):
            try:
                os.unlink(self.directory / ACCEPT_FILE)
            except OSError as exc:
                _log.warning(
                    "cannot remove the acceptance file (it names this bundle only)",
                    extra={"error": str(exc)},
                )
        _log.warning(
            "policy removals accepted by the operator",
            extra={**extra, "uid": accepted.uid, "note": accepted.note},
        )
        return True

    def changed_on_disk(self) -> bool:
        return _fingerprint(self.directory) != self._fingerprint

    def watch(
        self,
        stop: threading.Event,
        interval: float = 1.0,
        requested: threading.Event | None = None,
    ) -> threading.Thread:
        """Reload whenever a file changes or ``requested`` is set (by the daemon's main
        thread on SIGHUP; never by a signal handler), until ``stop`` is set. Polling: no
        extra dependency. Reloads run on this thread, so the main thread never waits on one."""
        asked = requested or threading.Event()

        def loop() -> None:
            while not stop.is_set():
                if asked.wait(interval):
                    asked.clear()
                    if not stop.is_set():
                        self.reload("SIGHUP")
                elif self.changed_on_disk() and not stop.is_set():
                    self.reload("file change")

        thread = threading.Thread(target=loop, name="airlock-policy-watch", daemon=True)
        thread.start()
        return thread

    def info(self) -> PolicyInfo:
        bundle, loaded_at, status = self._bundle, self._loaded_at, self._status
        change = status.change
        return PolicyInfo(
            version=bundle.version,
            directory=str(self.directory),
            files=tuple(os.path.relpath(f, self.directory) for f in bundle.files),
            rule_count=len(bundle.rules),
            loaded_at=loaded_at,
            last_reload_error=status.error,
            last_reload_at=status.attempt,
            last_reload_refused=status.refused,
            last_reload_version=status.version,
            rules_added=change.rules_added,
            rules_removed=change.rules_removed,
            files_added=change.files_added,
            files_removed=change.files_removed,
        )
