"""What goes back to the orchestrator: the chunked reply and the records it carries."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from ..errors import RejectedError
from ..schema import event_time
from .message import SUBMIT, LegacyMessage


def legacy_time(when: float | None = None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` (UTC), as the real process-info records write times [NB]."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def event_legacy_time(event: dict[str, Any]) -> str:
    """A fem.task/v1 event's ``ts`` written as :func:`legacy_time`."""
    return legacy_time(event_time(event))


# fem.task/v1 terminal states as the process-info record's status.
STATUS = {"COMPLETED": "success", "FAILED": "failed", "TIMED_OUT": "timeout",
          "CANCELLED": "cancelled", "REJECTED": "error"}


def reply_messages(result: Any, chunk_size: int) -> list[dict[str, Any]]:
    """``chunk_start`` (number of chunks, sha256 of the raw bytes), then the chunks.

    The whole result is base64-encoded once and the encoded string is sliced: the
    orchestrator joins the ``data`` strings in index order and decodes once (DESIGN.md §9),
    so a slice alone need not decode (one encoded per slice would end in padding)."""
    raw = json.dumps(result).encode()
    text = base64.b64encode(raw).decode("ascii")
    chunks = [text[i:i + chunk_size] for i in range(0, len(text), chunk_size)] or [""]
    out: list[dict[str, Any]] = [{"type": "chunk_start", "total": len(chunks),
                                  "checksum": hashlib.sha256(raw).hexdigest()}]
    out.extend({"type": "chunk", "index": i, "data": c} for i, c in enumerate(chunks))
    return out


def error_result(msg: LegacyMessage | None, node: str, err: RejectedError,
                 action: str | None = None, *, record: bool = False) -> dict[str, Any]:
    """The answer to a message that was refused: nothing ran.  With ``record``
    (``legacy.reply: record``) a ``submit_run`` (even one whose other fields could not be
    read) gets a process-info record; otherwise, and for other actions,
    ``{action, node, execution_id, status: "error", error}`` (inferred: the real client's
    error reply is not public)."""
    error = {"code": err.code, "message": err.message}
    action = msg.action if msg else action
    if action == SUBMIT and record:
        now = legacy_time()
        info = msg.task_info if msg and isinstance(msg.task_info, dict) else {}
        return {"execution_id": msg.execution_id if msg else None, "action": SUBMIT,
                "tool_id": msg.tool_id if msg else None, "task_id": info.get("_id"),
                "user_id": msg.user_id if msg else None, "node": node,
                "result": {"error": error}, "status": "error", "return_code": None,
                "starting_time": now, "finish_time": now}
    return {"action": action, "node": node,
            "execution_id": msg.execution_id if msg else None, "status": "error",
            "error": error}
