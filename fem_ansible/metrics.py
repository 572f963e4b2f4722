"""Prometheus metrics of ``fem-ansible listen --metrics-port N``.

Everything is derived from what the listener already knows, so the metrics can never tell
another story than the journal: task counters and stage durations from the events the
:class:`~fem_ansible.lifecycle.Node` journals (stage times from the events' ``ts``), upload
bytes from the upload progress, and the running tasks, broker connection and events waiting
for the broker read from the listener at scrape time.  Counters start at zero with the
process, as Prometheus expects (``rate()``/``increase()`` handle restarts).  The PromQL an
operator needs is in docs/operating.md.
"""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from . import __version__
from .config import Config
from .doctor import disk_need
from .lifecycle import NodeObserver
from .listener import FAULT_CAUSES
from .schema import TERMINAL_STATES, event_time
from .stages import STATE_STAGE

if TYPE_CHECKING:
    from .listener import Listener

# Buckets from seconds (a cached image) to a day (a long training run).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class Metrics(NodeObserver):
    """The node's metrics, in a registry of their own (no process-global state).

    :param config: for the ``fem_info`` labels.
    """

    def __init__(self, config: Config):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge("fem_info", "This listener; always 1.", ["version", "node_id", "listener_id"],
                     registry=r)
        info.labels(__version__, config.node_id, config.listener_id).set(1)
        self.received = Counter("fem_tasks_received", "Tasks accepted (RECEIVED).", registry=r)
        self.finished = Counter("fem_tasks_finished",
                                "Tasks that reached a terminal state, by state.", ["state"],
                                registry=r)
        for state in sorted(TERMINAL_STATES):
            self.finished.labels(state)
        self.errors = Counter("fem_task_errors", "FAILED, TIMED_OUT, CANCELLED and REJECTED "
                              "tasks by error code.", ["code"], registry=r)
        self.stage_seconds = Histogram("fem_stage_duration_seconds",
                                       "Time tasks spent in each stage.", ["stage"],
                                       buckets=DURATION_BUCKETS, registry=r)
        self.task_seconds = Histogram("fem_task_duration_seconds",
                                      "Time from RECEIVED to the terminal event.",
                                      buckets=DURATION_BUCKETS, registry=r)
        self.upload_bytes = Counter("fem_upload_bytes", "Archive bytes sent to upload URLs.",
                                    ["kind"], registry=r)
        for kind in ("outputs", "logs"):
            self.upload_bytes.labels(kind)
        self.running = Gauge("fem_tasks_running", "Tasks this listener holds now.", registry=r)
        Gauge("fem_task_slots", "Tasks this listener may hold (execution.max_parallel).",
              registry=r).set(config.execution.max_parallel)
        self.connected = Gauge("fem_broker_connected",
                               "1 while connected to the broker, else 0.", registry=r)
        self.accepting = Gauge("fem_node_accepting",
                               "1 while the node takes tasks (its status's accepting), else 0.",
                               registry=r)
        self.fault = Gauge("fem_node_fault", "1 while this fault of the node stops it from "
                           "taking tasks (journal, disk, intake, engine), else 0.", ["cause"],
                           registry=r)
        self.unpublished = Gauge("fem_events_unpublished",
                                 "Events journaled and not yet confirmed by the broker.",
                                 registry=r)
        # What contrib/prometheus-rules.yml alerts on before tasks fail for it.
        self.disk_free = Gauge("fem_disk_free_bytes",
                               "Free space of the work dir's file system.", registry=r)
        Gauge("fem_disk_need_bytes", "Space max_parallel tasks at the policy's limits may "
              "take in the work dir.", registry=r).set(disk_need(config))
        self._lock = threading.Lock()
        # task id -> (stage or None, when it entered it, when it was received)
        self._open: dict[str, tuple[str | None, float, float | None]] = {}
        # (task id, kind) -> bytes of the current upload try already counted
        self._sent: dict[tuple[str, str], int] = {}

    # NodeObserver ------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        tid, state = event["task_id"], event["state"]
        at = event_time(event)
        with self._lock:
            prev = self._open.get(tid) if tid else None  # (stage, since, received)
            stage = STATE_STAGE.get(state)
            if prev and stage and stage == prev[0]:
                return  # a progress event within the same state
            received = prev[2] if prev else None
            if prev and prev[0]:
                self.stage_seconds.labels(prev[0]).observe(max(0.0, at - prev[1]))
            if state == "RECEIVED":
                self.received.inc()
                received = at
            if state in TERMINAL_STATES:
                self.finished.labels(state).inc()
                if event.get("error"):
                    self.errors.labels(event["error"]["code"]).inc()
                if received is not None:
                    self.task_seconds.observe(max(0.0, at - received))
                self._open.pop(tid, None)
                for key in [k for k in self._sent if k[0] == tid]:
                    del self._sent[key]
            elif tid:
                self._open[tid] = (stage, at, received)

    def on_upload(self, task_id: str, kind: str, sent: int, total: int) -> None:
        with self._lock:
            before = self._sent.get((task_id, kind), 0)
            if sent < before:  # a new try starts from 0: its bytes count again
                before = 0
            self._sent[(task_id, kind)] = sent
        self.upload_bytes.labels(kind).inc(sent - before)

    # The listener's state, read at scrape time -------------------------------------------

    def watch(self, listener: Listener) -> None:
        """Read running tasks, broker connection and waiting events from ``listener``."""
        self.running.set_function(lambda: len(listener.running))
        self.connected.set_function(lambda: 1 if listener.connected else 0)
        self.unpublished.set_function(listener.journal.unpublished_count)
        journal = listener.journal.path
        self.disk_free.set_function(lambda: shutil.disk_usage(journal.parent).free)
        self.accepting.set_function(lambda: 1 if listener.accepting else 0)
        for cause in FAULT_CAUSES:
            self.fault.labels(cause).set_function(
                lambda c=cause: 1 if c in listener.faults() else 0)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``address:port`` from a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)
