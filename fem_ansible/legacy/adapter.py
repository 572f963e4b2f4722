"""The legacy protocol as an adapter on the listener's public surface (fem_ansible/adapters.py):
the consumer of the legacy queue and the dispatcher of its actions.

Everything broker-side runs on the listener's connection thread: reading a message,
journaling a ``submit_run``, publishing replies, acking.  Its queue is consumed always, so
control actions (``cancel_run``, ``health-check``, files) are answered whatever the worker
slots hold; a ``submit_run`` that finds no free slot is held unacked (not journaled, so a
crash gives it back to the broker) until one frees (docs/legacy.md, docs/decisions.md).
Each action is a module of its own: :mod:`~fem_ansible.legacy.submit`,
:mod:`~fem_ansible.legacy.cancel`, :mod:`~fem_ansible.legacy.files`,
:mod:`~fem_ansible.legacy.health`; a run waits for its slot in
:mod:`~fem_ansible.legacy.held`, and what its reply needs is kept in
:mod:`~fem_ansible.legacy.records`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions

from .. import broker
from ..adapters import ListenerSurface
from ..config import Config
from ..errors import ConfigError, RejectedError
from . import catalogue, intake
from .cancel import cancel_run
from .files import receive_files, send_files
from .health import HEALTH_TOOL, health, health_tool
from .held import HeldRuns
from .message import HEALTH, SUBMIT, LegacyMessage, action_of, parse_message
from .records import Records
from .replies import error_result, reply_messages, stream_reply
from .submit import Runs

log = logging.getLogger(__name__)

# Actions that read, write or stop a run: signed when signatures are on (docs/legacy.md).
SIGNED_ACTIONS = ("send_files", "receive_files", "cancel_run")
# What an action other than a run answers: a result in memory, or its pieces, streamed.
Answer = dict[str, Any] | Callable[[], Iterator[bytes]]


class LegacyAdapter:
    """The legacy queue, served for a listener through its
    :class:`~fem_ansible.adapters.ListenerSurface`.

    Everything broker-side runs on the listener's connection thread: reading a message,
    journaling a ``submit_run``, publishing replies, acking.  The ``submit_run`` task then
    runs in the listener's worker pool like any task (:class:`~fem_ansible.legacy.submit.Runs`).
    Other actions are answered from one helper thread (they read files and ask the engine),
    which hands the reply and the ack back to the connection.
    """

    def __init__(self, listener: ListenerSurface):
        self.listener = listener
        self.config: Config = listener.config
        legacy = self.config.legacy
        if not legacy.sandbox_path or not os.path.isabs(legacy.sandbox_path):
            raise ConfigError("legacy.sandbox_path: an absolute path is required when "
                              "legacy.enabled is true")
        if legacy.data_path is not None and not os.path.isabs(legacy.data_path):
            raise ConfigError("legacy.data_path: must be an absolute path")
        if legacy.chunk_size < 1:
            raise ConfigError("legacy.chunk_size: must be at least 1")
        if legacy.prefetch < 2:
            raise ConfigError("legacy.prefetch: must be at least 2 (a held submit_run and "
                              "a control action)")
        self.node = listener.node
        self.queue = legacy.queue or self.config.node_id
        self.records = Records(self.config.work_dir)
        self.runs = Runs(listener, self.records, self.queue, self._reply, self.flush)
        self.held = HeldRuns(listener.has_free_slot, self._launch_held, legacy.prefetch)
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="fem-legacy")
        self._ch: Any = None
        self._record = self.config.legacy.reply == "record"
        # The actions other than a run, answered on the helper thread.
        self.actions: dict[str, Callable[[LegacyMessage], Answer]] = {
            **{action: lambda msg: health(self.config) for action in HEALTH},
            SUBMIT: lambda msg: health_tool(self.config, msg),
            "send_files": lambda msg: send_files(self.config, msg),
            "receive_files": lambda msg: receive_files(self.config, msg),
            "cancel_run": lambda msg: cancel_run(self.listener, self.records, msg),
        }
        catalogue.check_catalogue(self.config)

    def run_datasets(self, task: Mapping[str, Any]) -> dict[str, str]:
        return self.runs.run_datasets(task)

    def run_secret_env(self, task: Mapping[str, Any]) -> dict[str, str]:
        return self.runs.run_secret_env(task)

    def finished(self, task_id: str, event: dict[str, Any]) -> None:
        self.runs.finished(task_id, event)

    # The connection ----------------------------------------------------------------------

    def attach(self, conn: pika.BlockingConnection) -> None:
        """Check the queue (declare it, as the original client does, only when missing and
        ``broker.declare`` is true), consume it, and send the replies still pending."""
        probe = conn.channel()
        try:
            with broker.expecting_not_found():
                probe.queue_declare(self.queue, passive=True)
            probe.close()
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 404 or not self.config.broker.declare:
                log.error("legacy queue %r cannot be used (%s); the legacy protocol is not "
                          "served on this connection", self.queue, e.reply_text)
                return
            conn.channel().queue_declare(self.queue)
        ch = conn.channel()
        ch.confirm_delivery()
        # Room for the submit_runs held for a slot and the control action answered beside
        # them; only with legacy.prefetch submit_runs held does a control action wait.
        ch.basic_qos(prefetch_count=self.config.legacy.prefetch)
        self._ch = ch
        log.info("serving the legacy protocol on queue %s", self.queue)
        ch.basic_consume(self.queue, self._on_message)
        self.held.attach(conn)
        self.flush()

    def detach(self) -> None:
        self._ch = None
        self.held.detach()

    def slots_changed(self, free: bool) -> None:
        if free:
            self.held.drain()

    def _launch_held(self, ch: Any, method: Any, props: Any, msg: LegacyMessage) -> None:
        """A held ``submit_run`` given a free slot."""
        self._guarded(ch, method, props, msg, lambda: self.runs.submit(ch, method, props, msg))

    def close(self) -> None:
        self.helper.shutdown(wait=False, cancel_futures=True)

    def _send(self, ch: Any, reply_to: str, correlation_id: str | None, result: Any) -> None:
        for packet in reply_messages(result, self.config.legacy.chunk_size):
            self._publish(ch, reply_to, correlation_id, packet)

    def _publish(self, ch: Any, reply_to: str, correlation_id: str | None,
                 packet: dict[str, Any]) -> None:
        if ch.is_open:
            ch.basic_publish("", reply_to, json.dumps(packet).encode(),
                             pika.BasicProperties(correlation_id=correlation_id,
                                                  content_type="application/json"))

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.node.audit.record("received", None, protocol="legacy", bytes=len(body))
        msg = self._guarded(ch, method, props, None, lambda: self._read(body, props),
                            action_of(body))
        if msg is None:
            return
        if msg.action == SUBMIT and msg.tool_id != HEALTH_TOOL:
            # Only a run waits for a slot: held unacked behind the ones held before it.
            self.held.hold(ch, method, props, msg)
            return
        self.helper.submit(self._answer, ch, method.delivery_tag, props, msg)

    def _read(self, body: bytes, props: Any) -> LegacyMessage:
        msg = parse_message(body, self.config.security.max_message_bytes)
        if msg.action in SIGNED_ACTIONS:
            # With signatures on, what reads, writes or stops a run is authenticated
            # as a task is (docs/legacy.md); a run itself only uses the catalogue.
            intake.check_signature(self.node, body, props.headers)
        if msg.action == SUBMIT and msg.json_action not in ("", "None", SUBMIT):
            # The real client picks its json_launcher.json entry by json_action
            # (inferred); this site's catalogue serves submit_run only.
            raise RejectedError(f"json_action {msg.json_action[:64]!r}: only submit_run "
                                "is served", task_id=msg.task_id)
        return msg

    def _guarded(self, ch: Any, method: Any, props: Any, msg: LegacyMessage | None,
                 fn: Callable[[], Any], action: str | None = None) -> Any:
        """``fn()``, or the message refused (answered and acked) when it raises; ``None``
        then."""
        try:
            return fn()
        except RejectedError as e:
            self._refuse(ch, method, props, msg, e, action)
        except (pika.exceptions.AMQPError, ConnectionError):
            raise
        except Exception as e:  # an answer is owed, and the consumer must go on
            log.exception("legacy message failed")
            self._refuse(ch, method, props, msg,
                         RejectedError(f"internal error: {type(e).__name__}",
                                       task_id=msg.task_id if msg else None), action)
        return None

    def _refuse(self, ch: Any, method: Any, props: Any, msg: LegacyMessage | None,
                err: RejectedError, action: str | None = None) -> None:
        action = msg.action if msg else action
        log.warning("legacy %s refused (%s): %s", action or "message", err.code,
                    err.message, extra={"task_id": err.task_id})
        self.node.audit.record("rejected", err.task_id, protocol="legacy", code=err.code,
                               rule=getattr(err, "rule", None), reason=err.message)
        if action == SUBMIT:
            self.node.reject(err)
            self.listener.publish_pending()
        self._reply(ch, props, error_result(msg, self.config.node_id, err, action,
                                              record=self._record))
        ch.basic_ack(method.delivery_tag)

    def _reply(self, ch: Any, props: Any, result: Any) -> None:
        if props.reply_to:
            self._send(ch, props.reply_to, props.correlation_id, result)
        else:
            log.warning("legacy message without reply_to: answer dropped")

    def flush(self) -> None:
        """On the connection thread: send every stored reply not sent yet."""
        ch = self._ch
        if ch is None or not ch.is_open:
            return
        for tid in self.records.task_ids():
            with self.records.lock:
                rec = self.records.load(tid)
                if rec is None or rec["reply"] is None or rec["replied"]:
                    continue
                if rec.get("reply_to"):
                    self._send(ch, rec["reply_to"], rec.get("correlation_id"), rec["reply"])
                rec["replied"] = True
                self.records.save(rec)

    # The other actions (helper thread) ----------------------------------------------------

    def _answer(self, ch: Any, delivery_tag: int, props: Any, msg: LegacyMessage) -> None:
        """On the helper thread: the answer of an action other than a run, published
        packet by packet on the connection thread, then the ack."""
        result: Answer
        try:
            result = self.actions[msg.action](msg)
            self.node.audit.record(msg.action, msg.task_id, protocol="legacy")
        except RejectedError as e:
            self.node.audit.record("rejected", e.task_id or msg.task_id, protocol="legacy",
                                   action=msg.action, code=e.code, reason=e.message)
            result = error_result(msg, self.config.node_id, e, record=self._record)
        except Exception as e:  # an answer is owed whatever broke
            log.exception("legacy %s failed", msg.action)
            result = error_result(msg, self.config.node_id,
                                  RejectedError(f"internal error: {type(e).__name__}"),
                                  record=self._record)
        if isinstance(result, dict):
            packets: Iterator[dict[str, Any]] = iter(
                reply_messages(result, self.config.legacy.chunk_size))
        else:
            packets = stream_reply(result, self.config.legacy.chunk_size)
        try:
            for packet in packets if props.reply_to else ():
                self._on_connection(lambda p=packet: self._publish(
                    ch, props.reply_to, props.correlation_id, p))
        except Exception:  # a file went away mid-answer: the reply stays incomplete
            log.exception("legacy %s: the answer could not be sent whole", msg.action)
        if not props.reply_to:
            log.warning("legacy message without reply_to: answer dropped")
        self._on_connection(lambda: ch.basic_ack(delivery_tag) if ch.is_open else None)

    def _on_connection(self, fn: Callable[[], None], timeout: float = 60) -> None:
        """Run ``fn`` on the connection thread and wait for it: one packet in flight, so a
        streamed answer is never queued whole."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.listener.call_on_connection(run)
        if not done.wait(timeout):
            raise ConnectionError("the broker connection did not take the answer")
