"""What follows a run's stages: the events of one attempt at a task, the stages done, the
roles' reports (docs/architecture.md, "Seams").

:class:`StageTracker` is the attempt's :class:`~fem_ansible.runner.RunHooks`: the playbook's
stage markers (one :class:`~fem_ansible.stages.Stage` type) become RUNNING and STAGING_OUT
events and ``stages_done`` in the journal, which recovery skips; the roles' ``set_stats``
reports become the task's result and its progress events.  Every event goes to the journal
first, then to the node's observer and ``notify``.  It runs nothing and finishes nothing:
``lifecycle._Execution`` runs the attempt, :mod:`fem_ansible.outcome` finishes it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .events import task_event
from .journal import TaskRecord
from .runner import RunHooks
from .stages import Stage

if TYPE_CHECKING:
    from .lifecycle import Node

log = logging.getLogger(__name__)


class AttemptPart:
    """What each part of one attempt at a task reads: the node, its config and journal, and
    the task's record (whose ``attempt`` the coordinator counts)."""

    def __init__(self, node: Node, rec: TaskRecord):
        self.node = node
        self.config = node.config
        self.journal = node.journal
        self.rec = rec
        self.task = rec.task
        self.tid = rec.task_id


class StageTracker(AttemptPart, RunHooks):
    """The events, stages and result of one attempt at the task ``rec``.

    Attributes:
        known: what every event of the attempt repeats: the host, the image's digest and
            the source's commit once the roles reported them.
        stages_done: the stages that ended well, as journaled (recovery skips them).
        result: what the roles reported (exit code, archives, …), as journaled.
        stage: the stage the play is in now (None before its first marker).
    """

    def __init__(self, node: Node, rec: TaskRecord):
        super().__init__(node, rec)
        self.known: dict[str, Any] = {
            "host": rec.host or self.task["target"],
            "image_digest": rec.result.get("image_digest"),
            "source_commit": rec.result.get("source_commit"),
        }
        self.stages_done = list(rec.stages_done)
        self.result = dict(rec.result)
        self.stage: Stage | None = None
        # The state of the last event, which a progress event repeats.
        self._state_now = rec.state

    # Events ------------------------------------------------------------------------------

    def emit(self, state: str, message: str, **fields: Any) -> dict[str, Any]:
        event = task_event(self.config.node_id, self.task, state, message,
                           attempt=self.rec.attempt, **{**self.known, **fields})
        stored = self.journal.append_event(self.tid, event)
        self._state_now = state
        log.info("%s %s: %s", self.tid, state, message, extra={"task_id": self.tid})
        self.node.observer.on_event(stored)
        self.node.notify()
        return stored

    def stage_done(self, stage: Stage) -> None:
        if stage not in self.stages_done:
            self.stages_done.append(stage)
            self.journal.update(self.tid, stages_done=self.stages_done)

    # RunHooks (called from ansible-runner's thread) ----------------------------------------

    def on_stage(self, stage: Stage) -> None:
        # A marker of the main block: the stage before it ended well, since a failure that
        # was not rescued sends the play to cleanup (always) past every marker left.  The
        # cleanup marker is reached whatever happened before it.
        if stage != Stage.CLEANUP and self.stage not in (None, Stage.CLEANUP, Stage.DONE):
            self.stage_done(self.stage)
        self.stage = stage
        if stage == Stage.DONE:
            self.stage_done(Stage.STAGE_OUT)
        elif stage == Stage.RUN:
            self.node.audit.record(
                "run", self.tid, host=self.known["host"], image=self.task["image"]["ref"],
                image_digest=self.known["image_digest"],
                source_commit=self.known["source_commit"],
                datasets=[d["name"] for d in self.task["datasets"]], attempt=self.rec.attempt)
            self.emit("RUNNING", f"running {self.task['image']['ref']}")
        elif stage == Stage.STAGE_OUT:
            self.emit("STAGING_OUT", "archiving outputs and logs")

    def on_report(self, data: dict[str, Any]) -> None:
        if data.get("fem_image_digest"):
            self.known["image_digest"] = data["fem_image_digest"]
        if data.get("fem_source_commit"):
            self.known["source_commit"] = data["fem_source_commit"]
        self.result.update({
            "image_digest": self.known["image_digest"],
            "source_commit": self.known["source_commit"],
        })
        for key in ("fem_exit_code", "fem_timed_out", "fem_stopped", "fem_oom_killed",
                    "fem_outputs_archive", "fem_logs_archive"):
            if key in data:
                self.result[key.removeprefix("fem_")] = data[key]
        self.journal.update(self.tid, result=self.result)
        if data.get("fem_progress"):
            # News within the current state (DESIGN.md §4), e.g. a queued Slurm job's id and
            # why it waits: a progress event, same state, next seq (docs/roles.md).
            self.emit(self._state_now, str(data["fem_progress"])[:500])
