"""Special files: what a change makes that can raise privileges or is not plain data.

One definition serves the policy's effect rules (``files.special``, judged on a dry run's
:class:`~airlock.types.FileChange`), the Validate answer and Apply, which refuses to write
a privileged one (:data:`PRIVILEGED`: not FIFOs and sockets) unless the approval of the
validation names the path (:mod:`airlock.sandbox.apply`). A change is *special* when,
afterwards, the path is:

* ``setuid`` / ``setgid``: a non-directory with the set-user-ID / set-group-ID bit, and the
  change gave it the bit: a new entry, new content (or another type), or a mode change that
  adds the bit. A mode or owner change that keeps a bit the file already had does not count
  (the host already has that file). Directories are left out on purpose: set-group-ID on a
  directory only makes new entries inherit its group (shared project directories use it, and
  ``mkdir`` below one inherits it), it raises no one's privileges; set-user-ID on a directory
  means nothing on Linux.
* ``capabilities``: a regular file, new or with new content, that carries file capabilities
  (the ``security.capability`` extended attribute): executing it raises them, like setuid.
* ``device``: a character or block device node (new, replacing another entry, or whose mode
  or owner changed: who may open a disk is as much a privilege as the node itself);
  ``fifo``, ``socket``: a named pipe or a Unix socket file, likewise.

Deletions are never special. Stdlib only: the sandbox's root helper imports it.
"""

from __future__ import annotations

import enum
import stat
import struct

from airlock.types import ChangeKind, FileChange, FileType, OtherType

__all__ = [
    "CAPABILITY_XATTR",
    "PRIVILEGED",
    "Special",
    "change_specials",
    "describe_capabilities",
    "other_type",
    "specials",
]

CAPABILITY_XATTR = "security.capability"


class Special(enum.StrEnum):
    """One way a change is special (see the module docstring)."""

    SETUID = "setuid"
    SETGID = "setgid"
    CAPABILITIES = "capabilities"
    DEVICE = "device"
    FIFO = "fifo"
    SOCKET = "socket"


# What raises privileges: Apply never writes these unless the approval names the path. FIFOs
# and sockets are reported (and a policy may judge them) but are inert files: test suites and
# tools leave sockets in /tmp all day, and refusing them would only teach people to approve.
PRIVILEGED = frozenset({Special.SETUID, Special.SETGID, Special.CAPABILITIES, Special.DEVICE})


_OTHER = {
    stat.S_IFCHR: OtherType.CHAR_DEVICE,
    stat.S_IFBLK: OtherType.BLOCK_DEVICE,
    stat.S_IFIFO: OtherType.FIFO,
    stat.S_IFSOCK: OtherType.SOCKET,
}
_OTHER_SPECIAL = {
    OtherType.CHAR_DEVICE: Special.DEVICE,
    OtherType.BLOCK_DEVICE: Special.DEVICE,
    OtherType.FIFO: Special.FIFO,
    OtherType.SOCKET: Special.SOCKET,
}
_WRITES = (ChangeKind.CREATED, ChangeKind.MODIFIED)


def other_type(mode: int) -> OtherType:
    """What an entry of :attr:`FileType.OTHER` is, from its ``st_mode`` (or ``S_IFMT`` bits)."""
    return _OTHER.get(stat.S_IFMT(mode), OtherType.NONE)


def specials(
    *,
    kind: ChangeKind,
    file_type: FileType,
    other: OtherType,
    mode_before: int | None,
    mode_after: int | None,
    capabilities: bool,
) -> frozenset[Special]:
    """How a change is special; ``file_type``, ``other`` and ``mode_after`` are the after state.

    ``mode_before`` is the permission bits before the change (None: the path was absent).
    An entry of type OTHER whose kind is unknown counts as a device (fail closed).
    """
    if kind is ChangeKind.DELETED or file_type is FileType.NONE:
        return frozenset()
    found: set[Special] = set()
    if file_type is FileType.OTHER:
        found.add(_OTHER_SPECIAL.get(other, Special.DEVICE))
    if file_type not in (FileType.DIRECTORY, FileType.SYMLINK) and mode_after is not None:
        for bit, special in ((stat.S_ISUID, Special.SETUID), (stat.S_ISGID, Special.SETGID)):
            kept = (
                kind is ChangeKind.METADATA_CHANGED
                and mode_before is not None
                and mode_before & bit
            )
            if mode_after & bit and not kept:
                found.add(special)
    if capabilities and file_type is FileType.REGULAR and kind in _WRITES:
        found.add(Special.CAPABILITIES)
    return frozenset(found)


def change_specials(change: FileChange) -> frozenset[Special]:
    """How a dry run's change is special (see :func:`specials`)."""
    return specials(
        kind=change.kind,
        file_type=change.file_type,
        other=change.other_type,
        mode_before=change.mode_before,
        mode_after=change.mode_after,
        capabilities=bool(change.capabilities),
    )


# --- File capabilities -----------------------------------------------------------------------

# The capability numbers' names (include/uapi/linux/capability.h), from 0.
_CAPABILITY_NAMES = (
    *("chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid"),
    *("setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast"),
    *("net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio"),
    *("sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice"),
    *("sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write"),
    *("audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm"),
    *("block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"),
)
# struct vfs_cap_data (include/uapi/linux/capability.h): magic_etc, then (permitted,
# inheritable) 32-bit words, one pair (revision 1) or two (revisions 2 and 3); revision 3
# adds the root uid of the user namespace the capabilities apply in.
_REVISIONS = {0x01000000: (1, 12), 0x02000000: (2, 20), 0x03000000: (2, 24)}
_EFFECTIVE = 0x000001


def _cap_name(bit: int) -> str:
    return f"cap_{_CAPABILITY_NAMES[bit]}" if bit < len(_CAPABILITY_NAMES) else f"cap_{bit}"


def describe_capabilities(raw: bytes) -> str:
    """The ``security.capability`` value ``raw`` as text, in getcap's style.

    ``cap_net_raw=ep``: raised into the effective set at exec (``e``), permitted (``p``),
    inheritable (``i``); capabilities with the same flags are joined by commas. A value
    that is not a known format is described by its size (it is still reported: fail closed).
    """
    if len(raw) < 4:
        return f"unrecognised file capabilities ({len(raw)} bytes)"
    (magic,) = struct.unpack_from("<I", raw)
    known = _REVISIONS.get(magic & 0xFF000000)
    if known is None or len(raw) != known[1]:
        return f"unrecognised file capabilities ({len(raw)} bytes)"
    words, _size = known
    permitted = inheritable = 0
    for i in range(words):
        p, inh = struct.unpack_from("<II", raw, 4 + 8 * i)
        permitted |= p << (32 * i)
        inheritable |= inh << (32 * i)
    effective = bool(magic & _EFFECTIVE)
    groups: dict[str, list[str]] = {}
    for bit in range(64):
        flags = ""
        if effective and (permitted | inheritable) >> bit & 1:
            flags += "e"
        if inheritable >> bit & 1:
            flags += "i"
        if permitted >> bit & 1:
            flags += "p"
        if flags:
            groups.setdefault(flags, []).append(_cap_name(bit))
    text = " ".join(f"{','.join(names)}={flags}" for flags, names in groups.items()) or "="
    if magic & 0xFF000000 == 0x03000000:
        (rootid,) = struct.unpack_from("<I", raw, 20)
        if rootid:
            text += f" [rootid={rootid}]"
    return text
