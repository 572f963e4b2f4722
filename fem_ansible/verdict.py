"""Ansible's own verdict on a playbook run, and the stage each part of it belongs to.

Whether a run failed is what Ansible says, as AWX judges a job: ansible-runner's status and
the play's stats (``playbook_on_stats``: ``failures`` and ``dark``; ``rescued`` and
``ignored`` are not failures).  A site's role that catches its own error with
``block``/``rescue`` therefore leaves a run that succeeded, whatever ``runner_on_failed``
events it sent on the way.  Failure events only supply the message of a run that failed.

The stage is reported by the playbook itself, not guessed from role names: as the play
enters a stage it runs a marker task, ``ansible.builtin.set_stats`` with ``fem_stage``
(``stage_in``, ``run``, ``stage_out``; ``done`` once the last stage ended well; ``cleanup``
in ``always``) and optionally ``fem_error_code``, the code of a failure from there on
(docs/roles.md, "Stages").  Whatever runs after a marker, a site role of any name or a role
it includes, is in that stage.

Which failure event ended the play (docs/decisions.md, "Ansible's verdict"): a failure
followed by a marker of the main block was rescued, since a failure that is not rescued
sends the play to ``always``, past every marker left.  Of the failures after the last
marker, the stats count how many were not rescued (``failures``); those come last, because
once a task failed for good only ``always`` sections run, so the one that ended the play is
the first of them.  Failures in the cleanup stage (``always``) never hide one of the stages
before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from .schema import ERROR_CODES
from .stages import Stage

# The error code of a failure in each stage when neither its marker nor the failed task says.
STAGE_CODES = {
    Stage.STAGE_IN: "input_failed",
    Stage.RUN: "execution_failed",
    Stage.STAGE_OUT: "stage_out_failed",
    Stage.DONE: "stage_out_failed",
    Stage.CLEANUP: "stage_out_failed",
}
# The stage of the task's error (DESIGN.md §4 knows intake, stage_in, run and stage_out).
ERROR_STAGES = {Stage.DONE: Stage.STAGE_OUT, Stage.CLEANUP: Stage.STAGE_OUT}
# Codes a failed task (``fem_error_code`` in its result) or a marker may give: any code of
# the contract but those of intake and those the listener itself decides.
TASK_ERROR_CODES = frozenset(ERROR_CODES) - {
    "invalid_message", "signature_invalid", "expired", "wrong_node", "policy_violation",
    "timeout", "cancelled", "interrupted",
}
MAX_MESSAGE = 2000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Failure:
    """Why a run failed.

    Attributes:
        stage: the task's ``error.stage``: ``stage_in``, ``run`` or ``stage_out``.
        code: the task's ``error.code``.
        message: names the role and the task that failed, then Ansible's message
            ("fem_stage_out: Archive the outputs: …").
        unreachable: the host could not be reached (the task may move to another host).
    """

    stage: str
    code: str
    message: str
    unreachable: bool = False


class StageHooks(Protocol):
    def on_stage(self, stage: Stage) -> None: ...

    def on_report(self, data: dict[str, Any]) -> None: ...


class PlayWatcher:
    """Reads one run's events as ansible-runner hands them over (its thread), tells
    ``hooks`` of each new stage and of what roles report, and gives the verdict at the end.

    :param hooks: told ``on_stage`` when a marker names a stage other than the current one,
        ``on_report`` with the data of every other ``set_stats``.
    """

    def __init__(self, hooks: StageHooks):
        self.hooks = hooks
        self.stage: Stage | None = None
        self._code = STAGE_CODES[Stage.STAGE_IN]
        self._pending: list[Failure] = []  # failures of the main block since its last marker
        self._cleanup: list[Failure] = []  # failures in the cleanup stage
        self._unreachable: Failure | None = None
        self._main_done = False
        self._stats: dict[str, int] | None = None
        self._error_line: str | None = None

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "runner_on_ok":
            stats = (data.get("res") or {}).get("ansible_stats") or {}
            if isinstance(stats.get("data"), dict):
                self._set_stats(stats["data"])
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            failed = self._failed(data, unreachable=False)
            (self._cleanup if self.stage == Stage.CLEANUP else self._pending).append(failed)
        elif kind == "runner_on_unreachable":
            # Nothing runs on the host after it, not even `always`: the last one is the one.
            self._unreachable = self._failed(data, unreachable=True)
        elif kind == "playbook_on_stats":
            self._stats = {key: sum((data.get(key) or {}).values())
                           for key in ("failures", "dark")}
        elif kind == "verbose" and self._error_line is None:
            line = _ANSI.sub("", str(event.get("stdout") or "")).strip()
            if line.startswith(("[ERROR]", "ERROR!")):
                self._error_line = line

    def _set_stats(self, data: dict[str, Any]) -> None:
        report = {k: v for k, v in data.items() if k not in ("fem_stage", "fem_error_code")}
        if data.get("fem_stage") in tuple(Stage):
            self._marker(Stage(data["fem_stage"]), data.get("fem_error_code"))
        if report:
            self.hooks.on_report(report)

    def _marker(self, stage: Stage, code: Any) -> None:
        if stage != Stage.CLEANUP:
            # The main block went on: every failure before this marker was rescued.
            self._pending.clear()
            self._main_done = stage == Stage.DONE
        self._code = code if code in TASK_ERROR_CODES else STAGE_CODES[stage]
        if stage != self.stage:
            self.stage = stage
            self.hooks.on_stage(stage)

    def _failed(self, data: dict[str, Any], *, unreachable: bool) -> Failure:
        res = data.get("res") if isinstance(data.get("res"), dict) else {}
        role, task = data.get("role"), data.get("task") or "a task"
        what = _result_message(res) or "task failed"
        if unreachable:
            what = f"host unreachable: {what}"
        message = f"{role}: {task}: {what}" if role else f"{task}: {what}"
        code = _result_code(res)
        return Failure(self._error_stage(), code if code in TASK_ERROR_CODES else self._code,
                       message[:MAX_MESSAGE], unreachable)

    def _error_stage(self) -> str:
        stage = self.stage or Stage.STAGE_IN  # before any marker the listener is staging in
        return ERROR_STAGES.get(stage, stage)

    def verdict(self, status: str, rc: int) -> Failure | None:
        """None when Ansible says the run succeeded, else why it failed.

        :param status: ansible-runner's status (``successful``, ``failed``, ``timeout``,
            ``canceled``).
        :param rc: ansible-playbook's exit code.
        """
        stats = self._stats or {"failures": 0, "dark": 0}
        if status == "successful" and not stats["failures"] and not stats["dark"]:
            return None
        if status == "timeout":
            return self._fallback("the playbook outlived its time limit")
        if status == "canceled":
            return self._fallback("the playbook was stopped")
        failed = self._failed_for_good(stats["failures"])
        if failed is None and stats["dark"]:
            failed = self._unreachable
        if failed is not None:
            return failed
        detail = f": {self._error_line}" if self._error_line else ""
        return self._fallback(f"ansible-playbook failed (rc {rc}){detail}")

    def node_fault(self, code: str, message: str) -> Failure:
        """The failure of a run the node itself ended in the stage it was in, whatever
        Ansible would have said: its file system filled (``disk_full``)."""
        return Failure(self._error_stage(), code, message[:MAX_MESSAGE])

    def _failed_for_good(self, failures: int) -> Failure | None:
        """The first failure that was not rescued, of ``failures`` that were not."""
        if failures <= 0:
            return None
        if self._pending and not self._main_done:
            # The cleanup's failures came after these and count as not rescued; one that a
            # cleanup rescued itself makes the count short, hence at least one.
            left = max(1, min(len(self._pending), failures - len(self._cleanup)))
            return self._pending[-left]
        if self._cleanup:
            return self._cleanup[-max(1, min(len(self._cleanup), failures))]
        return None

    def _fallback(self, message: str) -> Failure:
        return Failure(self._error_stage(), self._code, message[:MAX_MESSAGE])


def _result_message(res: dict[str, Any]) -> str:
    """Ansible's message of a failed result: ``msg`` (an include's ``reason``; a ``no_log``
    task's ``censored``), with the command's stderr when ``msg`` does not say it, else its
    exit code; of a loop, the first failed item's."""
    items = res.get("results")
    if isinstance(items, list):
        failed = [i for i in items if isinstance(i, dict) and i.get("failed")]
        if failed:
            return _result_message(failed[0])
    msg = str(res.get("msg") or res.get("reason") or res.get("censored") or "").strip()
    stderr = str(res.get("stderr") or "").strip()
    if stderr and stderr not in msg:
        return f"{msg}: {stderr}" if msg else stderr
    rc = res.get("rc")
    if not stderr and isinstance(rc, int) and rc and str(rc) not in msg:
        # a command that failed silently: "non-zero return code" alone (issue 31)
        return f"{msg} (exit code {rc})" if msg else f"exit code {rc}"
    return msg


def _result_code(res: dict[str, Any]) -> Any:
    """``fem_error_code`` of a failed result, or of a loop's first failed item that has one."""
    if "fem_error_code" in res:
        return res["fem_error_code"]
    items = res.get("results")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("failed") and "fem_error_code" in item:
            return item["fem_error_code"]
    return None
