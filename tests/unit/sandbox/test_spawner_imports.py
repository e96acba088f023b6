"""The spawner's process imports neither ``threading`` nor ``subprocess`` (spawner.py), nor
``hashlib`` (OpenSSL's libcrypto, 3.3 MiB resident: sandbox/_digest.py).

Once ``threading`` is imported, CPython runs its after-fork hook (Python code) in every forked
child: ~100 page faults on inherited pages and ~0.35 ms of CPU in each of the processes forked
per dry run (docs/performance.md, "Issue 16, page faults per fork"). ``subprocess`` imports
``threading``. The probe imports what the helper imports before it forks anything, in a fresh
interpreter with the helper's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
sys.argv = ["airlock-spawner"]
MODULES = ("threading", "subprocess", "hashlib", "_hashlib", "secrets", "hmac")
import airlock.sandbox.spawner as spawner
import airlock.sandbox.contain  # as spawner.main does before its first fork
print(json.dumps(sorted(m for m in MODULES if m in sys.modules)))
"""


def test_the_spawner_imports_no_threading_nor_openssl() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # as Spawner.start passes
    if "PYTHONPATH" in os.environ:  # where the tests found airlock (.ci/unit-as-nobody sets it)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == [], done.stdout


def test_the_daemon_side_still_starts_and_stops_a_spawner() -> None:
    """The imports moved into ``Spawner`` (start, stop, its lock) still work there."""
    from airlock.sandbox.spawner import Spawner

    spawner = Spawner(pool=0)
    spawner.start()
    pid = spawner.pid
    assert pid is not None
    spawner.stop()
    assert spawner.pid is None
    # The helper saw its control socket close and exited; stop() reaped it.
    assert not os.path.exists(f"/proc/{pid}") or _is_not_our_child(pid)


def _is_not_our_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid()
    except OSError:
        return True


def test_the_lazy_digests_are_hashlib_s() -> None:
    import hashlib
    import secrets

    from airlock.sandbox import _digest

    assert _digest.sha256(b"x").hexdigest() == hashlib.sha256(b"x").hexdigest()
    h = _digest.sha256()
    h.update(b"ab")
    assert h.digest() == hashlib.sha256(b"ab").digest()
    assert _digest.new("sha1").name == "sha1"
    assert len(_digest.token_hex(3)) == 6 and len(secrets.token_hex(3)) == 6
    for k in (1, 7, 8, 16, 31):
        values = {_digest.random_bits(k) for _ in range(200)}
        assert all(0 <= v < 2**k for v in values)
        assert max(values).bit_length() == k  # the top bit is reached: none is lost
