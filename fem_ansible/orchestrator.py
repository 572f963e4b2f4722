"""The orchestrator's side of the wire, for ``fem-ansible submit`` and ``cancel``: publish a
task or a control message as an orchestrator would, and follow a task's events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

from . import broker
from .config import Config
from .schema import CONTROL_SCHEMA_ID, TERMINAL_STATES
from .signatures import HEADER, sign_hmac


def _headers(config: Config, body: bytes, sign_key: str | None) -> dict[str, str]:
    key_file = sign_key or (config.security.signature.key_file
                            if config.security.signature.mode == "hmac" else None)
    if not key_file:
        return {}
    return {HEADER: sign_hmac(body, Path(key_file).read_bytes().strip())}


def submit_task(config: Config, body: bytes, task_id: str | None, *, wait: bool,
                timeout: float, sign_key: str | None = None,
                on_event: Callable[[dict[str, Any]], None] = lambda e: None,
                on_no_consumer: Callable[[str], None] = lambda queue: None
                ) -> dict[str, Any] | None:
    """Publish ``body`` to ``fem.tasks``; with ``wait``, return the task's terminal event
    (None when none came within ``timeout``).  ``on_no_consumer(queue)`` is called at once
    when no listener consumes the node's task queue: the wait may be long, and the sysadmin
    should know why before it ends."""
    conn = broker.connect(config)
    try:
        ch = conn.channel()
        names = broker.declare_topology(ch, config)
        queue = None
        if wait:
            queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            ch.queue_bind(queue, broker.EVENTS_EXCHANGE,
                          routing_key=f"{config.node_id}.{task_id or '_'}.*")
        ch.confirm_delivery()
        ch.basic_publish(broker.TASKS_EXCHANGE, config.node_id, body,
                         broker.json_properties(headers=_headers(config, body, sign_key)),
                         mandatory=True)
        if queue is None:
            return None
        if ch.queue_declare(names.tasks, passive=True).method.consumer_count == 0:
            on_no_consumer(names.tasks)
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        for _method, _props, raw in ch.consume(queue, auto_ack=True, inactivity_timeout=1):
            if time.monotonic() > deadline:
                return None
            if raw is None:
                continue
            event = json.loads(raw)
            if event["seq"] in seen:
                continue
            seen.add(event["seq"])
            on_event(event)
            if event["state"] in TERMINAL_STATES:
                return event
        return None
    finally:
        if conn.is_open:
            conn.close()


def send_cancel(config: Config, task_id: str, sign_key: str | None = None,
                by: str = "orchestrator") -> None:
    body = json.dumps({"schema": CONTROL_SCHEMA_ID, "action": "cancel", "task_id": task_id,
                       "node_id": config.node_id, "by": by}).encode()
    conn = broker.connect(config)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(broker.CONTROL_EXCHANGE, config.node_id, body,
                         pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                              headers=_headers(config, body, sign_key)))
    finally:
        if conn.is_open:
            conn.close()
