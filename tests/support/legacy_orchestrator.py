"""The existing FEM-orchestrator's side of the legacy protocol, as far as it is known
(DESIGN.md §9, reference/anchors.md): an RPC over the default exchange to the node's queue,
an exclusive callback queue as ``reply_to``, a ``correlation_id`` per request, and a reply of
``chunk_start`` + base64 ``chunk`` messages reassembled and checked against the sha256."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

import pika

from tests.support.harness import AMQP_URL


class LegacyOrchestrator:
    def __init__(self, queue: str):
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.callback = self.ch.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.chunk_counts: dict[str, int] = {}
        self.ch.basic_consume(self.callback, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        self.replies.setdefault(props.correlation_id, []).append(json.loads(body))

    def send(self, body: str | bytes) -> str:
        """Publish one request as the orchestrator does; returns its correlation id."""
        corr = uuid.uuid4().hex
        raw = body.encode() if isinstance(body, str) else body
        self.ch.basic_publish("", self.queue, raw,
                              pika.BasicProperties(reply_to=self.callback, correlation_id=corr),
                              mandatory=True)
        return corr

    def result(self, corr: str, timeout: float = 240) -> Any:
        """Wait for the whole reply of ``corr``, reassemble it and check its checksum."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.2)
            parts = self.replies.get(corr, [])
            if parts and parts[0]["type"] == "chunk_start" and \
                    len(parts) == parts[0]["total"] + 1:
                start, chunks = parts[0], parts[1:]
                assert all(c["type"] == "chunk" for c in chunks)
                assert sorted(c["index"] for c in chunks) == list(range(start["total"]))
                raw = b"".join(base64.b64decode(c["data"])
                               for c in sorted(chunks, key=lambda c: c["index"]))
                assert hashlib.sha256(raw).hexdigest() == start["checksum"]
                self.chunk_counts[corr] = start["total"]
                return json.loads(raw)
        raise AssertionError(f"no complete reply for {corr} within {timeout}s: "
                             f"{self.replies.get(corr)}")

    def call(self, body: str | bytes, timeout: float = 240) -> Any:
        return self.result(self.send(body), timeout)

    def close(self) -> None:
        try:
            self.ch.queue_delete(self.queue)
        finally:
            self.conn.close()


def legacy_body(action: str, *, task_info: Any = None, execution_id: str | None = "e1",
                params: Any = None, user_id: str = "alice", tool_id: str = "tool-1") -> str:
    """A 9-field body: ``task_info``/``parametric_args`` as Python literals (``repr``), as
    the orchestrator writes them; a string is sent as it is (for hostile fields)."""
    def literal(value: Any) -> str:
        return value if isinstance(value, str) else repr(value)

    execution = json.dumps({"execution_id": execution_id, "process_info": []})
    return "|".join([action, tool_id, literal(task_info or {}), execution,
                     literal(params or {}), user_id, "None", action, "token-secret-1"])
