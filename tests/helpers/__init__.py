"""What several test modules share; fixtures and hooks live in the conftest.py files.

``paths`` the checkout, tests/data and the installed commands · ``host`` mounts, cgroups,
world-readable temporary directories and a loopback listener · ``users`` client code as a
real non-root user, and a temporary user with a home of the test's · ``egress`` a lab
"internet" in a network namespace (HTTPS/HTTP servers, a resolver, pypiserver) and a recorder
harness · ``npm`` verdaccio, a real npm registry, in that lab · ``fork`` code run in a forked
child (or a private mount namespace) · ``policy`` small YAML policies for tests/unit/policy ·
``audit`` audit events · ``packaging`` ``make install-service`` into a DESTDIR · ``daemon``
the daemon starters (``start_daemon``, ``running_daemon``) and their arguments: only
tests/daemon may start a daemon, and tests/conftest.py fails the run if a test under tests/unit
imports a starter.
"""

from .audit import event
from .daemon import (
    NEUTRAL_POLICY,
    SANDBOX_ARGS,
    TEST_LIMITS,
    Daemon,
    running_daemon,
    start_daemon,
)
from .host import airlock_cgroups, mount_table, public_dir
from .paths import AIRLOCK, AIRLOCKD, CHECKOUT, DATA
from .users import CLIENT_PRELUDE, NOBODY, run_client_as

__all__ = [
    "AIRLOCK",
    "AIRLOCKD",
    "CHECKOUT",
    "CLIENT_PRELUDE",
    "DATA",
    "NEUTRAL_POLICY",
    "NOBODY",
    "SANDBOX_ARGS",
    "TEST_LIMITS",
    "Daemon",
    "airlock_cgroups",
    "event",
    "mount_table",
    "public_dir",
    "run_client_as",
    "running_daemon",
    "start_daemon",
]
