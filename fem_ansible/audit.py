"""The local audit log (DESIGN.md §7): one JSON line per decision, fsync'd before the
action it records.

A sysadmin must be able to answer, months later, "what ran here, on whose word, with which
data, and where did its results go?" without trusting the orchestrator's records.  Lines
are appended with ``O_APPEND`` and one ``write`` each, so a crash leaves no torn line; they
hold ids, digests, rules and redacted URLs, never a secret or a byte of data.  A line goes
to the file at the configured path even after logrotate moved the old one away.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .schema import now_rfc3339


class AuditLog:
    """The append-only audit file; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str], node_id: str):
        self.path = Path(path)
        self.node_id = node_id
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def reopen(self) -> None:
        """Write to a file at :attr:`path` from now on (SIGHUP, after logrotate moved the
        old one away); no line is lost or split between the two files."""
        fd = self._open()
        with self._lock:
            fd, self._fd = self._fd, fd
        os.close(fd)

    def record(self, decision: str, task_id: str | None, **fields: Any) -> None:
        """Append ``{ts, node_id, decision, task_id, …fields}`` and fsync it."""
        line = json.dumps({"ts": now_rfc3339(), "node_id": self.node_id, "decision": decision,
                           "task_id": task_id, **fields}, sort_keys=False) + "\n"
        data = line.encode()
        with self._lock:
            self._follow_rename()
            os.write(self._fd, data)
            os.fsync(self._fd)

    def _follow_rename(self) -> None:
        """Write to the file at :attr:`path`, as the listener's log does: logrotate moves the
        old one away, and the SIGHUP that follows may never come (no systemd as PID 1, a
        failing postrotate), which left decisions in ``audit.jsonl.1`` (issue 31)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        now = os.fstat(self._fd)
        if st is None or (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            fd, self._fd = self._fd, self._open()
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
