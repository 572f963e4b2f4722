"""The existing FEM-orchestrator's side of the legacy protocol, written from
the public sources docs/legacy.md lists ("Wire protocol"), not from fem_ansible's encoder.

Request: default exchange, ``routing_key=<node_name>``, ``reply_to`` an exclusive
server-named queue, ``correlation_id=str(uuid4())``, body the 9 ``|``-separated fields with
``task_info`` as ``repr(dict)``, ``execution`` as ``json.dumps``, ``parametric_args`` ``"{}"``,
``public_ip`` the literal ``None``, ``json_action`` ``submit_run`` and a string token.

Reply, reassembled as the orchestrator does it: a ``chunk_start`` gives ``total`` and the
checksum; ``chunk`` packets are kept by ``index``; once ``len(chunks) == total`` the ``data``
strings are joined in index order, the joined string is base64-decoded once,
``sha256(raw)`` must equal the checksum (else ``RuntimeError("Checksum mismatch")``), and
``json.loads(raw)`` is the result.  Replies with another correlation id are ignored.
"""

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
        # Per correlation id: the chunk_start packet and the chunks by index.
        self.starts: dict[str, dict[str, Any]] = {}
        self.chunks: dict[str, dict[int, str]] = {}
        self.chunk_counts: dict[str, int] = {}
        self.ch.basic_consume(self.callback, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        packet = json.loads(body)
        corr = props.correlation_id
        if packet.get("type") == "chunk_start":
            self.starts[corr] = packet
            self.chunks.setdefault(corr, {})
        elif packet.get("type") == "chunk":
            self.chunks.setdefault(corr, {})[packet["index"]] = packet["data"]

    def send(self, body: str | bytes) -> str:
        """Publish one request as the orchestrator does; returns its correlation id."""
        corr = str(uuid.uuid4())
        raw = body.encode() if isinstance(body, str) else body
        self.ch.basic_publish("", self.queue, raw,
                              pika.BasicProperties(reply_to=self.callback, correlation_id=corr),
                              mandatory=True)
        return corr

    def result(self, corr: str, timeout: float = 240) -> Any:
        """Wait for the whole reply of ``corr`` and reassemble it the orchestrator's way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.2)
            start, chunks = self.starts.get(corr), self.chunks.get(corr, {})
            if start is not None and len(chunks) == start["total"]:
                return self._reassemble(corr, start, chunks)
        raise AssertionError(f"no complete reply for {corr} within {timeout}s: "
                             f"{self.starts.get(corr)}, {len(self.chunks.get(corr, {}))} chunks")

    def _reassemble(self, corr: str, start: dict[str, Any], chunks: dict[int, str]) -> Any:
        full_b64 = "".join(chunks[i] for i in sorted(chunks))
        raw = base64.b64decode(full_b64)
        if hashlib.sha256(raw).hexdigest() != start["checksum"]:
            raise RuntimeError("Checksum mismatch")
        self.chunk_counts[corr] = start["total"]
        return json.loads(raw)

    def call(self, body: str | bytes, timeout: float = 240) -> Any:
        return self.result(self.send(body), timeout)

    def close(self) -> None:
        try:
            self.ch.queue_delete(self.queue)
        finally:
            self.conn.close()


def legacy_body(action: str, *, task_info: Any = None, execution_id: str | None = "e1",
                params: Any = None, user_id: str = "alice", tool_id: str = "tool-1",
                json_action: str = "submit_run", token: str = "token-secret-1") -> str:
    """A 9-field body as the orchestrator writes it: ``task_info``/``parametric_args`` as
    ``repr`` of a dict, ``execution`` as JSON, ``public_ip`` the literal ``None``; a string
    ``task_info``/``params`` is sent as it is (for hostile fields)."""
    def literal(value: Any) -> str:
        return value if isinstance(value, str) else repr(value)

    execution = json.dumps({"execution_id": execution_id, "process_info": []})
    return "|".join([action, tool_id, literal(task_info or {}), execution,
                     literal(params or {}), user_id, "None", json_action, token])
