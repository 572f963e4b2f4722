"""The action ``submit_run``: a run of a catalogue tool, from the message to its reply.

Read through the site's catalogue and the node's intake, journaled and launched in a worker
slot on the connection thread (once :mod:`~fem_ansible.legacy.held` gave it one); when the
task ends, :meth:`Runs.finished` (on the worker) unpacks its outputs into the sandbox and
stores the reply, which the connection thread sends (docs/legacy.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapters import ListenerSurface
from ..errors import PolicyViolation, RejectedError
from ..intake import Task
from . import catalogue, intake, preflight, sandbox
from .catalogue import Launch
from .message import SUBMIT, TASK_PREFIX, LegacyMessage, run_ids
from .records import Records
from .replies import STATUS, error_result, event_legacy_time, legacy_time
from .taskinfo import DATA_DATASET, INPUT_DATASET, to_task

log = logging.getLogger(__name__)

# The executors whose role passes fem_secrets.env to the container (docs/roles.md).
SECRET_ENV_EXECUTORS = ("docker", "podman")


class Runs:
    """The legacy protocol's runs on this node.

    :param listener: the listener's public surface.
    :param records: the record store.
    :param queue: the legacy queue's name (the node name a message's task is made for).
    :param reply: on the connection thread, answer a delivery ``(ch, props, result)``.
    :param flush: on the connection thread, send every stored reply not sent yet.
    """

    def __init__(self, listener: ListenerSurface, records: Records, queue: str,
                 reply: Callable[[Any, Any, Any], None], flush: Callable[[], None]):
        self.listener = listener
        self.config = listener.config
        self.node = listener.node
        self.journal = listener.journal
        self.records = records
        self.queue = queue
        self.reply = reply
        self.flush = flush
        self._secret_env: dict[str, dict[str, str]] = {}
        self._record = self.config.legacy.reply == "record"

    def datasets_for(self, user_id: str, execution_id: str) -> dict[str, str]:
        out = {INPUT_DATASET: str(sandbox.run_root(self.config, user_id, execution_id))}
        if self.config.legacy.data_path:
            out[DATA_DATASET] = self.config.legacy.data_path
        return out

    def run_datasets(self, task: Mapping[str, Any]) -> dict[str, str]:
        """A legacy run's datasets, from its record (so recovery after a restart resolves
        them the same way)."""
        rec = self.records.load(task["task_id"])
        if rec is None:
            return {}
        return rec.get("datasets") or self.datasets_for(rec["user_id"], rec["execution_id"])

    def run_secret_env(self, task: Mapping[str, Any]) -> dict[str, str]:
        """The token of a run, as its container's secret env; held in memory only, so a
        run carried on by recovery after a restart has none (docs/legacy.md)."""
        return dict(self._secret_env.get(task["task_id"], {}))

    def read(self, msg: LegacyMessage) -> tuple[Launch, Task]:
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
            root = str(sandbox.run_root(self.config, user, eid))
            launch = catalogue.to_launch(msg, tool, self.config, self.queue, root)
            launch = replace(launch, datasets={INPUT_DATASET: root, **launch.datasets})
        used = {d["name"] for d in launch.task.get("datasets") or []}
        preflight.check_datasets(TASK_PREFIX + eid, {
            name: path for name, path in launch.datasets.items() if name in used})
        task = intake.read_task(self.node, launch.task, launch.datasets)
        if launch.secret_env and task.executor not in SECRET_ENV_EXECUTORS:
            raise PolicyViolation("legacy.tools", f"executor {task.executor!r} cannot pass "
                                  "the token as a secret env var", task_id=task.task_id)
        return launch, task

    def submit(self, ch: Any, method: Any, props: Any, msg: LegacyMessage) -> None:
        """A ``submit_run`` given a free slot: read, journaled, launched, then acked."""
        launch, accepted = self.read(msg)
        task, tid = accepted.to_dict(), accepted.task_id
        eid, user = run_ids(msg)
        assert user is not None
        self.node.audit.record("accepted", tid, protocol="legacy", tool_id=msg.tool_id,
                               image=task["image"]["ref"], command=task["command"],
                               source=task["source"]["repo"] if task["source"] else None,
                               resources=task["resources"],
                               datasets=[d["name"] for d in task["datasets"]])
        with self.records.lock:
            rec = self.records.load(tid)
            if rec is None:
                sandbox.run_root(self.config, user, eid).mkdir(parents=True, exist_ok=True,
                                                               mode=0o755)
                info = msg.task_info or {}
                rec = {"task_id": tid, "execution_id": eid, "user_id": user,
                       "tool_id": msg.tool_id, "task": info.get("_id"),
                       "datasets": launch.datasets, "outputs_into": launch.outputs_into,
                       "starting_time": legacy_time(), "reply": None, "replied": False}
            rec.update(reply_to=props.reply_to, correlation_id=props.correlation_id)
            if rec["reply"] is not None:
                rec["replied"] = False  # asked again: answered again
            self.records.save(rec)
        _event, existing = self.node.accept(accepted)
        if existing is not None:
            self.listener.publish_pending()
            if existing.terminal:
                if rec["reply"] is None:
                    err = RejectedError(f"task {tid} already ran here", task_id=tid)
                    self.reply(ch, props, error_result(msg, self.config.node_id, err,
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
        with self.records.lock:
            rec = self.records.load(task_id)
        if rec is None or not event:
            return
        self._secret_env.pop(task_id, None)
        jrec = self.journal.get(task_id)
        result_paths = jrec.result if jrec else {}
        root = sandbox.run_root(self.config, rec["user_id"], rec["execution_id"])
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
        with self.records.lock:
            rec = self.records.load(task_id) or rec
            rec.update(reply=reply, replied=False)
            self.records.save(rec)
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

    def prune(self) -> None:
        """Sandboxes are kept as long as their run dir: ``execution.keep_runs``."""
        for tid in self.journal.finished_beyond(self.config.execution.keep_runs):
            with self.records.lock:
                rec = self.records.load(tid)
                if rec is None:
                    continue
                root = sandbox.run_root(self.config, rec["user_id"], rec["execution_id"])
                try:
                    sandbox.tree.remove(root)
                except OSError as exc:
                    log.warning("legacy sandbox %s not removed: %s", root, exc)
                with contextlib.suppress(OSError):
                    root.parent.rmdir()  # only when empty
                self.records.path(tid).unlink(missing_ok=True)
