"""``fem-ansible listen``: the broker loop around :class:`~fem_ansible.lifecycle.Node`.

One thread owns the pika connection and does only quick things: read and journal a message,
publish journaled events with confirms, ack.  Tasks run in a pool of
``execution.max_parallel`` worker threads; while every slot is taken the task consumer is
cancelled, so waiting tasks stay in the broker for another listener (DESIGN.md §5).  A task
is acked once it is in the journal and its RECEIVED event is confirmed; from then on the
journal owns it, whatever the broker does.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from . import broker, engine
from .adapters import Adapter, AdapterFactory
from .config import Config
from .diskspace import below_floor, free_bytes
from .errors import ConfigError, RejectedError
from .events import heartbeat_routing_key, node_heartbeat, routing_key
from .journal import Journal, JournalUnwritable
from .lifecycle import CancelRequest, Node, NodeObserver
from .logs import reopen_log_files, task_context
from .ssh_masters import KeptMasters

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
# After a write of the intake failed, first look again after this long, then twice as long
# each time it still fails (the journal's probe write, or the next message).
FAULT_RETRY_MIN_S = 1.0
FAULT_RETRY_MAX_S = 30.0
# What may stop the node from taking tasks (docs/operating.md, "When the node is
# unhealthy"): the journal refused a write, the work dir is below its free-space floor,
# taking a task failed otherwise (the audit log refused a write), the local engine does not
# answer.
FAULT_CAUSES = ("journal", "disk", "intake", "engine")


class Listener:
    """The service.  ``run()`` blocks until :meth:`stop` (or a signal) ends it.

    :param adapters: protocol adapters served on the same connection and worker slots
        (fem_ansible/adapters.py), each made from this listener's public surface.
    """

    def __init__(self, config: Config, observer: NodeObserver | None = None,
                 adapters: Sequence[AdapterFactory] = ()):
        self.config = config
        self.journal = _open_journal(config.work_dir / "journal.sqlite")
        keep_ssh = config.execution.ssh.keep_connections
        self.node = Node(config, self.journal, notify=self._notify, observer=observer,
                         run_datasets=self._run_datasets, run_secret_env=self._run_secret_env,
                         ssh_masters=KeptMasters.of(config) if keep_ssh else None)
        self.pool = ThreadPoolExecutor(config.execution.max_parallel,
                                       thread_name_prefix="fem-task")
        self.running: dict[str, tuple[Future[Any], CancelRequest]] = {}
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._tasks_ch: Any = None
        self._events_ch: Any = None
        self._consumer_tag: str | None = None
        self._names: broker.Names | None = None
        self._stopping = threading.Event()
        self._stop_now = threading.Event()
        self._connected = threading.Event()
        self._reload_lock = threading.Lock()
        self._told_unroutable = False
        # Why the node takes no task now, by cause (FAULT_CAUSES); empty when it is healthy.
        self._faults: dict[str, str] = {}
        self._fault_lock = threading.Lock()
        self._retry_at = 0.0
        self._retry_delay = FAULT_RETRY_MIN_S
        self._accepting_sent: bool | None = None
        self.journal.on_fault = lambda reason: self.set_fault("journal", reason)
        self.adapters: list[Adapter] = [make(self) for make in adapters]

    # -- public --------------------------------------------------------------------------

    def run(self) -> None:
        self._install_signal_handlers()
        # The inventory is read once, here, not in the connection thread at the first task:
        # a broken one stops the service at start as a config error (docs/hosts.md).
        _ = self.node.targets.inventory
        if engine.watches_docker(self.config, self.node.targets):
            threading.Thread(target=self._watch_engine, name="fem-engine", daemon=True).start()
        threading.Thread(target=self.node.prestart, name="fem-resident", daemon=True).start()
        self._recover()
        delay = RECONNECT_MIN_S
        while not self._stop_now.is_set():
            if self._stopping.is_set() and not self.running:
                break
            try:
                self._serve()
                delay = RECONNECT_MIN_S
            except JournalUnwritable as e:  # not the broker's doing: the node degrades
                log.warning("%s; reconnecting in %.1fs", e, delay)
            except (pika.exceptions.AMQPError, OSError) as e:
                if self._connected.is_set():
                    log.warning("broker connection lost (%s); reconnecting in %.1fs",
                                broker.reason(e), delay)
                elif self._connection is not None:
                    log.warning("broker: setting up node %s's exchanges and queues failed "
                                "(%s); trying again in %.1fs", self.config.node_id,
                                broker.reason(e), delay)
                else:
                    log.warning("broker: %s — %s; trying again in %.1fs",
                                *broker.connect_failure(self.config, e), delay)
            except sqlite3.Error as e:  # reading the journal failed: no reason to die
                log.error("the journal cannot be read (%s); reconnecting in %.1fs", e, delay)
            finally:
                self._connected.clear()
                self._close_connection()
            if self._stop_now.wait(delay * random.uniform(0.5, 1.0)):
                break
            delay = min(delay * 2, RECONNECT_MAX_S)
        self._shutdown()

    @property
    def connected(self) -> bool:
        """Connected to the broker, topology declared (for the metrics)."""
        return self._connected.is_set()

    def stop(self, now: bool = False) -> None:
        """Stop taking tasks; with ``now``, also stop waiting for running ones."""
        self._stopping.set()
        if now:
            self._stop_now.set()

    # -- the connection thread -----------------------------------------------------------

    def _serve(self) -> None:
        conn = broker.connect(self.config)
        self._connection = conn
        self._tasks_ch = conn.channel()
        self._names = broker.declare_topology(self._tasks_ch, self.config)
        self._events_ch = conn.channel()
        self._events_ch.confirm_delivery()
        self._tasks_ch.basic_qos(prefetch_count=1)
        control_ch = conn.channel()
        control_ch.basic_consume(self._names.control, self._on_control)
        self._consumer_tag = None
        for adapter in self.adapters:
            adapter.attach(conn)
        self._connected.set()
        log.info("connected to the broker; node %s, listener %s, %d slot(s)",
                 self.config.node_id, self.config.listener_id, self.config.execution.max_parallel)
        self.publish_pending()
        self._update_consumer()
        next_beat = 0.0
        grace_end: float | None = None
        while not self._stop_now.is_set():
            conn.process_data_events(time_limit=1)
            now = time.monotonic()
            self._check_health(now)
            if now >= next_beat or self._accepting_sent != self.accepting:
                # Every heartbeat_s, and at once when accepting changes (DESIGN.md §2).
                self._heartbeat()
                next_beat = now + self.config.broker.heartbeat_s
            if self._stopping.is_set():
                self._update_consumer()
                if not self.running:
                    return
                grace_end = grace_end or now + self.config.execution.shutdown_grace_s
                if now >= grace_end:
                    log.warning("shutdown grace over; %d task(s) left to recovery",
                                len(self.running))
                    self._stop_now.set()

    def _close_connection(self) -> None:
        conn, self._connection = self._connection, None
        self._tasks_ch = self._events_ch = None
        self._consumer_tag = None
        for adapter in self.adapters:
            adapter.detach()
        if conn is not None and conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                conn.close()

    def has_free_slot(self) -> bool:
        """Whether a task launched now would run at once: :attr:`accepting`, and fewer
        than ``execution.max_parallel`` tasks held."""
        return self.accepting and len(self.running) < self.config.execution.max_parallel

    # -- the node's health ---------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Takes tasks: not stopping, and no fault of the node (:meth:`set_fault`)."""
        return not self._stopping.is_set() and not self._faults

    @property
    def reason(self) -> str | None:
        """Why the node does not accept tasks; None while it does."""
        if self._stopping.is_set():
            return "the listener is stopping"
        with self._fault_lock:
            return "; ".join(self._faults.values()) or None

    def faults(self) -> dict[str, str]:
        """The node's faults now, by cause (the metrics, the tests)."""
        with self._fault_lock:
            return dict(self._faults)

    def set_fault(self, cause: str, reason: str | None) -> None:
        """Record (``reason``) or clear (None) a fault of the node; from any thread.  While
        any is recorded the node consumes no task, and its status says why."""
        with self._fault_lock:
            if self._faults.get(cause) == reason:
                return
            if reason is None:
                del self._faults[cause]
            else:
                self._faults[cause] = reason
            healthy = not self._faults
        if reason is None:
            log.info("the node's %s fault is over%s", cause,
                     "; taking tasks again" if healthy else "")
        else:
            log.error("not taking tasks: %s", reason)
        self.call_on_connection(self._status_changed)

    def _status_changed(self) -> None:
        """On the connection thread: consume or not, and say so at once."""
        self._update_consumer()
        if self._accepting_sent != self.accepting:
            self._heartbeat()
        if self.journal.fault is None:
            self.publish_pending()  # events whose publication the journal could not mark

    def _check_health(self, now: float) -> None:
        """About once a second: the work dir's free space against its floor, and whether
        a journal or intake that failed works again (a write, with backoff)."""
        self.set_fault("disk", below_floor(self.config.work_dir,
                                           self.config.execution.min_free_bytes))
        if not ({"journal", "intake"} & self.faults().keys()) or now < self._retry_at:
            return
        self.set_fault("intake", None)  # the next message tries again
        with contextlib.suppress(JournalUnwritable):
            self.journal.probe()
        if self.journal.fault is None:
            self._retry_delay = FAULT_RETRY_MIN_S
        else:
            self._retry_later(now)

    def _watch_engine(self) -> None:
        """In a thread of its own (a look may take seconds): the local engine, every
        :data:`~fem_ansible.engine.CHECK_S`."""
        while True:
            self.set_fault("engine", engine.docker_problem())
            if self._stop_now.wait(engine.CHECK_S) or self._stopping.is_set():
                return

    def _retry_later(self, now: float) -> None:
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, FAULT_RETRY_MAX_S)

    def running_count(self) -> int:
        return len(self.running)

    def _update_consumer(self) -> None:
        """Consume tasks (and adapters' messages) only while a slot is free and the
        node accepts tasks."""
        want = self.has_free_slot()
        for adapter in self.adapters:
            adapter.slots_changed(want)
        want = self.has_free_slot()  # an adapter may have taken the free slot
        ch = self._tasks_ch
        if ch is None or not ch.is_open or self._names is None:
            return
        if want and self._consumer_tag is None:
            self._consumer_tag = ch.basic_consume(self._names.tasks, self._on_task)
        elif not want and self._consumer_tag is not None:
            ch.basic_cancel(self._consumer_tag)
            self._consumer_tag = None

    def _on_task(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            self._take_task(ch, method, props, body)
        except OSError as e:
            # The journal (JournalUnwritable) or the audit log refused a write: nothing is
            # acked that is not journaled; the message goes back to the broker, and the
            # node takes no task until a write succeeds again.
            if not isinstance(e, JournalUnwritable):
                self.set_fault("intake", f"taking a task failed ({e})")
            self._retry_later(time.monotonic())
            ch.basic_nack(method.delivery_tag, requeue=True)
            self._update_consumer()

    def _take_task(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if not self.has_free_slot():
            # An adapter's consumer took the last slot (or the listener began to stop) after
            # this message was delivered: back to the queue, for this listener once a slot
            # frees or for another one now (DESIGN.md §5: at most max_parallel held).
            ch.basic_nack(method.delivery_tag, requeue=True)
            self._update_consumer()
            return
        try:
            task = self.node.read(body, props.headers)
        except RejectedError as e:
            log.warning("rejected a message (%s): %s", e.code, e.message,
                        extra={"task_id": e.task_id})
            self._refuse_task(ch, method, props, body, e)
            return
        except OSError:
            raise  # the audit log could not be written: a fault of the node, not the message
        except Exception as e:  # a bug: the message still ends REJECTED, the consumer goes on
            log.exception("reading a message failed; rejected as invalid_message")
            err = _internal(e)
            self.node.audit_rejected(err)
            self._refuse_task(ch, method, props, body, err)
            return
        _event, existing = self.node.accept(task)
        tid = task.task_id
        if existing is not None and (existing.terminal or tid in self.running):
            self.publish_pending()
            ch.basic_ack(method.delivery_tag)
            return
        # New, or journaled by an earlier delivery that was never acked: run it.
        self.launch(tid)
        ch.basic_ack(method.delivery_tag)

    def _refuse_task(self, ch: Any, method: Any, props: Any, body: bytes,
                     err: RejectedError) -> None:
        """A refused task message: journaled REJECTED, dead-lettered with its code, acked."""
        self.node.reject(err)
        self.publish_pending()
        self._dead_letter(body, props, err.code)
        ch.basic_ack(method.delivery_tag)

    def launch(self, task_id: str) -> None:
        """Run a task just journaled (on the connection thread)."""
        self.publish_pending()
        self._start(task_id)
        self._update_consumer()

    def _on_control(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        """A cancel; a refused control message is logged and acked (it has no task whose
        REJECTED event it could be, nor a place among the dead-lettered tasks)."""
        try:
            msg = self.node.intake.read_control(body, props.headers)
        except RejectedError as e:
            log.warning("ignored a control message (%s): %s", e.code, e.message)
            ch.basic_ack(method.delivery_tag)
            return
        except Exception:  # a bug: the message is refused, the consumer goes on
            log.exception("reading a control message failed; ignored")
            ch.basic_ack(method.delivery_tag)
            return
        try:
            self.cancel(msg["task_id"], by=msg.get("by", "orchestrator"))
        except JournalUnwritable as e:
            # A task running here is stopped all the same; one yet to come would not know
            # of it (given back, the message would come straight back while the journal
            # fails, spinning this thread).
            log.error("cancel of %s not recorded for a task yet to arrive (%s); a task "
                      "running here is stopped", msg["task_id"], e,
                      extra={"task_id": msg["task_id"]})
        ch.basic_ack(method.delivery_tag)

    def cancel(self, tid: str, by: str = "orchestrator") -> bool:
        """Stop the task when it runs here and record the cancel (a task that comes later
        never starts); returns whether it ran here.  ``by``: who asked (the CANCELLED event
        says).

        :raises JournalUnwritable: the cancel could not be recorded (the task running here
            is stopped all the same)."""
        self.node.audit.record("cancel_requested", tid, by=by)
        with self._lock:
            entry = self.running.get(tid)
        if entry is not None:
            log.info("cancelling task %s", tid, extra={"task_id": tid})
            entry[1].request(by)
        self.journal.record_cancel(tid)
        return entry is not None

    def _dead_letter(self, body: bytes, props: Any, reason: str) -> None:
        self._events_ch.basic_publish(
            broker.DLX_EXCHANGE, self.config.node_id, body,
            pika.BasicProperties(content_type=props.content_type, delivery_mode=2,
                                 headers=broker.dead_letter_headers(props.headers, reason)),
        )

    def publish_pending(self) -> None:
        """Publish journaled events in order, each marked once the broker confirmed it;
        while the journal cannot mark them, they wait (published again later, same ``seq``
        and content, as after a crash)."""
        with contextlib.suppress(JournalUnwritable):
            self._publish_pending()

    def _publish_pending(self) -> None:
        ch = self._events_ch
        while ch is not None and ch.is_open:
            batch = self.journal.unpublished()
            if not batch:
                return
            for event_id, event in batch:
                try:
                    broker.publish_json(ch, broker.EVENTS_EXCHANGE, routing_key(event), event)
                except pika.exceptions.UnroutableError:
                    self._unroutable(event)
                self.journal.mark_published(event_id)

    def _unroutable(self, event: dict[str, Any]) -> None:
        """One line per event no queue received (pika's own is silenced: logs.py); none per
        event where the legacy protocol is served, whose orchestrator reads its replies,
        not events: one line the first time, then nothing (issue 31)."""
        if not self.config.legacy.enabled:
            log.warning("event %s had no queue bound to receive it", routing_key(event),
                        extra={"task_id": event["task_id"]})
        elif not self._told_unroutable:
            self._told_unroutable = True
            log.info("event %s had no queue bound to receive it: as expected when only the "
                     "legacy protocol's orchestrator listens; not logged again for each event",
                     routing_key(event), extra={"task_id": event["task_id"]})

    def _heartbeat(self) -> None:
        accepting = self.accepting
        beat = node_heartbeat(self.config.node_id, self.config.listener_id,
                              self.config.execution.max_parallel, len(self.running),
                              accepting, self.reason)
        self._accepting_sent = accepting
        broker.publish_json(self._events_ch, broker.EVENTS_EXCHANGE,
                            heartbeat_routing_key(self.config.node_id), beat, mandatory=False)

    # -- workers -------------------------------------------------------------------------

    def _start(self, task_id: str) -> None:
        cancel = CancelRequest()
        with self._lock:
            self.running[task_id] = (self.pool.submit(self._work, task_id, cancel), cancel)

    def _work(self, task_id: str, cancel: threading.Event) -> None:
        try:
            # A journal write refused is tried again until it succeeds (or the listener
            # stops): the task's events wait for its journal, never lost.
            with task_context(task_id), self.journal.patient(self.node.abandon):
                event = self.node.execute(task_id, cancel)
            for adapter in self.adapters:
                adapter.finished(task_id, event)
        except Exception:
            log.exception("task %s: unexpected error; left to recovery", task_id,
                          extra={"task_id": task_id})
        finally:
            with self._lock:
                self.running.pop(task_id, None)
            self.call_on_connection(self._update_consumer)

    def _run_datasets(self, task: Mapping[str, Any]) -> dict[str, str]:
        """Node's hook: the datasets the adapters resolve for one of their tasks."""
        out: dict[str, str] = {}
        for adapter in self.adapters:
            out.update(adapter.run_datasets(task))
        return out

    def _run_secret_env(self, task: Mapping[str, Any]) -> dict[str, str]:
        """Node's hook: the secret container env the adapters hold for one of their tasks."""
        out: dict[str, str] = {}
        for adapter in self.adapters:
            out.update(adapter.run_secret_env(task))
        return out

    def _notify(self) -> None:
        self.call_on_connection(self.publish_pending)

    def call_on_connection(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the connection thread soon; while disconnected it is dropped (the
        next connection's start does what is pending)."""
        conn = self._connection
        if conn is None or not self._connected.is_set():
            return  # events wait in the journal; the next connection publishes them
        with contextlib.suppress(pika.exceptions.ConnectionWrongStateError, AttributeError):
            conn.add_callback_threadsafe(fn)

    # -- start and end -------------------------------------------------------------------

    def _recover(self) -> None:
        """Carry on every task an earlier listener process left unfinished."""
        for rec in self.journal.unfinished():
            log.info("recovering task %s (%s)", rec.task_id, rec.state,
                     extra={"task_id": rec.task_id})
            self._start(rec.task_id)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            if self._stopping.is_set():
                log.warning("second signal: stopping now")
                self.stop(now=True)
            else:
                log.info("signal %d: no new tasks; waiting up to %ds for %d running",
                         signum, self.config.execution.shutdown_grace_s, len(self.running))
                self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # SIGHUP: the reload runs in a thread of its own, not in the handler, which interrupts
        # the connection thread anywhere (ansible-inventory may take seconds).
        signal.signal(signal.SIGHUP, lambda _signum, _frame: threading.Thread(
            target=self.reload, name="fem-reload", daemon=True).start())

    def reload(self) -> None:
        """SIGHUP (docs/operating.md): reopen the log and audit files (logrotate moved them),
        replace the resident Ansibles (an Ansible or plugin upgraded in place) and read the
        inventory again (a host added); running tasks are not disturbed.  Site
        roles need nothing here: intake looks them up on the roles path for every task."""
        with self._reload_lock:
            reopen_log_files()
            self.node.audit.reopen()
            if self.node.resident is not None:
                # Runs going on finish on the servers they started on.
                self.node.resident.replace()
            if self.node.ssh_masters is not None:
                # The inventory may have changed a host's connection; running tasks keep
                # the masters they were lent.
                self.node.ssh_masters.retire()
            try:
                hosts = len(self.node.targets.reload_inventory().hostvars)
            except ConfigError as e:
                log.error("SIGHUP: log files reopened; the inventory was not re-read, the one "
                          "read before stays in use: %s", e)
                return
            log.info("SIGHUP: log files reopened, inventory re-read (%d host(s))", hosts)

    def _shutdown(self) -> None:
        self.node.abandon.set()
        for adapter in self.adapters:
            adapter.close()
        self.pool.shutdown(wait=not self._stop_now.is_set(), cancel_futures=True)
        if self.node.resident is not None:
            self.node.resident.close()
        if self.node.ssh_masters is not None:
            self.node.ssh_masters.close()
        self.journal.close()


# Below this much free space, a journal that cannot be opened is waited for (the file system
# is full) rather than reported at once.
FULL_BYTES = 1024**2


def _open_journal(path: Path) -> Journal:
    """The journal.  On a full file system SQLite cannot even open it (its WAL index takes a
    page): it is tried again with backoff instead of ending the process, which a service
    manager would restart into the same state (issue 28); any other failure is reported."""
    delay = FAULT_RETRY_MIN_S
    while True:
        try:
            return Journal(path)
        except OSError as e:
            try:
                full = free_bytes(path.parent) < FULL_BYTES
            except OSError:
                full = False
            if not full:
                raise
            log.error("the journal %s cannot be opened on a full file system (%s); trying "
                      "again in %.0fs", path, e.strerror, delay)
        time.sleep(delay)
        delay = min(delay * 2, FAULT_RETRY_MAX_S)


def _internal(exc: Exception) -> RejectedError:
    """The rejection of a message whose reading failed with an unexpected error: only the
    error's type is said (its text may hold parts of the message)."""
    return RejectedError(f"internal error reading the message ({type(exc).__name__})")
