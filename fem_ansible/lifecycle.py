"""A task's life on this node, whatever brought it: intake, acceptance, execution.

:class:`Node` holds the node's config, journal and intake, and is used the same way by the
broker listener and by ``fem-ansible run``.  Every event goes to the journal first and is
announced through ``notify``; who publishes it (the broker, or a terminal) is the caller's
business.  Policy is decided here, in Python, before Ansible starts; all work on hosts is
done by the playbook's roles.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import fastpath, naming, policy, resident, runspec
from .audit import AuditLog
from .config import Config
from .diskspace import below_floor
from .errors import RejectedError
from .events import task_event
from .intake import Intake, Task
from .journal import Journal, TaskRecord
from .outcome import Finisher, error
from .runner import (
    RunHooks,
    RunResult,
    RunSpec,
    ServerLost,
    collections_view,
    kill_task_processes,
    prestart,
    run_playbook,
    scan_cache_dir,
)
from .site_roles import stopped_by_file
from .ssh_masters import KeptMasters
from .stages import STATE_STAGE, Stage
from .targets import Targets
from .tracking import AttemptPart, StageTracker

log = logging.getLogger(__name__)

# How often a cancel stops the container again while the play is still in the run stage.
STOP_RETRY_S = 2.0


class CancelRequest(threading.Event):
    """A running task's cancel, and who asked: ``orchestrator`` (a control message, the
    legacy ``cancel_run``) or ``site`` (``fem-ansible cancel``); the CANCELLED event says it."""

    by = "orchestrator"
    _hook: Callable[[], None] | None = None

    def request(self, by: str) -> None:
        self.by = by
        self.set()
        if self._hook is not None:
            self._hook()

    def on_request(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the requesting thread) when the cancel comes, not at the
        runner's next poll: a stop starts at once."""
        self._hook = hook


class NodeObserver:
    """What a :class:`Node` tells besides the journal, for whoever watches it (the metrics,
    ``fem-ansible run``'s progress display); every method is optional and called from any
    thread, so it must be quick and never raise."""

    def on_event(self, event: dict[str, Any]) -> None:
        """An event was journaled (before it is announced through ``notify``)."""

    def on_upload(self, task_id: str, kind: str, sent: int, total: int) -> None:
        """``sent`` of ``total`` bytes of a task's ``kind`` archive are uploaded."""


# Datasets resolved for one task by whoever brought it (name -> host path), besides the
# site's: a protocol adapter's (the legacy sandbox and data path); never from a message.
RunDatasets = Callable[[Mapping[str, Any]], Mapping[str, str]]
# Container env vars passed to one task as secrets (``fem_secrets.env``): a protocol
# adapter's (the legacy token); never journaled, never in fem_task.
RunSecretEnv = Callable[[Mapping[str, Any]], Mapping[str, str]]


class Node:
    """This node's task service.

    :param config: the validated site config.
    :param journal: the node's journal.
    :param notify: called (from any thread) after an event was journaled.
    :param observer: told of every event and upload progress (metrics, progress display).
    :param run_datasets: the per-task datasets of protocol adapters (``policy.decide``'s
        ``run_datasets``), asked again at each attempt so recovery resolves them the same.
    :param run_secret_env: the per-task secret container env of protocol adapters.
    :param ssh_masters: the SSH masters kept between runs (the listener's); None: each run's
        masters end with it.
    """

    def __init__(self, config: Config, journal: Journal,
                 notify: Callable[[], None] = lambda: None,
                 observer: NodeObserver | None = None,
                 run_datasets: RunDatasets = lambda task: {},
                 run_secret_env: RunSecretEnv = lambda task: {},
                 ssh_masters: KeptMasters | None = None):
        self.config = config
        self.journal = journal
        self.notify = notify
        self.observer = observer or NodeObserver()
        self.audit = AuditLog(config.audit_file, config.node_id)
        self.runs_dir = config.work_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The only collections runs see, laid out once: a missing one is a config error now,
        # not a failed task later.
        self.collections = collections_view(config.work_dir, tuple(config.execution.collections))
        self.scan_cache = scan_cache_dir(config.work_dir)
        # Runs are forked from resident Ansibles, where runs can have cgroups.
        self.resident = (resident.Servers(config.work_dir)
                         if config.execution.resident_ansible and resident.available()
                         else None)
        if config.execution.strategy == "mitogen":  # its one warning, if any, now
            fastpath.start_check()
        # Where tasks run: the inventory's hosts, and this listener's count per host.
        self.targets = Targets(config, self.collections)
        # The one intake (fem_ansible/intake.py): signature keys, schema, policy, targets.
        self.intake = Intake(config, self.targets)
        # Set when the listener shuts down: running playbooks are stopped and their tasks
        # left, unreported, to the next listener's recovery.
        self.abandon = threading.Event()
        self.run_datasets = run_datasets
        self.run_secret_env = run_secret_env
        self.ssh_masters = ssh_masters

    # -- intake --------------------------------------------------------------------------

    def read(self, body: bytes, headers: Mapping[str, Any] | None, *,
             signed: bool = True) -> Task:
        """A message through the node's :class:`~fem_ansible.intake.Intake`; every decision
        is audited.

        :param signed: check the signature (messages from the broker); ``fem-ansible run``
            reads the sysadmin's own file without one.
        :raises RejectedError: as :meth:`Intake.read`.
        """
        key: dict[str, str | None] = {"key_id": None}

        def received(key_id: str | None) -> None:
            key["key_id"] = key_id
            self.audit.record("received", None, key_id=key_id, bytes=len(body),
                              signature="checked" if signed else "not checked (local file)")

        try:
            task = self.intake.read(body, headers, signed=signed, on_signed=received)
        except RejectedError as e:
            self.audit_rejected(e, key_id=key["key_id"])
            raise
        data = task.to_dict()
        self.audit.record(
            "accepted", task.task_id, key_id=task.key_id, experiment_id=task.experiment_id,
            image=task.image, source=data["source"]["repo"] if data["source"] else None,
            executor=task.executor, target=task.target, network=data["network"],
            resources=data["resources"], datasets=task.decision.datasets)
        return task

    def audit_rejected(self, err: RejectedError, **fields: Any) -> None:
        self.audit.record("rejected", err.task_id, code=err.code,
                          rule=getattr(err, "rule", None), reason=err.message, **fields)

    def reject(self, err: RejectedError) -> dict[str, Any] | None:
        """Journal a refused message: visible in ``fem-ansible tasks`` (REJECTED, with its
        reasons) and announced by a REJECTED event.

        A message whose ``task_id`` is a task this node already accepted is a re-send of it
        (DESIGN.md §5): the task stands, so no REJECTED event says otherwise; a finished
        one has its terminal event published again, as for any re-send.

        :returns: the REJECTED event, None for a re-send.
        """
        tid = err.task_id
        existing = self.journal.get(tid) if tid else None
        event = None if existing else task_event(
            self.config.node_id, None, "REJECTED", f"rejected: {err.message}", task_id=tid,
            error={"code": err.code, "stage": "intake", "message": err.message})
        stored = self.journal.add_rejection(tid, err.code, list(err.reasons), event)
        if stored is not None:
            self.observer.on_event(stored)
        elif existing is not None and existing.terminal:
            self._republish_last(existing.task_id)
        self.notify()
        return stored

    def accept(self, task: Task) -> tuple[dict[str, Any] | None, TaskRecord | None]:
        """Journal a new task with its RECEIVED event and the site's decision.

        :returns: ``(event, None)`` for a new task; ``(None, record)`` when the task id is
            known already; a finished one then has its terminal event queued again.
        """
        tid, data = task.task_id, task.to_dict()
        first = task_event(self.config.node_id, data, "RECEIVED", "task received")
        existing, event = self.journal.add_task(tid, data, first, task.decision_dict())
        if existing is not None:
            if existing.terminal:
                self._republish_last(tid)
            log.info("task %s is already in the journal (%s): not run again", tid,
                     existing.state, extra={"task_id": tid})
            return None, existing
        if event is not None:
            self.observer.on_event(event)
        self.notify()
        return event, None

    def _republish_last(self, task_id: str) -> None:
        last = self.journal.last_event(task_id)
        if last is not None:
            self.journal.republish(task_id, last["seq"])
            self.notify()

    # -- execution -----------------------------------------------------------------------

    def execute(self, task_id: str, cancel: threading.Event | None = None) -> dict[str, Any]:
        """Run an accepted task to its terminal event (which it returns)."""
        cancel = cancel or threading.Event()
        while True:
            rec = self.journal.get(task_id)
            if rec is None:
                raise KeyError(task_id)
            try:
                return _Execution(self, rec, cancel).run()
            except ServerLost as e:
                # Recovered as after a kill -9 of the listener: from the journal, as a new
                # attempt (its processes already killed with their cgroup).
                log.warning("%s: %s; the task is recovered", task_id, e,
                            extra={"task_id": task_id})

    def prestart(self) -> None:
        """Start the resident Ansibles of the task playbook's runs and of the short runs, so
        that the first task is forked too; a failure only leaves runs cold until their first
        run starts them."""
        if self.resident is None:
            return
        for spec in runspec.warm_ups(self):
            try:
                prestart(spec)
            except Exception:  # never the listener's start
                log.warning("the resident Ansible for %s runs did not start; the first run "
                            "starts it", spec.strategy, exc_info=True)

    def run_dir(self, task_id: str) -> Path:
        return self.runs_dir / task_id

    def prune_runs(self) -> None:
        """Keep the listener-side run dirs of the ``execution.keep_runs`` newest finished
        tasks; the rest are removed."""
        for tid in self.journal.finished_beyond(self.config.execution.keep_runs):
            shutil.rmtree(self.run_dir(tid), ignore_errors=True)

    def object_name(self, task_id: str) -> str:
        """The name of the task's container, Slurm job, run dir and processes' marker."""
        return naming.object_name(self.config.node_id, task_id, naming.TASK)


class _Execution(AttemptPart):
    """One attempt at one task: the playbook, then the uploads, then the terminal event.

    The coordinator of the attempt: recovery, the host and its retry, the runs (the task
    playbook, a cancel's stop, cleanup) and cancel are here; what follows the run's stages
    is its :class:`~fem_ansible.tracking.StageTracker` (events, stages done, reports), what
    finishes it its :class:`~fem_ansible.outcome.Finisher` (uploads, the terminal event).
    """

    def __init__(self, node: Node, rec: TaskRecord, cancel: threading.Event):
        super().__init__(node, rec)
        self.cancel = cancel
        self.track = StageTracker(node, rec)
        self.finisher = Finisher(node, self.track, cancel)
        self._stopper: threading.Thread | None = None
        self._stopper_lock = threading.Lock()
        # Set once the task playbook is over: the stopper's loop ends at once.
        self._play_over = threading.Event()
        if isinstance(cancel, CancelRequest):
            cancel.on_request(self._start_stopper)
        self._unreachable = False

    @property
    def _stage(self) -> Stage | None:
        """The stage the play is in now, as its tracker saw the markers."""
        return self.track.stage

    # The attempt -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        resumed = self.rec.state != "RECEIVED"
        if resumed:
            # An earlier listener process died in this task: whatever of its playbook still
            # runs is stopped first, so that two attempts never work side by side.
            kill_task_processes(self.node.object_name(self.tid), spare=(
                self.node.ssh_masters.processes() if self.node.ssh_masters else frozenset()))
            stage = STATE_STAGE.get(self.rec.state, Stage.STAGE_IN)
            full = below_floor(self.config.work_dir, max(self.config.execution.min_free_bytes, 1))
            if full:
                # Recovered on a file system below its floor (this task may well have filled
                # it): what it took is removed first, so that the journal has room to end it,
                # rather than wait for space nothing else would free.
                self._free_disk()
                message = f"recovered with {full}"
                return self.finisher.end(self.track.emit(
                    "FAILED", message, error=error("disk_full", stage, message)))
            self.rec.attempt += 1
            self.journal.update(self.tid, attempt=self.rec.attempt)
            if self.rec.attempt > self.config.execution.max_attempts:
                self._cleanup()
                return self.finisher.end(self.track.emit(
                    "FAILED", f"given up after {self.config.execution.max_attempts} attempts",
                    error=error("interrupted", stage, "the listener was interrupted "
                                f"{self.config.execution.max_attempts} times in this task")))
            log.info("%s: attempt %d, resuming after %s", self.tid, self.rec.attempt,
                     self.track.stages_done or "nothing done", extra={"task_id": self.tid})
        if self.journal.is_cancelled(self.tid):
            if resumed:
                self._cleanup()
            return self.finisher.end(self.track.emit(
                "CANCELLED", "cancelled before it started",
                error=error("cancelled", "intake", "cancelled before it started")))
        host = self.node.targets.acquire(self.task["target"], host=self.rec.host)
        if host is None:
            return self.finisher.end(self.track.emit(
                "FAILED", f"no inventory host for target {self.task['target']}",
                error=error("input_failed", Stage.STAGE_IN,
                            f"target {self.task['target']} has no host in the inventory")))
        self.track.known["host"] = host
        self.journal.update(self.tid, host=host)
        try:
            return self._attempt(resumed)
        finally:
            self.node.targets.release(self.track.known["host"], unreachable=self._unreachable)

    def _attempt(self, resumed: bool) -> dict[str, Any]:
        """The attempt on the host it holds, from the stage the journal says is next."""
        if Stage.STAGE_OUT in self.track.stages_done:
            # Only the uploads and the terminal event were left to do.
            self._cleanup()
            return self.finisher.end(self._finish(RunResult("successful", 0, None)))
        if resumed and not self.track.stages_done:
            self._cleanup()  # what a broken stage-in left is removed before it is redone
        if Stage.STAGE_IN not in self.track.stages_done:
            self.track.emit("STAGING_IN", "preparing volumes, image and source")
        outcome = self._run_task_playbook()
        if self.node.abandon.is_set() and outcome.status == "canceled":
            # The listener is shutting down: the task is left to recovery as it stands.
            return {}
        return self.finisher.end(self._finish(outcome))

    def _run_task_playbook(self) -> RunResult:
        """The task playbook; on a group, run again on another of its hosts while the one
        picked was unreachable before anything was done there (Targets.retry_host)."""
        tried: list[str] = []
        while True:
            spec = self._spec(skip_tags=[s for s in self.track.stages_done
                                         if s != Stage.STAGE_OUT])
            outcome = run_playbook(spec, self.track, self._should_stop)
            if self._stage is None and outcome.status == "successful":
                log.warning("%s: the playbook %s marked no stage (set_stats fem_stage): no "
                            "RUNNING or STAGING_OUT, and failures count as stage-in "
                            "(docs/roles.md, \"Stages and the outcome\")", self.tid,
                            spec.playbook, extra={"task_id": self.tid})
            host = self.track.known["host"]
            unreachable = outcome.failure is not None and outcome.failure.unreachable
            nxt = self.node.targets.retry_host(self.task, host, unreachable,
                                               self.track.stages_done, tried)
            if nxt is None:
                self._unreachable = unreachable
                return outcome
            self.track.known["host"] = nxt
            self.journal.update(self.tid, host=nxt)
            self.track.stage = None
            self.track.emit("STAGING_IN", f"host {host} is unreachable; trying {nxt}")

    @functools.cached_property
    def decision(self) -> policy.Decision:
        """Decided once, at intake, and journaled with the task; a task journaled by an
        earlier version without it is decided again, once for the attempt, when its first
        run is made."""
        if self.rec.decision:
            return policy.Decision(**self.rec.decision)
        return policy.decide(self.task, self.config, self.node.run_datasets(self.task))

    def _spec(self, tags: list[str] | None = None, skip_tags: list[str] | None = None,
              playbook: str | None = None, private_data_dir: Path | None = None) -> RunSpec:
        """The run of the task playbook (or of the built-in ``playbook``, e.g. ``stop.yml``)
        on the host it holds now (:func:`fem_ansible.runspec.build`)."""
        return runspec.build(self.node, self.rec, self.decision, self.track.known["host"],
                             tags=tags, skip_tags=skip_tags, playbook=playbook,
                             private_data_dir=private_data_dir)

    def _host_run_dir(self) -> str:
        """``fem_run.dir``: the task's work dir on the host it runs on."""
        host = self.track.known["host"]
        return naming.run_dir(self.node.targets.work_dir(host), self.node.object_name(self.tid))

    def _should_stop(self) -> bool:
        """Polled by the runner about once a second: should the playbook be killed?

        A cancel while the container runs stops the container instead, through the
        executor's ``stop`` entry point; the play then goes on to stage out its logs.  A
        cancel in stage-in or stage-out stops the play at once (issue 26: a slow stage-out
        held the slot); one in the last steps (``done``, ``cleanup``) lets them end."""
        if self.node.abandon.is_set():
            return True
        if not self.cancel.is_set():
            return False
        if self._stage == Stage.RUN:
            self._start_stopper()
            return False
        if self._stage == Stage.STAGE_OUT and self._stopper is not None:
            return False  # staging out the logs of the run the cancel stopped
        return self._stage not in (Stage.DONE, Stage.CLEANUP)

    def _start_stopper(self) -> None:
        """Stop the container, once, if the play is in the run stage."""
        with self._stopper_lock:
            if self._stage == Stage.RUN and self._stopper is None and self.cancel.is_set():
                self._stopper = threading.Thread(target=self._stop_container, daemon=True)
                self._stopper.start()

    def _stop_container(self) -> None:
        """Stop the container until the play has left the run stage: a cancel that arrives
        as the stage starts may find no container yet, and one must not start after it.

        The executor's ``stop`` asks the run module waiting for the container to stop it
        (docs/roles.md); on a host of the listener's own (a local connection) the listener
        asks at once itself, and for the built-in container executors that is the whole
        stop: no stop playbook, whose start-up took 2-4 s of a busy node's CPU, which the
        stopped play needed to stage out (issue 29)."""
        by_file = (self.node.targets.is_local(self.track.known["host"])
                   and stopped_by_file(self.task["executor"], self.config))
        log.info("%s: stopping the container", self.tid, extra={"task_id": self.tid})
        while self._stage == Stage.RUN:
            if not (by_file and self._ask_run_to_stop()):
                # Ended by the runner as soon as the play is over: nothing left to stop then.
                result = run_playbook(self._spec(playbook="stop.yml"), RunHooks(),
                                      self._play_over.is_set)
                if result.failure is not None and self._stage == Stage.RUN:
                    # (once the play has left the run stage its end also ends this stop run)
                    log.warning("%s: stopping the container failed: %s", self.tid,
                                result.failure.message, extra={"task_id": self.tid})
            if self._play_over.wait(STOP_RETRY_S):
                return

    def _ask_run_to_stop(self) -> bool:
        """Create the stop request in the run dir on the listener's own host (what the
        container executors' ``stop`` does); whether it could."""
        try:
            (Path(self._host_run_dir()) / "stop").touch(mode=0o600)
        except OSError:  # no run dir (yet): the stop playbook asks
            return False
        return True

    def _end_stopper(self) -> None:
        """The play is over: a stop run still under way is ended (its runner polls
        ``_play_over``) before the terminal event, so that nothing of the task outlives it."""
        self._play_over.set()
        if self._stopper is not None:
            self._stopper.join()

    def _cleanup(self) -> None:
        """Run only the cleanup stage, after a playbook that was stopped midway."""
        run_playbook(self._spec(tags=[Stage.CLEANUP]), RunHooks(), lambda: False)

    def _free_disk(self) -> None:
        """The work dir's file system filled during this task's run, which was stopped
        before its own cleanup: what the task took is removed at once, so that the journal
        has room for its terminal event.  The stopped run's artifacts go first; the
        cleanup run keeps its own files in the system's temp dir, off the full file system."""
        shutil.rmtree(self.node.run_dir(self.tid) / "artifacts", ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"fem-{self.tid}-") as tmp:
            run_playbook(self._spec(tags=[Stage.CLEANUP], private_data_dir=Path(tmp)), RunHooks(),
                         lambda: False)

    def _finish(self, outcome: RunResult) -> dict[str, Any]:
        """The terminal event (:meth:`Finisher.finish <fem_ansible.outcome.Finisher.finish>`),
        once the host is left as it must be: a stop under way ended, what a full disk or a
        stopped playbook left behind removed."""
        self._end_stopper()
        failure = outcome.failure
        if failure is not None and failure.code == "disk_full" and outcome.status == "failed":
            self._free_disk()
        if (self.cancel.is_set() and outcome.status == "canceled") or \
                outcome.status == "timeout":
            # The playbook was stopped before its own cleanup could run.
            self._cleanup()
        return self.finisher.finish(outcome, stopped=self._stopper is not None)
