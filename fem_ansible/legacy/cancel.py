"""The action ``cancel_run`` (docs/legacy.md, "The other actions")."""

from __future__ import annotations

from typing import Any

from ..adapters import ListenerSurface
from ..errors import RejectedError
from .message import TASK_PREFIX, LegacyMessage, run_ids
from .records import Records
from .replies import success


def cancel_run(listener: ListenerSurface, records: Records, msg: LegacyMessage
               ) -> dict[str, Any]:
    """Cancel ``legacy-<execution_id>``: stopped when running, never started when it
    comes later (DESIGN.md §5's cancel).  Only a run this adapter launched (it has a
    record): a ``fem.task/v1`` task of that id is not the legacy protocol's to stop."""
    eid, _user = run_ids(msg, user=False)
    tid = TASK_PREFIX + eid
    rec = listener.journal.get(tid)
    if rec is not None and records.load(tid) is None:
        raise RejectedError(f"task {tid} was not launched by the legacy protocol",
                            task_id=tid)
    node_id = listener.config.node_id
    if rec is not None and rec.terminal:
        return success(msg, node_id, execution_id=eid, task_id=tid, cancel="already_finished",
                       state=rec.state)
    running = listener.cancel(tid)
    return success(msg, node_id, execution_id=eid, task_id=tid,
                   cancel="stopping" if running or rec else "recorded",
                   state=rec.state if rec else None)
