"""The legacy protocol as an adapter on the listener's public surface (fem_ansible/adapters.py).

Everything broker-side runs on the listener's connection thread: reading a message,
journaling a ``submit_run``, publishing replies, acking.  Its queue is consumed always, so
control actions (``cancel_run``, ``health-check``, files) are answered whatever the worker
slots hold; a ``submit_run`` that finds no free slot is held unacked (not journaled, so a
crash gives it back to the broker) until one frees (docs/legacy.md, docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from .. import broker
from ..adapters import ListenerSurface
from ..config import Config
from ..errors import ConfigError, PolicyViolation, RejectedError
from ..intake import Task
from . import catalogue, intake, preflight, sandbox
from .catalogue import Launch
from .health import HEALTH_TOOL, health
from .message import HEALTH, SUBMIT, TASK_PREFIX, LegacyMessage, action_of, parse_message, run_ids
from .replies import (
    STATUS,
    error_result,
    event_legacy_time,
    legacy_time,
    reply_messages,
    stream_reply,
)
from .taskinfo import DATA_DATASET, INPUT_DATASET, to_task

log = logging.getLogger(__name__)

# Actions that read, write or stop a run: signed when signatures are on (docs/legacy.md).
SIGNED_ACTIONS = ("send_files", "receive_files", "cancel_run")
# The executors whose role passes fem_secrets.env to the container (docs/roles.md).
SECRET_ENV_EXECUTORS = ("docker", "podman")
# A held submit_run is given back to the queue (and so redelivered) this often: RabbitMQ
# closes a channel holding an unacked delivery past its consumer_timeout (30 min default).
HELD_REFRESH_S = 600.0


class LegacyAdapter:
    """The legacy queue, served for a listener through its
    :class:`~fem_ansible.adapters.ListenerSurface`.

    Everything broker-side runs on the listener's connection thread: reading a message,
    journaling a ``submit_run``, publishing replies, acking.  The ``submit_run`` task then
    runs in the listener's worker pool like any task; when it ends, :meth:`finished` (on
    the worker) unpacks its outputs into the sandbox and stores the reply, which the
    connection thread sends.  Other actions are answered from one helper thread (they read
    files and ask the engine), which hands the reply and the ack back to the connection.
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
        self.journal = listener.journal
        self.queue = legacy.queue or self.config.node_id
        self.sandbox_root = Path(legacy.sandbox_path)
        self.records_dir = self.config.work_dir / "legacy"
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="fem-legacy")
        self._lock = threading.Lock()
        self._ch: Any = None
        self._conn: pika.BlockingConnection | None = None
        # submit_runs delivered while every slot was busy, oldest first, unacked.
        self._held: deque[tuple[Any, Any, Any, LegacyMessage]] = deque()
        self._draining = False
        self._secret_env: dict[str, dict[str, str]] = {}
        self._record = self.config.legacy.reply == "record"
        catalogue.check_catalogue(self.config)

    # Records: what the reply needs, beside the journal (never the token) ------------------

    def _record_path(self, task_id: str) -> Path:
        return self.records_dir / f"{task_id}.json"

    def load(self, task_id: str) -> dict[str, Any] | None:
        if not task_id.startswith(TASK_PREFIX):
            return None
        try:
            return json.loads(self._record_path(task_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _save(self, record: dict[str, Any]) -> None:
        path = self._record_path(record["task_id"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def sandbox(self, user_id: str, execution_id: str) -> Path:
        return self.sandbox_root / user_id / execution_id

    def datasets_for(self, user_id: str, execution_id: str) -> dict[str, str]:
        out = {INPUT_DATASET: str(self.sandbox(user_id, execution_id))}
        if self.config.legacy.data_path:
            out[DATA_DATASET] = self.config.legacy.data_path
        return out

    def run_datasets(self, task: Mapping[str, Any]) -> dict[str, str]:
        """A legacy run's datasets, from its record (so recovery after a restart resolves
        them the same way)."""
        rec = self.load(task["task_id"])
        if rec is None:
            return {}
        return rec.get("datasets") or self.datasets_for(rec["user_id"], rec["execution_id"])

    def run_secret_env(self, task: Mapping[str, Any]) -> dict[str, str]:
        """The token of a run, as its container's secret env; held in memory only, so a
        run carried on by recovery after a restart has none (docs/legacy.md)."""
        return dict(self._secret_env.get(task["task_id"], {}))

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
        self._ch, self._conn = ch, conn
        self._held.clear()
        log.info("serving the legacy protocol on queue %s", self.queue)
        ch.basic_consume(self.queue, self._on_message)
        conn.call_later(HELD_REFRESH_S, self._refresh_held)
        self.flush()

    def detach(self) -> None:
        # The broker gives the held submit_runs back to the queue with the connection.
        self._ch = self._conn = None
        self._held.clear()

    def slots_changed(self, free: bool) -> None:
        if free:
            self._drain()

    def _drain(self) -> None:
        """Launch held ``submit_run``s, oldest first, while a slot is free."""
        if self._draining:
            return  # listener.launch calls back here: the loop below goes on
        self._draining = True
        try:
            while self._held and self.listener.has_free_slot():
                ch, method, props, msg = self._held.popleft()
                if ch.is_open:
                    self._guarded(ch, method, props, msg, lambda c=ch, m=method, p=props,
                                  g=msg: self._submit(c, m, p, g))
        finally:
            self._draining = False

    def _refresh_held(self) -> None:
        """Give every held ``submit_run`` back to the queue, in order, before RabbitMQ's
        consumer timeout closes the channel; it is redelivered at once and held again."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return
        held, self._held = self._held, deque()
        for ch, method, _props, _msg in held:
            if ch.is_open:
                ch.basic_nack(method.delivery_tag, requeue=True)
        conn.call_later(HELD_REFRESH_S, self._refresh_held)

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
            self._held.append((ch, method, props, msg))
            self._drain()
            if self._held and len(self._held) >= self.config.legacy.prefetch:
                log.warning("%d submit_run(s) wait for a slot: legacy.prefetch is reached, "
                            "control actions wait behind them", len(self._held))
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

    # submit_run --------------------------------------------------------------------------

    def read_submit(self, msg: LegacyMessage) -> tuple[Launch, Task]:
        """The launch of a ``submit_run`` through the site's catalogue, and its task as the
        node's intake accepted it (validated, normalised, policy-checked)."""
        eid, user = run_ids(msg)
        assert user is not None
        try:
            tool = catalogue.select(self.config, msg.tool_id)
        except RejectedError as e:
            e.task_id = TASK_PREFIX + eid
            raise
        if tool.from_task_info:
            task = to_task(msg, self.queue, self.config.legacy.site_vars)
            if any(d["name"] == DATA_DATASET for d in task["datasets"]) and \
                    not self.config.legacy.data_path:
                raise PolicyViolation("legacy.data_path", "$DATA_PATH is not set on this site",
                                      task_id=task["task_id"])
            launch = Launch(task, self.datasets_for(user, eid), "", {})
        else:
            launch = catalogue.to_launch(msg, tool, self.config, self.queue,
                                         str(self.sandbox(user, eid)))
            launch = replace(launch, datasets={
                INPUT_DATASET: str(self.sandbox(user, eid)), **launch.datasets})
        used = {d["name"] for d in launch.task.get("datasets") or []}
        preflight.check_datasets(TASK_PREFIX + eid, {
            name: path for name, path in launch.datasets.items() if name in used})
        task = intake.read_task(self.node, launch.task, launch.datasets)
        if launch.secret_env and task.executor not in SECRET_ENV_EXECUTORS:
            raise PolicyViolation("legacy.tools", f"executor {task.executor!r} cannot pass "
                                  "the token as a secret env var", task_id=task.task_id)
        return launch, task

    def _submit(self, ch: Any, method: Any, props: Any, msg: LegacyMessage) -> None:
        """A ``submit_run`` given a free slot: read, journaled, launched, then acked."""
        launch, accepted = self.read_submit(msg)
        task, tid = accepted.to_dict(), accepted.task_id
        eid, user = run_ids(msg)
        self.node.audit.record("accepted", tid, protocol="legacy", tool_id=msg.tool_id,
                               image=task["image"]["ref"], command=task["command"],
                               source=task["source"]["repo"] if task["source"] else None,
                               resources=task["resources"],
                               datasets=[d["name"] for d in task["datasets"]])
        with self._lock:
            rec = self.load(tid)
            if rec is None:
                self.sandbox(user, eid).mkdir(parents=True, exist_ok=True, mode=0o755)
                info = msg.task_info or {}
                rec = {"task_id": tid, "execution_id": eid, "user_id": user,
                       "tool_id": msg.tool_id, "task": info.get("_id"),
                       "datasets": launch.datasets, "outputs_into": launch.outputs_into,
                       "starting_time": legacy_time(), "reply": None, "replied": False}
            rec.update(reply_to=props.reply_to, correlation_id=props.correlation_id)
            if rec["reply"] is not None:
                rec["replied"] = False  # asked again: answered again
            self._save(rec)
        _event, existing = self.node.accept(accepted)
        if existing is not None:
            self.listener.publish_pending()
            if existing.terminal:
                if rec["reply"] is None:
                    err = RejectedError(f"task {tid} already ran here", task_id=tid)
                    self._reply(ch, props, error_result(msg, self.config.node_id, err,
                                                        record=self._record))
                self.flush()
            ch.basic_ack(method.delivery_tag)
            return
        if launch.secret_env:
            self._secret_env[tid] = launch.secret_env
        self.listener.launch(tid)
        ch.basic_ack(method.delivery_tag)

    def finished(self, task_id: str, event: dict[str, Any]) -> None:
        """On the worker, once a task ended: a legacy run's outputs go into its sandbox and
        its process-info reply is stored, then sent from the connection thread."""
        with self._lock:
            rec = self.load(task_id)
        if rec is None or not event:
            return
        self._secret_env.pop(task_id, None)
        jrec = self.journal.get(task_id)
        result_paths = jrec.result if jrec else {}
        root = self.sandbox(rec["user_id"], rec["execution_id"])
        outputs = (result_paths.get("outputs_archive") or {}).get("path")
        into = rec.get("outputs_into", "")
        if outputs and Path(outputs).is_file() and into is not None:
            try:
                sandbox.extract_outputs(Path(outputs), root / into if into else root)
            except (OSError, tarfile.TarError) as e:
                log.error("%s: unpacking the outputs into the sandbox failed: %s", task_id, e,
                          extra={"task_id": task_id})
        logs = (result_paths.get("logs_archive") or {}).get("path")
        info = {
            "execution_id": rec["execution_id"], "action": SUBMIT, "tool_id": rec["tool_id"],
            "task_id": rec["task"], "user_id": rec["user_id"], "node": self.config.node_id,
            "result": self._result(event, Path(logs) if logs else None),
            "status": STATUS.get(event["state"], "error"),
            "return_code": event.get("exit_code"),
            "starting_time": rec["starting_time"], "finish_time": event_legacy_time(event),
        }
        reply = info if self._record else info["result"]
        with self._lock:
            rec = self.load(task_id) or rec
            rec.update(reply=reply, replied=False)
            self._save(rec)
        self.prune()
        self.listener.call_on_connection(self.flush)

    def _result(self, event: dict[str, Any], logs: Path | None) -> Any:
        """The tool's stdout as JSON (the original's contract), else its text; an error of
        the pipeline when the tool did not run to an exit code."""
        if event.get("exit_code") is None and event.get("error"):
            return {"error": event["error"]}
        limit = self.config.policy.limits.log_bytes + 1024
        out = sandbox.read_member(logs, "stdout.log", limit) if logs else None
        text = (out or b"").decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            err = sandbox.read_member(logs, "stderr.log", limit) if logs else None
            return {"stdout": text, "stderr": (err or b"").decode("utf-8", errors="replace")}

    def flush(self) -> None:
        """On the connection thread: send every stored reply not sent yet."""
        ch = self._ch
        if ch is None or not ch.is_open:
            return
        for path in sorted(self.records_dir.glob(f"{TASK_PREFIX}*.json")):
            with self._lock:
                rec = self.load(path.stem)
                if rec is None or rec["reply"] is None or rec["replied"]:
                    continue
                if rec.get("reply_to"):
                    self._send(ch, rec["reply_to"], rec.get("correlation_id"), rec["reply"])
                rec["replied"] = True
                self._save(rec)

    def prune(self) -> None:
        """Sandboxes are kept as long as their run dir: ``execution.keep_runs``."""
        for tid in self.journal.finished_beyond(self.config.execution.keep_runs):
            with self._lock:
                rec = self.load(tid)
                if rec is None:
                    continue
                root = self.sandbox(rec["user_id"], rec["execution_id"])
                try:
                    sandbox.tree.remove(root)
                except OSError as exc:
                    log.warning("legacy sandbox %s not removed: %s", root, exc)
                with contextlib.suppress(OSError):
                    root.parent.rmdir()  # only when empty
                self._record_path(tid).unlink(missing_ok=True)

    # The other actions (helper thread) ----------------------------------------------------

    def _answer(self, ch: Any, delivery_tag: int, props: Any, msg: LegacyMessage) -> None:
        """On the helper thread: the answer of an action other than a run, published
        packet by packet on the connection thread, then the ack."""
        result: dict[str, Any] | Callable[[], Iterator[bytes]]
        try:
            if msg.action in HEALTH:
                result = health(self.config)
            elif msg.action == SUBMIT:
                result = self._health_tool(msg)
            elif msg.action == "send_files":
                result = self.send_files(msg)
            elif msg.action == "receive_files":
                result = self.receive_files(msg)
            else:
                result = self.cancel_run(msg)
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

    def _health_tool(self, msg: LegacyMessage) -> dict[str, Any]:
        """``submit_run`` of the tool ``health-check``: the health result itself, or (with
        ``legacy.reply: record``) the process-info record around it, as the orchestrator's
        Health Check records show [NB]."""
        started = legacy_time()
        result = health(self.config)
        if not self._record:
            return result
        return {"execution_id": msg.execution_id, "action": SUBMIT, "tool_id": HEALTH_TOOL,
                "task_id": HEALTH_TOOL, "user_id": msg.user_id, "node": self.config.node_id,
                "result": result, "status": "success", "return_code": 0,
                "starting_time": started, "finish_time": legacy_time()}

    def _base(self, msg: LegacyMessage, **fields: Any) -> dict[str, Any]:
        return {"action": msg.action, "node": self.config.node_id, "status": "success",
                **fields}

    def send_files(self, msg: LegacyMessage) -> Callable[[], Iterator[bytes]]:
        """The run's sandbox files (all, or the relative paths in
        ``parametric_args.files``) as the pieces of ``{action, node, status, execution_id,
        user_id, files: [{path, size, data (base64), sha256}]}``: streamed, never whole in
        memory, at most ``legacy.max_transfer_bytes`` of files."""
        eid, user = run_ids(msg)
        assert user is not None
        root = self.sandbox(user, eid)
        if not root.is_dir():
            raise RejectedError(f"no sandbox of execution {eid} for user {user} here",
                                task_id=TASK_PREFIX + eid)
        wanted = msg.parametric_args.get("files")
        if wanted is None:
            names = sandbox.list_files(root)
        elif isinstance(wanted, list):
            names = [sandbox.safe_relative(p, "parametric_args/files") for p in wanted]
        else:
            raise RejectedError("parametric_args/files: expected a list of paths")
        total = 0
        for name in names:
            fd, size = sandbox.open_file(root, name)
            os.close(fd)
            total += size
        limit = self.config.legacy.max_transfer_bytes
        if total > limit:
            raise RejectedError(f"send_files: {total} bytes of files, the limit is {limit} "
                                "(legacy.max_transfer_bytes); ask for fewer files",
                                task_id=TASK_PREFIX + eid)
        head = self._base(msg, execution_id=eid, user_id=user)
        return lambda: sandbox.files_json(head, root, names)

    def receive_files(self, msg: LegacyMessage) -> dict[str, Any]:
        """Files pushed into the run's sandbox (``parametric_args.files``: a list of
        ``{path, data (base64), sha256?}``), which the task sees read-only at
        ``/fem/received``; decoded and written a block at a time."""
        eid, user = run_ids(msg)
        assert user is not None
        files = msg.parametric_args.get("files")
        if not isinstance(files, list) or not files:
            raise RejectedError("parametric_args/files: a non-empty list is required")
        items = []
        for i, item in enumerate(files):
            where = f"parametric_args/files/{i}"
            if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                raise RejectedError(f"{where}: {{path, data}} is required")
            items.append((sandbox.safe_relative(item.get("path"), f"{where}/path"), item))
        root = self.sandbox(user, eid)
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        written, left = [], self.config.legacy.max_transfer_bytes
        for rel, item in items:
            size, digest = sandbox.write_b64_under(root, rel, item["data"], left)
            if item.get("sha256") not in (None, digest):
                (root / rel).unlink(missing_ok=True)
                raise RejectedError(f"files: {rel!r}: sha256 does not match the data")
            left -= size
            written.append({"path": rel, "size": size, "sha256": digest})
        return self._base(msg, execution_id=eid, user_id=user, files=written)

    def cancel_run(self, msg: LegacyMessage) -> dict[str, Any]:
        """Cancel ``legacy-<execution_id>``: stopped when running, never started when it
        comes later (DESIGN.md §5's cancel).  Only a run this adapter launched: a
        ``fem.task/v1`` task of that id is not the legacy protocol's to stop."""
        eid, _user = run_ids(msg, user=False)
        tid = TASK_PREFIX + eid
        rec = self.journal.get(tid)
        if rec is not None and self.load(tid) is None:
            raise RejectedError(f"task {tid} was not launched by the legacy protocol",
                                task_id=tid)
        if rec is not None and rec.terminal:
            return self._base(msg, execution_id=eid, task_id=tid, cancel="already_finished",
                              state=rec.state)
        running = self.listener.cancel(tid)
        return self._base(msg, execution_id=eid, task_id=tid,
                          cancel="stopping" if running or rec else "recorded",
                          state=rec.state if rec else None)
