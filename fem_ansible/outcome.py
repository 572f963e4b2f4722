"""What finishes an attempt at a task: the uploads, the terminal event and the audit of its
outcome (docs/architecture.md, "Seams").

:class:`Finisher` reads Ansible's verdict on the run (:class:`~fem_ansible.runner.RunResult`)
and what the roles reported (the attempt's :class:`~fem_ansible.tracking.StageTracker`),
uploads the archives the playbook brought back, and emits the one terminal event.  Nothing
here runs a playbook: what the host needs first (a stop ended, a stopped run cleaned up) is
``lifecycle._Execution``'s.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TaskFailed
from .refs import redact_url
from .runner import RunResult
from .sizes import format_bytes
from .stages import Stage
from .tracking import AttemptPart, StageTracker
from .transfer import Archive, upload

if TYPE_CHECKING:
    from .lifecycle import Node

# Longest upload of each archive of a run a cancel stopped (its logs are still sent).
STOPPED_UPLOAD_S = 60.0


class Finisher(AttemptPart):
    """The end of one attempt: ``track`` holds what it reported, ``cancel`` whether (and by
    whom) it was cancelled."""

    def __init__(self, node: Node, track: StageTracker, cancel: threading.Event):
        super().__init__(node, track.rec)
        self.track = track
        self.cancel = cancel

    def end(self, event: dict[str, Any]) -> dict[str, Any]:
        error = event["error"] or {}
        self.node.audit.record("outcome", self.tid, state=event["state"],
                               exit_code=event["exit_code"], error=error.get("code"),
                               stage=error.get("stage"), message=error.get("message"),
                               outputs=event["outputs"], logs=event["logs"])
        self.node.prune_runs()
        return event

    def finish(self, outcome: RunResult, stopped: bool) -> dict[str, Any]:
        """The terminal event: Ansible's verdict on the playbook first, then the uploads.

        :param stopped: a cancel stopped the container (its outputs and logs still go)."""
        failure = outcome.failure
        if self.cancel.is_set() and outcome.status == "canceled":
            return self.track.emit("CANCELLED", self._cancelled_by(),
                                   error=error("cancelled", Stage.RUN, self._cancelled_by()))
        if failure is not None:
            return self.track.emit("FAILED", failure.message,
                                   error=error(failure.code, failure.stage, failure.message))
        self.track.stage_done(Stage.STAGE_OUT)
        result = self.track.result
        exit_code = result.get("exit_code")
        timed_out = bool(result.get("timed_out"))
        try:
            reports = self._upload(stopped)
        except TaskFailed as e:
            if e.code == "cancelled":  # the cancel came during the uploads
                return self.track.emit("CANCELLED", self._cancelled_by(), error=error(
                    e.code, e.stage, f"{self._cancelled_by()} during the uploads"))
            return self.track.emit("FAILED", e.message, exit_code=exit_code,
                                   error=error(e.code, e.stage, e.message))
        if timed_out:
            limit = self.task["resources"]["timeout_s"]
            return self.track.emit("TIMED_OUT", f"stopped after {limit}s", exit_code=None,
                                   error=error("timeout", Stage.RUN, f"ran longer than {limit}s"),
                                   **reports)
        # A tool that exited by itself before the stop reached it ends by its exit code, as
        # if no stop had been asked (DESIGN.md); an executor that does not report
        # fem_stopped (Slurm) is taken as stopped.
        if self.cancel.is_set() and result.get("stopped", True):
            return self.track.emit("CANCELLED", self._cancelled_by(), exit_code=None,
                                   error=error("cancelled", Stage.RUN, self._cancelled_by()),
                                   **reports)
        if result.get("oom_killed") and exit_code != 0:
            # Not a bare 137: the kernel's OOM killer ended it, at the task's memory limit.
            limit = format_bytes(self.task["resources"]["memory"])
            message = (f"the kernel killed the container for memory (limit {limit}, exit "
                       f"{exit_code})")
            return self.track.emit("FAILED", message, exit_code=exit_code,
                                   error=error("oom_killed", Stage.RUN, message), **reports)
        if exit_code != 0:
            return self.track.emit("FAILED", f"the container exited with {exit_code}",
                                   exit_code=exit_code,
                                   error=error("execution_failed", Stage.RUN,
                                               f"the container exited with {exit_code}"),
                                   **reports)
        return self.track.emit("COMPLETED", "completed", exit_code=0, **reports)

    def _cancelled_by(self) -> str:
        return f"cancelled by the {getattr(self.cancel, 'by', 'orchestrator')}"

    def _upload(self, stopped: bool) -> dict[str, Any]:
        """Upload the archives the playbook brought back; an archive already uploaded (by an
        earlier attempt) is not uploaded again.  A cancel stops them at once, but for the
        outputs and logs of a run it stopped: those get ``STOPPED_UPLOAD_S`` each."""
        result = self.track.result
        uploaded = result.setdefault("uploaded", {})
        reports: dict[str, Any] = {}
        for kind in ("outputs", "logs"):
            where = result.get(f"{kind}_archive") or {}
            path = where.get("path")
            if not path or not Path(path).is_file():
                raise TaskFailed(f"the {kind} archive was not brought back",
                                 code="stage_out_failed", stage=Stage.STAGE_OUT)
            archive = Archive.of(path)
            target = self.task[kind]["upload"]
            if kind == "logs" and not self.config.policy.share_logs:
                target = None
            if target and not uploaded.get(kind):
                self.node.audit.record("upload", self.tid, archive=kind,
                                       url=redact_url(target["url"]), size=archive.size,
                                       sha256=archive.sha256)
                upload(archive, target, self.config.http,
                       progress=lambda sent, k=kind, total=archive.size:
                       self.node.observer.on_upload(self.tid, k, sent, total),
                       cancel=None if stopped else self.cancel,
                       timeout_s=min(self.config.http.transfer_timeout_s, STOPPED_UPLOAD_S)
                       if stopped else None)
                uploaded[kind] = True
                self.journal.update(self.tid, result=result)
            reports[kind] = archive.report(target["url"] if target else None)
        return reports


def error(code: str, stage: str, message: str) -> dict[str, str]:
    """An event's ``error``: the contract's code, the stage it happened in, what happened."""
    return {"code": code, "stage": stage, "message": message}
