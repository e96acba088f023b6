"""The catalog of error reasons: every ``reason`` an Airlock error may carry.

A reason is the stable, UPPER_SNAKE_CASE identifier of an error (the ``reason`` of the
``google.rpc.ErrorInfo`` detail of a failed call, and ``AirlockError.reason``) that clients
may branch on. Each member's value is its name; the comment says what it means.
docs/errors.md adds the gRPC code and what a client should do, and the proto lists the
members too; tests/unit/test_reasons.py keeps all three and the code in step.

The catalog is not a filter: the daemon and the client accept any reason string from the
wire (a newer daemon may send one this version does not list), so ``reason`` stays a ``str``.
Re-exported by :mod:`airlock._errors`.
"""

from __future__ import annotations

import enum

__all__ = ["Reason"]


class Reason(enum.StrEnum):
    """Every reason an Airlock error may carry (see docs/errors.md)."""

    # --- The classes' defaults, and the codes gRPC itself reports (the client's reason is then
    # the code's name, as in the DEADLINE_EXCEEDED of a call that took too long) -------------
    UNKNOWN = "UNKNOWN"  # an error with no more precise reason
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a request field is malformed
    PERMISSION_DENIED = "PERMISSION_DENIED"  # the caller may not ask for this
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # the target's state does not allow the call
    UNAVAILABLE = "UNAVAILABLE"  # the daemon cannot be reached or is shutting down
    CANCELLED = "CANCELLED"  # the caller cancelled the call
    INTERNAL = "INTERNAL"  # a bug in the daemon (its log has the traceback) or in gRPC
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the daemon did not answer within the deadline
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # gRPC refused a message (for example too large)
    NOT_FOUND = "NOT_FOUND"  # gRPC reported NOT_FOUND without an Airlock reason
    ALREADY_EXISTS = "ALREADY_EXISTS"  # gRPC reported ALREADY_EXISTS without an Airlock reason
    ABORTED = "ABORTED"  # gRPC reported ABORTED without an Airlock reason
    OUT_OF_RANGE = "OUT_OF_RANGE"  # gRPC reported OUT_OF_RANGE without an Airlock reason
    UNIMPLEMENTED = "UNIMPLEMENTED"  # the daemon does not know the method (an older daemon)
    DATA_LOSS = "DATA_LOSS"  # gRPC reported DATA_LOSS without an Airlock reason
    UNAUTHENTICATED = "UNAUTHENTICATED"  # gRPC reported UNAUTHENTICATED without a reason

    # --- The request and its caller (Validate, Execute) -------------------------------------------
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the request bytes are not a valid message
    INVALID_ENCODING = "INVALID_ENCODING"  # a text field is not valid UTF-8
    INVALID_COMMAND = "INVALID_COMMAND"  # the command is empty or holds a NUL byte
    COMMAND_TOO_LARGE = "COMMAND_TOO_LARGE"  # the command is longer than the daemon allows
    INVALID_CWD = "INVALID_CWD"  # cwd is empty, relative, a kernel fs; Execute: a system dir
    CWD_NOT_ACCESSIBLE = "CWD_NOT_ACCESSIBLE"  # cwd is missing or its user cannot enter it
    INVALID_ENV = "INVALID_ENV"  # an environment variable is malformed, or env is too large
    INVALID_TIMEOUT = "INVALID_TIMEOUT"  # the timeout is negative, not finite or above the max
    UNKNOWN_USER = "UNKNOWN_USER"  # no user has the uid asked for
    UNKNOWN_GROUP = "UNKNOWN_GROUP"  # no group has the gid asked for
    UID_NOT_ALLOWED = "UID_NOT_ALLOWED"  # only root may run a command as another uid or gid
    UNKNOWN_CALLER = "UNKNOWN_CALLER"  # the daemon could not tell who the caller is
    TOO_MANY_VALIDATIONS = "TOO_MANY_VALIDATIONS"  # the daemon is at its concurrency limit
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"  # the caller's uid holds its most connections
    INVALID_AGENT_CONTEXT = "INVALID_AGENT_CONTEXT"  # an agent context field is too long
    INVALID_ID = "INVALID_ID"  # an id, token or anchor is too long or holds a control character

    # --- The sandbox ------------------------------------------------------------------------------
    SANDBOX_FAILED = "SANDBOX_FAILED"  # the sandbox could not be set up or run; nothing ran
    DIFF_FAILED = "DIFF_FAILED"  # the dry run's changes could not be read

    # --- The policy -------------------------------------------------------------------------------
    POLICY_DENIED = "POLICY_DENIED"  # the policy denies the command (Execute)
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"  # the policy asks: the call needs an approval
    INVALID_POLICY = "INVALID_POLICY"  # a policy bundle was rejected (its problems are listed)

    # --- Validations kept for Approve and Apply ---------------------------------------------------
    VALIDATION_NOT_FOUND = "VALIDATION_NOT_FOUND"  # no validation with that id is kept
    NOT_YOUR_VALIDATION = "NOT_YOUR_VALIDATION"  # the validation is another uid's
    VALIDATION_DENIED = "VALIDATION_DENIED"  # the policy denied it: never approved or applied
    VALIDATION_APPLIED = "VALIDATION_APPLIED"  # it was already applied
    VALIDATION_DISCARDED = "VALIDATION_DISCARDED"  # it was discarded
    VALIDATION_EXPIRED = "VALIDATION_EXPIRED"  # it expired (its changes are no longer kept)
    APPLY_IN_PROGRESS = "APPLY_IN_PROGRESS"  # it is being applied right now
    APPLY_INTERRUPTED = "APPLY_INTERRUPTED"  # the daemon stopped during its apply
    CHANGES_NOT_KEPT = "CHANGES_NOT_KEPT"  # its changes were not kept: there is nothing to apply

    # --- Approvals --------------------------------------------------------------------------------
    INVALID_SCOPE = "INVALID_SCOPE"  # the approval scope is neither ONCE nor SESSION
    NO_SESSION = "NO_SESSION"  # a SESSION approval of a validation made outside a session
    APPROVAL_NOT_NEEDED = "APPROVAL_NOT_NEEDED"  # the policy allows it: nothing to approve
    APPROVAL_INVALID = "APPROVAL_INVALID"  # the token is not one that Approve returned
    APPROVAL_MISMATCH = "APPROVAL_MISMATCH"  # the token approves another command, user or cwd
    APPROVAL_EXPIRED = "APPROVAL_EXPIRED"  # the approval has expired
    APPROVAL_USED = "APPROVAL_USED"  # the one-time approval has been used
    SESSION_ENDED = "SESSION_ENDED"  # the session of the approval has ended
    INVALID_SPECIAL_PATH = "INVALID_SPECIAL_PATH"  # an approval names no special file of it
    SELF_APPROVAL_NOT_ALLOWED = "SELF_APPROVAL_NOT_ALLOWED"  # its own uid may not approve it
    NOT_AN_APPROVER = "NOT_AN_APPROVER"  # the caller is not one of the daemon's approvers
    TOO_MANY_WATCHES = "TOO_MANY_WATCHES"  # the caller holds the most pending-watch streams

    # --- Apply ------------------------------------------------------------------------------------
    APPLY_CONFLICT = "APPLY_CONFLICT"  # the host changed since the dry run; nothing written
    APPLY_PERMISSION = "APPLY_PERMISSION"  # the user may not write a path; nothing written
    APPLY_OWNERSHIP = "APPLY_OWNERSHIP"  # the user could not give a path its owner or group
    APPLY_NO_SPACE = "APPLY_NO_SPACE"  # the host's file system is full (or over quota)
    APPLY_FAILED = "APPLY_FAILED"  # writing a path failed otherwise; nothing left changed
    APPLY_INCOMPLETE = "APPLY_INCOMPLETE"  # Apply stopped part way: some paths were written
    APPLY_SPECIAL_FILES = "APPLY_SPECIAL_FILES"  # a setuid, capability file, device... not approved
    CHANGESET_INVALID = "CHANGESET_INVALID"  # the kept changes cannot be opened or read
    CHANGESET_CORRUPT = "CHANGESET_CORRUPT"  # the kept changes do not match their manifest

    # --- Keeping a dry run's changes (in ``changes_not_kept``, not as a failed call) --------------
    CHANGES_TRUNCATED = "CHANGES_TRUNCATED"  # the change list is incomplete, so not kept
    CHANGES_UNREADABLE = "CHANGES_UNREADABLE"  # content the caller may not read: not kept
    CHANGESET_UNSUPPORTED = "CHANGESET_UNSUPPORTED"  # a change Apply cannot make (a device...)
    CHANGESET_TREE_LIMIT = "CHANGESET_TREE_LIMIT"  # a deleted directory is too large to verify
    CHANGESET_QUOTA = "CHANGESET_QUOTA"  # the changes exceed the space allowed for one run
    CHANGESET_QUOTA_EXCEEDED = "CHANGESET_QUOTA_EXCEEDED"  # over the daemon's total quota
    CHANGESET_FAILED = "CHANGESET_FAILED"  # saving the changes failed otherwise

    # --- The audit log ----------------------------------------------------------------------------
    AUDIT_NOT_ALLOWED = "AUDIT_NOT_ALLOWED"  # only root may list or verify the audit log
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"  # the call could not be recorded, so it was not made
    AUDIT_LOG_FAILED = "AUDIT_LOG_FAILED"  # the audit log cannot be read or written
    AUDIT_LOG_CORRUPT = "AUDIT_LOG_CORRUPT"  # the audit log file is damaged or not a log
    AUDIT_LOG_TAMPERED = "AUDIT_LOG_TAMPERED"  # events the daemon had written are gone
    AUDIT_LOG_CLOSED = "AUDIT_LOG_CLOSED"  # the audit log was closed (the daemon is stopping)
    AUDIT_KEY_INVALID = "AUDIT_KEY_INVALID"  # the audit key file is unsafe or malformed
    AUDIT_KEY_MISMATCH = "AUDIT_KEY_MISMATCH"  # the log was created with another key (or none)
    AUDIT_EVENT_INVALID = "AUDIT_EVENT_INVALID"  # an event could not be encoded for the log
    INVALID_ANCHOR = "INVALID_ANCHOR"  # an anchor is not SEQ:HASH
    INVALID_PAGE_SIZE = "INVALID_PAGE_SIZE"  # page_size is negative or above the maximum
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105 (page_token is not one returned)
    INVALID_VERDICT = "INVALID_VERDICT"  # the verdict filter is not a known verdict

    # --- The daemon's state store (a daemon bug or a damaged file) --------------------------------
    STATE_STORE_FAILED = "STATE_STORE_FAILED"  # the state store cannot be read or written
    STATE_STORE_CORRUPT = "STATE_STORE_CORRUPT"  # the state file is damaged or not a store
    STATE_STORE_CLOSED = "STATE_STORE_CLOSED"  # the store was closed (the daemon is stopping)
    INVALID_VALIDATION = "INVALID_VALIDATION"  # a validation record to store is malformed
    DUPLICATE_VALIDATION_ID = "DUPLICATE_VALIDATION_ID"  # a validation id is already stored
    INVALID_TTL = "INVALID_TTL"  # the store's time-to-live settings are not positive
    INVALID_QUOTA = "INVALID_QUOTA"  # the store's changeset quota is negative
    INVALID_APPLY_RESULT = "INVALID_APPLY_RESULT"  # an apply result to store is not JSON
    NOT_APPLYING = "NOT_APPLYING"  # the apply to finish or abort is not in progress

    # --- The client itself ------------------------------------------------------------------------
    CLIENT_CLOSED = "CLIENT_CLOSED"  # the Client was closed before the call
    MALFORMED_RESPONSE = "MALFORMED_RESPONSE"  # the daemon's answer cannot be understood
