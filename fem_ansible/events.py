"""Event messages (``fem.event/v1``, ``fem.node/v1``): their shape and their routing key.

Events are built here and nowhere else, so every event carries the same fields in the same
order; ``seq`` is given by the journal, which owns the order (DESIGN.md §4).
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .schema import EVENT_SCHEMA_ID, NODE_SCHEMA_ID, now_rfc3339


def task_event(
    node_id: str,
    task: dict[str, Any] | None,
    state: str,
    message: str,
    *,
    task_id: str | None = None,
    attempt: int = 1,
    **fields: Any,
) -> dict[str, Any]:
    """An event without its ``seq`` (the journal adds it).

    :param task: the normalised task when it could be read, for its ids and labels.
    :param fields: ``host``, ``image_digest``, ``source_commit``, ``exit_code``, ``outputs``,
        ``logs``, ``error``; absent ones are null.
    """
    unknown = fields.keys() - {
        "host", "image_digest", "source_commit", "exit_code", "outputs", "logs", "error"
    }
    if unknown:
        raise TypeError(f"unknown event fields {sorted(unknown)}")
    task = task or {}
    return {
        "schema": EVENT_SCHEMA_ID,
        "node_id": node_id,
        "task_id": task.get("task_id", task_id),
        "experiment_id": task.get("experiment_id"),
        "labels": task.get("labels", {}),
        "state": state,
        "attempt": attempt,
        "ts": now_rfc3339(),
        "message": message,
        "host": fields.get("host"),
        "image_digest": fields.get("image_digest"),
        "source_commit": fields.get("source_commit"),
        "exit_code": fields.get("exit_code"),
        "outputs": fields.get("outputs"),
        "logs": fields.get("logs"),
        "error": fields.get("error"),
    }


def routing_key(event: dict[str, Any]) -> str:
    """``<node_id>.<task_id>.<STATE>`` (``_`` for an unread task id), DESIGN.md §2."""
    return f"{event['node_id']}.{event['task_id'] or '_'}.{event['state']}"


def node_heartbeat(node_id: str, listener_id: str, max_parallel: int, running: int,
                   accepting: bool, reason: str | None = None) -> dict[str, Any]:
    """The node status; ``reason`` says why it is not ``accepting`` (DESIGN.md §4)."""
    beat = {
        "schema": NODE_SCHEMA_ID,
        "node_id": node_id,
        "listener_id": listener_id,
        "version": __version__,
        "max_parallel": max_parallel,
        "running": running,
        "accepting": accepting,
        "ts": now_rfc3339(),
    }
    if not accepting and reason:
        beat["reason"] = reason
    return beat


def heartbeat_routing_key(node_id: str) -> str:
    return f"{node_id}._node.HEARTBEAT"
