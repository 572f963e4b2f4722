"""The local durable journal: every task this listener accepted, its stages, its events.

SQLite in WAL mode, in ``execution.work_dir``, written by this process only (one lock, one
connection).  A task is in the journal before it is acknowledged to the broker, each stage
is recorded as it completes, and every event is written here first and marked published
only once the broker confirmed it; so a crash or a broker outage loses nothing, and events
go out in ``seq`` order when the broker is back (DESIGN.md §5).

Rejected messages are kept apart from tasks, in ``rejections`` (the newest
:data:`KEEP_REJECTIONS`): a rejection is not an accepted task, so it never stops a later
valid message with the same ``task_id`` from running (docs/decisions.md, "One intake").

The file holds what recovery needs, upload URLs and headers included, so it is created
readable by the service user only.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import TERMINAL_STATES

# Rejected messages kept for ``fem-ansible tasks``, and published REJECTED events of
# messages refused before a ``task_id`` could be read (unsigned, oversized, not JSON): what
# anyone who can write to the queue adds stays bounded (the audit log keeps every one).
KEEP_REJECTIONS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 1,
    stages_done TEXT NOT NULL DEFAULT '[]',
    result      TEXT NOT NULL DEFAULT '{}',
    host        TEXT,
    received_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    decision    TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id   TEXT,
    seq       INTEGER NOT NULL,
    state     TEXT NOT NULL,
    body      TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS events_task_seq ON events(task_id, seq)
    WHERE task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_unpublished ON events(published, id);
CREATE INDEX IF NOT EXISTS events_anonymous ON events(id) WHERE task_id IS NULL;
CREATE TABLE IF NOT EXISTS rejections (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT,
    at      REAL NOT NULL,
    code    TEXT NOT NULL,
    reasons TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cancels (
    task_id TEXT PRIMARY KEY,
    at      REAL NOT NULL
);
"""


@dataclass
class TaskRecord:
    """One row of the journal, decoded."""

    task_id: str
    task: dict[str, Any]
    state: str
    attempt: int
    stages_done: list[str]
    result: dict[str, Any]
    host: str | None
    received_at: float
    updated_at: float
    finished_at: float | None
    events: list[dict[str, Any]] = field(default_factory=list)
    # The site's decision at intake (policy.Decision as a dict); None in journals written
    # before it was kept.
    decision: dict[str, Any] | None = None
    # For a rejected message (state REJECTED, never run): {"code", "reasons"}.
    rejection: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def _open_error(path: Path, e: sqlite3.Error) -> OSError:
    """Why the journal at ``path`` cannot be used, as the OSError the command line and the
    service report in one line with what to do: a journal this user may read but not write
    (every command writes it: the listener, and `tasks` or `cancel` as another user), or a
    file that is no journal."""
    if "readonly" in str(e) or not os.access(path, os.R_OK | os.W_OK):
        return PermissionError(errno.EACCES, f"Permission denied (this user may not read "
                               f"and write the journal: {e})", str(path))
    return OSError(errno.EIO, f"not a usable journal ({e})", str(path))


class Journal:
    """The journal file; safe to share between the listener's threads."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None)
        except sqlite3.Error as e:
            raise _open_error(self.path, e) from e
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(tasks)")}
            if "decision" not in columns:  # a journal of an earlier version
                self._db.execute("ALTER TABLE tasks ADD COLUMN decision TEXT")
        except sqlite3.Error as e:
            self._db.close()
            raise _open_error(self.path, e) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- tasks ---------------------------------------------------------------------------

    def get(self, task_id: str, *, with_events: bool = False) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is None:
                return None
            rec = self._record(row)
            if with_events:
                rec.events = [
                    json.loads(b)
                    for (b,) in self._db.execute(
                        "SELECT body FROM events WHERE task_id=? ORDER BY seq", (task_id,)
                    )
                ]
            return rec

    @staticmethod
    def _record(row: tuple[Any, ...]) -> TaskRecord:
        (task_id, task, state, attempt, stages, result, host, rec_at, upd_at, fin_at,
         decision) = row
        return TaskRecord(task_id, json.loads(task), state, attempt, json.loads(stages),
                          json.loads(result), host, rec_at, upd_at, fin_at,
                          decision=json.loads(decision) if decision else None)

    def add_task(self, task_id: str, task: dict[str, Any], first_event: dict[str, Any],
                 decision: dict[str, Any] | None = None
                 ) -> tuple[TaskRecord | None, dict[str, Any] | None]:
        """Record a new task with its first event and the site's decision, atomically.

        :returns: ``(None, event)`` when it was new; ``(existing record, None)`` when the
            task id is already in the journal (the caller decides what a re-send means).
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is not None:
                return self._record(row), None
            db.execute(
                "INSERT INTO tasks (task_id, task, state, received_at, updated_at, decision)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, json.dumps(task), first_event["state"], now, now,
                 json.dumps(decision) if decision is not None else None),
            )
            return None, self._insert_event(db, task_id, first_event, now)

    def update(self, task_id: str, **fields: Any) -> None:
        """Set ``attempt``, ``stages_done``, ``result`` or ``host`` of a task."""
        allowed = {"attempt", "stages_done", "result", "host"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        sets, values = [], []
        for name, value in fields.items():
            sets.append(f"{name}=?")
            values.append(json.dumps(value) if name in ("stages_done", "result") else value)
        with self._tx() as db:
            db.execute(
                f"UPDATE tasks SET {', '.join(sets)}, updated_at=? WHERE task_id=?",
                (*values, time.time(), task_id),
            )

    def unfinished(self) -> list[TaskRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE finished_at IS NULL ORDER BY received_at"
            ).fetchall()
        return [self._record(r) for r in rows]

    def recent(self, limit: int = 50) -> list[TaskRecord]:
        """The newest tasks and rejected messages, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM tasks ORDER BY received_at DESC LIMIT ?", (limit,)
            ).fetchall()
            rejected = self._db.execute(
                "SELECT * FROM rejections ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        records = [self._record(r) for r in rows] + [self._rejection(r) for r in rejected]
        return sorted(records, key=lambda r: r.received_at, reverse=True)[:limit]

    def errors(self, task_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The ``error`` (code, message) of each task's terminal event, for the ended ones
        of ``task_ids`` that have one: ``fem-ansible tasks`` shows it beside FAILED."""
        terminal = sorted(TERMINAL_STATES)
        rows = []
        with self._lock:
            for at in range(0, len(task_ids), 500):  # SQLite's bound on ? in one statement
                chunk = task_ids[at:at + 500]
                rows += self._db.execute(
                    f"SELECT task_id, body FROM events WHERE task_id IN "
                    f"({','.join('?' * len(chunk))}) AND state IN "
                    f"({','.join('?' * len(terminal))})", (*chunk, *terminal)).fetchall()
        found = {tid: json.loads(body).get("error") for tid, body in rows}
        return {tid: error for tid, error in found.items() if error}

    def rejections(self, task_id: str) -> list[TaskRecord]:
        """The rejected messages that carried ``task_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rejections WHERE task_id=? ORDER BY id", (task_id,)
            ).fetchall()
        return [self._rejection(r) for r in rows]

    @staticmethod
    def _rejection(row: tuple[Any, ...]) -> TaskRecord:
        (_id, task_id, at, code, reasons) = row
        return TaskRecord(task_id or "-", {}, "REJECTED", 1, [], {}, None, at, at, at,
                          rejection={"code": code, "reasons": json.loads(reasons)})

    def finished_beyond(self, keep: int) -> list[str]:
        """Ids of finished tasks older than the ``keep`` most recent finished ones."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id FROM tasks WHERE finished_at IS NOT NULL"
                " ORDER BY finished_at DESC LIMIT -1 OFFSET ?",
                (keep,),
            ).fetchall()
        return [r[0] for r in rows]

    # -- events --------------------------------------------------------------------------

    @staticmethod
    def _insert_event(db: sqlite3.Connection, task_id: str | None, event: dict[str, Any],
                      now: float, *, task_state: bool = True) -> dict[str, Any]:
        """Store ``event`` with the next ``seq`` of ``task_id``; with ``task_state`` it also
        becomes the task's state (a rejection's event does not: it is not the task's)."""
        if task_id is None:
            seq = 1
        else:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE task_id=?", (task_id,)
            ).fetchone()
            seq = last + 1
        event = {**event, "seq": seq}
        db.execute(
            "INSERT INTO events (task_id, seq, state, body) VALUES (?, ?, ?, ?)",
            (task_id, seq, event["state"], json.dumps(event)),
        )
        if task_id is not None and task_state:
            finished = now if event["state"] in TERMINAL_STATES else None
            db.execute(
                "UPDATE tasks SET state=?, updated_at=?, finished_at=COALESCE(?, finished_at)"
                " WHERE task_id=?",
                (event["state"], now, finished, task_id),
            )
        return event

    def add_rejection(self, task_id: str | None, code: str, reasons: list[str],
                      event: dict[str, Any] | None) -> dict[str, Any] | None:
        """Record a rejected message and, when given, its REJECTED event, atomically.

        The event goes in ``task_id``'s sequence (after any earlier rejection's), so the
        events of a later valid message with that id follow with higher ``seq``; the
        ``tasks`` table is not touched: a rejection is not an accepted task.  Events without
        a ``task_id`` serve nothing once published (no sequence continues them, ``tasks``
        reads ``rejections``): beyond the newest :data:`KEEP_REJECTIONS` they are deleted.
        :returns: the stored event, with its ``seq``.
        """
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO rejections (task_id, at, code, reasons) VALUES (?, ?, ?, ?)",
                       (task_id, now, code, json.dumps(reasons)))
            db.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                       (KEEP_REJECTIONS,))
            stored = (None if event is None
                      else self._insert_event(db, task_id, event, now, task_state=False))
            db.execute("DELETE FROM events WHERE task_id IS NULL AND published=1 AND id < "
                       "(SELECT id FROM events WHERE task_id IS NULL ORDER BY id DESC "
                       "LIMIT 1 OFFSET ?)", (KEEP_REJECTIONS - 1,))
            return stored

    def append_event(self, task_id: str | None, event: dict[str, Any]) -> dict[str, Any]:
        """Store an event with the task's next ``seq``; returns it with its ``seq``."""
        with self._tx() as db:
            return self._insert_event(db, task_id, event, time.time())

    def last_event(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM events WHERE task_id=? ORDER BY seq DESC LIMIT 1", (task_id,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def unpublished(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        """Events not yet confirmed by the broker, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body FROM events WHERE published=0 ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(i, json.loads(b)) for i, b in rows]

    def unpublished_count(self) -> int:
        """How many events wait for the broker (a metric: non-zero for long = broker trouble)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events WHERE published=0"
                                    ).fetchone()[0]

    def mark_published(self, event_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE events SET published=1 WHERE id=?", (event_id,))

    def republish(self, task_id: str, seq: int) -> None:
        """Queue an already published event to go out again (same ``seq`` and content)."""
        with self._tx() as db:
            db.execute("UPDATE events SET published=0 WHERE task_id=? AND seq=?", (task_id, seq))

    # -- cancels -------------------------------------------------------------------------

    def record_cancel(self, task_id: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO cancels (task_id, at) VALUES (?, ?)",
                       (task_id, time.time()))

    def is_cancelled(self, task_id: str) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM cancels WHERE task_id=?", (task_id,)
            ).fetchone() is not None
