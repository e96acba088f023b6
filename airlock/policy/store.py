"""The policy bundle in force, and its reloads.

The bundle is loaded from a directory at start (an invalid bundle then stops the
daemon: fail closed). It is reloaded on SIGHUP and whenever a file in the
directory changes; a reload validates the *whole* new bundle (schema, semantics
and every inline test) before swapping it in atomically. A bad bundle is
rejected, its error is kept for ``GetPolicy``, and the previous bundle stays in
force. Readers take a snapshot (:attr:`PolicyStore.bundle`): one validation is
judged by one bundle from start to end.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from airlock.policy.loader import PolicyBundle, PolicyError, load_bundle
from airlock.types import PolicyInfo

__all__ = ["PolicyStore", "default_policy_dir"]

_log = logging.getLogger("airlock.policy")


def default_policy_dir() -> Path:
    """The shipped default policy: package data, ``airlock/policy/default``."""
    return Path(__file__).resolve().parent / "default"


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a policy file is added, removed or edited."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((path, st.st_mtime_ns, st.st_size))
    return tuple(found)


class PolicyStore:
    """Holds the bundle in force; thread-safe."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self._lock = threading.Lock()
        self._fingerprint = _fingerprint(self.directory)
        self._bundle = load_bundle(self.directory)  # PolicyError propagates: fail closed
        self._loaded_at = time.time()
        self._last_error = ""
        self._last_attempt = self._loaded_at

    @property
    def bundle(self) -> PolicyBundle:
        return self._bundle

    def reload(self, reason: str) -> bool:
        """Load the directory again; swap it in only if the whole bundle is valid."""
        with self._lock:
            self._fingerprint = _fingerprint(self.directory)
            self._last_attempt = time.time()
            try:
                bundle = load_bundle(self.directory)
            except PolicyError as exc:
                self._last_error = str(exc)
                _log.error(
                    "policy reload rejected; the previous bundle stays in force",
                    extra={
                        "reason": reason,
                        "error": self._last_error,
                        "version": self._bundle.version,
                    },
                )
                return False
            except OSError as exc:
                self._last_error = f"cannot read {self.directory}: {exc}"
                _log.error(
                    "policy reload failed", extra={"reason": reason, "error": self._last_error}
                )
                return False
            changed = bundle.version != self._bundle.version
            self._bundle, self._loaded_at, self._last_error = bundle, time.time(), ""
        _log.info(
            "policy reloaded",
            extra={
                "reason": reason,
                "version": bundle.version,
                "rules": len(bundle.rules),
                "changed": changed,
            },
        )
        return True

    def changed_on_disk(self) -> bool:
        return _fingerprint(self.directory) != self._fingerprint

    def watch(self, stop: threading.Event, interval: float = 1.0) -> threading.Thread:
        """Reload whenever a file changes, until ``stop`` is set (polling: no extra dependency)."""

        def loop() -> None:
            while not stop.wait(interval):
                if self.changed_on_disk():
                    self.reload("file change")

        thread = threading.Thread(target=loop, name="airlock-policy-watch", daemon=True)
        thread.start()
        return thread

    def info(self) -> PolicyInfo:
        bundle = self._bundle
        return PolicyInfo(
            version=bundle.version,
            directory=str(self.directory),
            files=tuple(os.path.relpath(f, self.directory) for f in bundle.files),
            rule_count=len(bundle.rules),
            loaded_at=self._loaded_at,
            last_reload_error=self._last_error,
            last_reload_at=self._last_attempt,
        )
