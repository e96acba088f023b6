"""The workflow after a verdict: record it, approve it, apply or discard its changes.

The engine judges and runs; this module remembers. It binds the durable state store
(``airlock.state``: validations, approvals, apply results in SQLite) to the kept
dry-run changes (``sandbox/changeset.py``, one directory per validation under the
state directory). The step that writes them to the host (``Engine.apply_changeset``:
``sandbox/apply.py``, run by a supervisor of the spawner as the validation's own user)
is handed to :meth:`Workflow.apply` by its one caller, ``airlock.core.service``.

Every method takes the caller's kernel credentials (a checked request carries them) and
leaves the ownership checks to the state store (only the validation's user, or root, may
act on it), but for Approve: the daemon's :class:`~airlock.core.config.Approvers` decide
who may approve, and never the validation's own uid unless allow_self_approval is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable

from airlock._errors import AirlockError
from airlock._special import change_specials
from airlock.audit.model import Authorization
from airlock.core.config import Approvers
from airlock.core.request import CheckedRequest
from airlock.core.state import (
    ApplyDone,
    ApprovalScope,
    NewValidation,
    SpecialChange,
    StateStore,
    ValidationRecord,
)
from airlock.sandbox.apply import Recovery
from airlock.types import ApplyOutcome, ApprovalGrant, PeerCred, Validation, Verdict

__all__ = ["Workflow"]

_log = logging.getLogger("airlock.daemon")

_SWEEP_EVERY_S = 30.0
# The pruning thread (start_pruning): how often it wakes, and at most how many validations it
# expires and rows it deletes each time (bounded work; a backlog takes a few ticks).
PRUNE_EVERY_S = 30.0
PRUNE_BATCH = 500
# Final rows (applied, discarded, expired validations; expired or ended approvals) are kept
# this long, so a late retry still gets the state's own answer, then deleted.
KEEP_FINAL_S = 24 * 3600.0


class Workflow:
    """Validations, approvals and changesets of one daemon. Thread-safe."""

    def __init__(
        self, state: StateStore, changesets_dir: str, approvers: Approvers | None = None
    ) -> None:
        self.state = state
        self.changesets_dir = changesets_dir
        self.approvers = approvers or Approvers()
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()
        self._pruning: tuple[threading.Thread, threading.Event] | None = None
        os.makedirs(changesets_dir, mode=0o700, exist_ok=True)

    # --- Validate -----------------------------------------------------------------------------

    def changeset_dir(self, validation_id: str) -> str:
        """Where the dry run of ``validation_id`` keeps its changes for Apply."""
        if not validation_id.isalnum():
            raise ValueError(f"not a validation id: {validation_id!r}")
        return os.path.join(self.changesets_dir, validation_id)

    def record(self, v: Validation, req: CheckedRequest) -> Validation:
        """Remember validation ``v`` of ``req`` (kept on return), to approve and apply it.

        Returns ``v`` as recorded: when keeping its changes would take its uid's changesets
        over their share of the quota (or all of them over the quota), it is recorded
        without them, its changes are deleted, and the returned validation says why in
        ``changes_not_kept`` (the verdict stands: one user filling the space never makes
        another's Validate fail). One that leaves nothing to approve or apply (ALLOW or
        DENY with no changes, or DENY with none kept) is not kept: that saves the common
        case a transaction and an fsync; the audit log has it. An ALLOW one whose changes
        were not kept is, so that Apply can say why it has nothing to apply.
        """
        not_kept = v.changes_not_kept if v.changes and not v.changeset_dir else ""
        asked, allowed = v.verdict is Verdict.ASK, v.verdict is Verdict.ALLOW
        if not (asked or v.changeset_dir or (allowed and not_kept)):
            return v
        auth = None
        if v.verdict is Verdict.ALLOW:
            auth = Authorization.AUTO_APPROVED if not v.sandboxed else Authorization.POLICY_ALLOWED
        new = NewValidation(
            validation_id=v.validation_id,
            command=req.command,
            cwd=req.cwd,
            uid=req.uid,
            gid=req.gid,
            verdict=v.verdict,
            env_sha256=req.env_sha256,
            caller_pid=req.caller.pid,
            session_id=req.session_id,
            policy_version=v.policy_version,
            diff_hash=v.changes_digest,
            summary=v.summary,
            changeset_dir=v.changeset_dir,
            changeset_bytes=v.changeset_bytes,
            auth_context=auth,
            changes_not_kept=not_kept,
            specials=_specials(v) if v.changeset_dir else (),
        )
        try:
            self.state.record_validation(new)
        except AirlockError as exc:
            _remove(v.changeset_dir)  # not recorded: nobody could ever apply or discard it
            if exc.reason != "CHANGESET_QUOTA_EXCEEDED":
                raise
            # Over the quota: the validation stands, without its changes.
            why = str(exc)
            self.state.record_validation(
                dataclasses.replace(
                    new,
                    diff_hash="",
                    changeset_dir="",
                    changeset_bytes=0,
                    changes_not_kept=why,
                    specials=(),
                )
            )
            return dataclasses.replace(
                v, changes_digest="", changes_not_kept=why, changeset_dir="", changeset_bytes=0
            )
        except BaseException:
            _remove(v.changeset_dir)
            raise
        return v

    # --- Approve ------------------------------------------------------------------------------

    def approve(
        self,
        validation_id: str,
        scope: ApprovalScope,
        peer: PeerCred,
        special_paths: tuple[bytes, ...] = (),
    ) -> tuple[ApprovalGrant, ValidationRecord, str]:
        """Approve a validation: the grant (its token is shown once), what it approved, and
        why ``peer`` may approve it ("approver" or "self-approval ...").

        ``special_paths``: the validation's special files (setuid, capabilities, devices,
        ...) the approval lets Apply write (FIFOs and sockets need none). Who may approve is
        :attr:`approvers`' to say, checked in the state store's transaction:
        PermissionDenied (SELF_APPROVAL_NOT_ALLOWED, NOT_AN_APPROVER) otherwise.
        """
        basis = ""

        def may_approve(rec: ValidationRecord) -> None:
            nonlocal basis
            basis = self.approvers.how(peer, rec.uid)

        token, approval = self.state.approve(
            validation_id,
            scope,
            approver_uid=peer.uid,
            approver_subject=f"uid {peer.uid} gid {peer.gid} (peer credentials)",
            special_paths=special_paths,
            may_approve=may_approve,
        )
        grant = ApprovalGrant(
            approval_token=token,
            approval_id=approval.approval_id,
            expires_at=approval.expires_at,
            approver_uid=approval.approver_uid,
        )
        return grant, self.state.get(validation_id), basis

    def authorize(self, req: CheckedRequest, policy_version: str) -> Authorization | None:
        """For Execute: the approval covering exactly ``req``, or None (it must ask).

        A ONCE token is used up here.
        """
        return self.state.authorize(
            req.approval_token or None,
            command=req.command,
            cwd=req.cwd,
            policy_version=policy_version,
            session_id=req.session_id,
            uid=req.uid,
        )

    def approver_of(self, req: CheckedRequest, policy_version: str) -> str:
        """Who approved what ``authorize`` let through, for the audit log ("" if unknown)."""
        approval = self.state.approval_used(
            req.approval_token or None,
            command=req.command,
            cwd=req.cwd,
            policy_version=policy_version,
            session_id=req.session_id,
            uid=req.uid,
        )
        if approval is None:
            return ""
        return (
            f"{approval.scope.name.lower()} approval {approval.approval_id} of validation "
            f"{approval.validation_id} by uid {approval.approver_uid}"
        )

    # --- Apply and Discard --------------------------------------------------------------------

    def apply(
        self,
        validation_id: str,
        peer: PeerCred,
        write: Callable[[str, int, int, tuple[bytes, ...]], ApplyOutcome],
        on_begun: Callable[[ValidationRecord], object] | None = None,
        on_written: Callable[[ValidationRecord, ApplyOutcome], object] | None = None,
    ) -> tuple[ApplyOutcome, ValidationRecord]:
        """Write the validation's kept changes to the host with ``write``, exactly once.

        ``write(changeset_dir, uid, gid, approved_special)`` writes them as that user, with
        the special files its approval names and no other, and says what it wrote.
        ``on_begun(record)`` runs once the apply is claimed (APPLYING, durable) and before
        anything is written: the audit log records the start there, so an apply a crash
        cuts short is never unrecorded. If it raises, nothing is written.
        ``on_written(record, outcome)`` runs once everything is written and before the
        apply is marked done: the audit log records the outcome there, so a crash between
        the two leaves the apply APPLYING, which recovery settles and records. What was
        written stays done even if it raises.
        """
        begun = self.state.begin_apply(validation_id, uid=peer.uid)
        if isinstance(begun, ApplyDone):
            first = _outcome_from_json(begun.result_json)
            return (
                ApplyOutcome(
                    validation_id=validation_id,
                    applied_paths=first.applied_paths,
                    replayed=True,
                    bytes_written=first.bytes_written,
                    duration_s=first.duration_s,
                ),
                begun.record,
            )
        record = begun
        try:
            if on_begun is not None:
                on_begun(record)
            if not record.changeset_dir:
                outcome = ApplyOutcome(validation_id=validation_id, applied_paths=())
            else:
                t0 = time.monotonic()
                outcome = write(
                    record.changeset_dir, record.uid, record.gid, record.approved_special
                )
                outcome = ApplyOutcome(
                    validation_id=validation_id,
                    applied_paths=outcome.applied_paths,
                    bytes_written=outcome.bytes_written,
                    duration_s=time.monotonic() - t0,
                )
        except AirlockError as exc:
            if getattr(exc, "partial", None):
                # Something was written before the failure: final, never retried.
                self.state.finish_apply(validation_id, json.dumps({"error": exc.message}))
            else:
                self.state.abort_apply(validation_id, exc.reason)
            raise
        except BaseException as exc:
            self.state.abort_apply(validation_id, type(exc).__name__)
            raise
        try:
            if on_written is not None:
                on_written(record, outcome)
        finally:
            done = self.state.finish_apply(validation_id, _outcome_to_json(outcome))
            _remove(done.changeset_dir)
        return outcome, done

    def find(self, validation_id: str) -> ValidationRecord | None:
        """The validation ``validation_id``; None if there is none (or it cannot be read)."""
        with contextlib.suppress(AirlockError):
            return self.state.get(validation_id)
        return None

    def discard(self, validation_id: str, peer: PeerCred) -> ValidationRecord:
        record = self.state.discard(validation_id, uid=peer.uid)
        _remove(record.changeset_dir)
        return record

    def sweep(self) -> None:
        """Expire validations past their time to live and delete their changes (throttled)."""
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_EVERY_S or not self._sweep_lock.acquire(False):
            return
        try:
            self._last_sweep = now
            for record in self.state.expire():
                _remove(record.changeset_dir)
        finally:
            self._sweep_lock.release()

    def prune(self, batch: int = PRUNE_BATCH, keep_final_s: float = KEEP_FINAL_S) -> int:
        """One bounded round: expire up to ``batch`` validations past their time to live and
        delete their kept changes, then delete up to ``batch`` state rows final for longer
        than ``keep_final_s``. Returns how much it did (0: nothing was due)."""
        with self._sweep_lock:
            expired = self.state.expire(limit=batch)
            for record in expired:
                _remove(record.changeset_dir)
            pruned = self.state.prune(time.time() - keep_final_s, batch)
        if expired or pruned:
            _log.info("pruned", extra={"expired": len(expired), "rows_deleted": pruned})
        return len(expired) + pruned

    def start_pruning(self, every_s: float = PRUNE_EVERY_S) -> None:
        """Prune every ``every_s`` seconds on a thread of its own (it never forks), until
        :meth:`stop_pruning`: expired changes leave the disk without waiting for a request."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.prune()
                except AirlockError as exc:  # the store is locked or full: next time
                    _log.warning("prune failed", extra={"reason": exc.reason, "error": str(exc)})

        thread = threading.Thread(target=loop, name="airlock-prune", daemon=True)
        self._pruning = (thread, stop)
        thread.start()

    def stop_pruning(self) -> None:
        """Stop the pruning thread and wait for a round in progress (before the store closes)."""
        if self._pruning is not None:
            thread, stop = self._pruning
            stop.set()
            thread.join()
            self._pruning = None

    def recover(
        self, roll: Callable[[ValidationRecord], Recovery | None] | None = None
    ) -> list[tuple[ValidationRecord, Recovery | None, str]]:
        """At start-up: settle applies a crash interrupted; delete changesets nobody owns.

        ``roll(record)`` rolls the interrupted apply of ``record`` forward or back on the host
        (``Engine.recover_changeset``; None: it had not started writing). Then: rolled
        forward, every path as the changeset says, it is APPLIED (its result says it was
        recovered); rolled back (or never started), every path as before, it is back to
        APPROVED/ALLOWED and may be applied again (a ONCE approval it used is usable again);
        otherwise (a path in neither state, or ``roll`` failed) it is APPLY_INTERRUPTED, for a
        person to check. Returns (record as settled, what ``roll`` found, its error) for each,
        for the caller to audit.
        """
        settled: list[tuple[ValidationRecord, Recovery | None, str]] = []
        for record in self.state.applying() if roll is not None else ():
            assert roll is not None
            vid = record.validation_id
            recovery: Recovery | None = None
            error = ""
            try:
                recovery = roll(record) if record.changeset_dir else None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error or (recovery is not None and not recovery.consistent):
                settled.append((record, recovery, error))  # flagged by state.recover below
            elif recovery is None or recovery.direction == "back":
                why = "rolled back at start-up: the daemon stopped before the apply committed"
                settled.append((self.state.abort_apply(vid, why), recovery, ""))
            else:
                outcome = ApplyOutcome(validation_id=vid, applied_paths=recovery.after)
                text = json.loads(_outcome_to_json(outcome))
                text["recovered"] = "rolled forward at start-up after the daemon stopped"
                done = self.state.finish_apply(vid, json.dumps(text))
                _remove(done.changeset_dir)
                settled.append((done, recovery, ""))
        interrupted = {r.validation_id: r for r in self.state.recover()}
        settled = [(interrupted.get(r.validation_id, r), rc, e) for r, rc, e in settled]
        self._last_sweep = 0.0
        self.sweep()
        for name in os.listdir(self.changesets_dir):
            path = os.path.join(self.changesets_dir, name)
            try:
                state = self.state.get(name).state.name
            except AirlockError:
                state = "UNKNOWN"
            if state in ("UNKNOWN", "APPLIED", "DISCARDED", "EXPIRED"):
                _remove(path)
        return settled


def _specials(v: Validation) -> tuple[SpecialChange, ...]:
    """The special files among ``v``'s changes, with how each is special."""
    found = []
    for change in v.changes:
        kinds = change_specials(change)
        if kinds:
            found.append((change.path, tuple(sorted(kinds))))
    return tuple(found)


def _remove(path: str) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)


def _outcome_to_json(o: ApplyOutcome) -> str:
    return json.dumps(
        {
            "applied_paths": [p.decode("utf-8", "surrogateescape") for p in o.applied_paths],
            "bytes_written": o.bytes_written,
            "duration_s": o.duration_s,
        }
    )


def _outcome_from_json(text: str) -> ApplyOutcome:
    data = json.loads(text)
    return ApplyOutcome(
        validation_id="",
        applied_paths=tuple(
            p.encode("utf-8", "surrogateescape") for p in data.get("applied_paths", ())
        ),
        bytes_written=int(data.get("bytes_written", 0)),
        duration_s=float(data.get("duration_s", 0.0)),
    )
