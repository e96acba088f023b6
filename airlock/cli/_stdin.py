"""Whether input is waiting on standard input: ``airlock run`` cannot pass it on.

Execute has no standard input (the command reads end of file), so ``echo y | airlock run --
cmd`` would silently lose the ``y``; ``airlock run`` warns instead. This looks without
reading: the bytes left in a redirected file, or the bytes already in a pipe or socket
(``FIONREAD``). A producer that has not written yet when ``airlock run`` starts is not seen:
best effort, never a false alarm for an empty pipe or ``/dev/null``.
"""

from __future__ import annotations

import array
import fcntl
import os
import stat
import termios

__all__ = ["waiting_bytes"]


def waiting_bytes(fd: int) -> int:
    """How many bytes can be read from ``fd`` right now (0 for a terminal, /dev/null, ...)."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            count = array.array("i", [0])
            fcntl.ioctl(fd, termios.FIONREAD, count)
            return max(0, count[0])
    except OSError:
        pass
    return 0
