"""What goes back to the orchestrator: the chunked reply and the records it carries."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
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
    """The packets of a reply whose result is in memory (see :func:`stream_reply`)."""
    raw = json.dumps(result).encode()
    return list(stream_reply(lambda: iter((raw,)), chunk_size))


def stream_reply(pieces: Callable[[], Iterator[bytes]], chunk_size: int
                 ) -> Iterator[dict[str, Any]]:
    """``chunk_start`` (number of chunks, sha256 of the raw bytes), then the chunks.

    The raw result is base64-encoded as one text and the text is sliced into chunks of
    ``chunk_size`` characters: the orchestrator joins the ``data`` strings in index order
    and decodes once (DESIGN.md §9), so a slice alone need not decode (one encoded per
    slice would end in padding).  ``pieces()`` gives the raw bytes in pieces, and is called
    twice (the checksum comes first), so a result as big as a run's files is never whole
    in memory."""
    digest, size = hashlib.sha256(), 0
    for piece in pieces():
        digest.update(piece)
        size += len(piece)
    text_size = 4 * ((size + 2) // 3)
    total = max(1, -(-text_size // chunk_size))
    yield {"type": "chunk_start", "total": total, "checksum": digest.hexdigest()}
    index, text, rest = 0, "", b""
    for piece in pieces():
        data = rest + piece
        cut = len(data) - len(data) % 3
        text += base64.b64encode(data[:cut]).decode("ascii")
        rest = data[cut:]
        while len(text) >= chunk_size:
            yield {"type": "chunk", "index": index, "data": text[:chunk_size]}
            text, index = text[chunk_size:], index + 1
    text += base64.b64encode(rest).decode("ascii")
    while index < total:
        yield {"type": "chunk", "index": index, "data": text[:chunk_size]}
        text, index = text[chunk_size:], index + 1


def success(msg: LegacyMessage, node: str, **fields: Any) -> dict[str, Any]:
    """The answer to an action other than a run that was carried out."""
    return {"action": msg.action, "node": node, "status": "success", **fields}


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
