"""The reference sandbox the benches compare Airlock with: bubblewrap as issue 16 measured it
(every namespace unshared, the host read-only, a fresh /dev and /proc). Append the command."""

from __future__ import annotations

BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
