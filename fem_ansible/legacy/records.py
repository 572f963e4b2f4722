"""The legacy protocol's records: what a ``submit_run``'s reply needs, beside the journal.

One JSON file per run under ``<work_dir>/legacy``, written atomically (fsync'd, then
renamed): the run's execution and user ids, its datasets, where its outputs go in the
sandbox, whom to answer, and the reply once stored.  Never the token (docs/legacy.md).  A
record is what tells a run the legacy protocol launched from a ``fem.task/v1`` task of the
same id, and what survives a restart, so replies owed are still sent.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .message import TASK_PREFIX


class Records:
    """The record store.  Readers and writers that must see one record whole (load, change,
    save) hold :attr:`lock` around the three."""

    def __init__(self, work_dir: Path):
        self.dir = work_dir / "legacy"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock = threading.Lock()

    def path(self, task_id: str) -> Path:
        return self.dir / f"{task_id}.json"

    def load(self, task_id: str) -> dict[str, Any] | None:
        if not task_id.startswith(TASK_PREFIX):
            return None
        try:
            return json.loads(self.path(task_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, record: dict[str, Any]) -> None:
        path = self.path(record["task_id"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def task_ids(self) -> Iterator[str]:
        """Every recorded run's task id, in order."""
        for path in sorted(self.dir.glob(f"{TASK_PREFIX}*.json")):
            yield path.stem
