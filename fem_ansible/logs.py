"""Log output for a terminal (text) or a log pipeline (JSON lines).

Every record about a task carries ``task_id``, so one task's story can be pulled out of
months of logs with one filter: passed as ``extra={"task_id": …}``, or taken from
:func:`task_context`, which the thread working on a task holds, so that lines from the
modules it calls (uploads, the runner) carry it too without knowing about tasks.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_TASK_ID: ContextVar[str | None] = ContextVar("fem_task_id", default=None)
_LINE_BREAKS = re.compile(r"\s*(?:\r\n|[\r\n\v\f\x1c-\x1e\x85\u2028\u2029])\s*")


def one_line(text: str) -> str:
    """``text`` on one line: each line break (a multi-line git or engine error, say) becomes
    `` | ``, so that one event or log record stays one line for grep and log pipelines."""
    return _LINE_BREAKS.sub(" | ", text.strip())


@contextmanager
def task_context(task_id: str) -> Iterator[None]:
    """Log records made in this block (this thread) are about ``task_id``."""
    token = _TASK_ID.set(task_id)
    try:
        yield
    finally:
        _TASK_ID.reset(token)


class TaskIdFilter(logging.Filter):
    """Gives a record without ``task_id`` the one of the current :func:`task_context`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            record.task_id = _TASK_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # the message on one line; a traceback (exc_info) still follows on its own lines
        return one_line(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        task_id = getattr(record, "task_id", None)
        return f"{line} [task_id={task_id}]" if task_id else line


def setup_logging(fmt: str = "text", level: str = "INFO", path: str | None = None) -> None:
    """Log to stderr, or append to the file ``path`` (``listen --log-file``): a
    :class:`~logging.handlers.WatchedFileHandler`, so that after logrotate moved the file
    the next line goes to a new one (:func:`reopen_log_files` does it at once, on SIGHUP)."""
    handler: logging.Handler = (logging.handlers.WatchedFileHandler(path, encoding="utf-8")
                                if path else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A failed connection, a lost one, a channel the broker closed, a returned message:
    # pika logs each at length (tracebacks, several lines a failure) and raises or returns
    # it, and fem-ansible logs what it caught, in one line with what to do (issue 31).
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def reopen_log_files() -> None:
    """Reopen every log file that was moved or removed since it was opened (SIGHUP)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.reopenIfNeeded()


def listener_log_files(config_path: str) -> list[str]:
    """The ``--log-file`` of each ``fem-ansible listen`` running here with the config file
    ``config_path``, for ``fem-ansible tasks ID`` to point at the log in use (issue 31).

    Read from the processes' command lines, which any user may read; a listener without
    ``--config`` reads the default config, one without ``--log-file`` logs to stderr.
    """
    from .config import DEFAULT_CONFIG_PATH

    mine = os.path.realpath(config_path)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        at = next((i for i, arg in enumerate(argv[:3]) if arg == "listen" and i > 0 and
                   os.path.basename(argv[i - 1]) in ("fem-ansible", "fem_ansible")), None)
        if at is None or "--log-file" not in argv[at:-1]:
            continue
        option = dict(zip(argv[at + 1::2], argv[at + 2::2], strict=False))
        if os.path.realpath(option.get("--config", DEFAULT_CONFIG_PATH)) == mine:
            found.append(option["--log-file"])
    return sorted(set(found))
