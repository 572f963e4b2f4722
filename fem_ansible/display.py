"""What the command line shows of tasks: event lines, the journal's table, one task's story
with the time it spent in each stage, and ``fem-ansible run``'s live progress line.

The progress line is drawn only on a terminal; anywhere else (a pipe, a log, CI) the same
events come out as plain lines, one per event, which is what scripts and logs want.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from . import stages
from .config import Config
from .journal import TaskRecord
from .lifecycle import NodeObserver
from .logs import one_line
from .schema import TERMINAL_STATES, event_time
from .sizes import format_bytes

# The stage a task is in while in each state, RECEIVED being the wait for a slot.
STATE_STAGE = {"RECEIVED": "waiting", **stages.STATE_STAGE}


def format_event(event: dict[str, Any]) -> str:
    """One event as one line: seq, state, message, then what is known."""
    extra = []
    for key in ("host", "image_digest", "source_commit", "exit_code"):
        if event.get(key) is not None:
            extra.append(f"{key}={event[key]}")
    for key in ("outputs", "logs"):
        if event.get(key):
            a = event[key]
            extra.append(f"{key}={a['url'] or '(kept on node)'} {a['size']}B")
    if event.get("error"):
        extra.append(f"error={event['error']['code']}")
    tail = f" [{', '.join(extra)}]" if extra else ""
    return f"{event['seq']:>3} {event['state']:<11} {one_line(str(event['message']))}{tail}"


def duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def stage_timings(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds spent in each stage, summed over attempts, from the events' ``ts``: a stage
    lasts from the event that enters it to the next state change."""
    spent: dict[str, float] = {}
    current: tuple[str, float] | None = None
    for event in events:
        state, at = event["state"], event_time(event)
        if current and current[0] == state:
            continue  # a progress event within the state
        if current and current[0] in STATE_STAGE:
            stage = STATE_STAGE[current[0]]
            spent[stage] = spent.get(stage, 0.0) + max(0.0, at - current[1])
        current = (state, at)
    return spent


def task_table(records: list[TaskRecord], now: float | None = None,
               errors: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """``errors``: the terminal events' errors by task id (:meth:`Journal.errors`), shown
    after the exit code as a rejection's code and reasons are."""
    now = now or time.time()
    errors = errors or {}
    lines = [f"{'TASK':<36} {'STATE':<11} {'ATT':>3} {'HOST':<12} {'RECEIVED':<19} "
             f"{'DURATION':>9} {'EXIT':>4}"]
    for rec in records:
        started = datetime.fromtimestamp(rec.received_at).strftime("%Y-%m-%d %H:%M:%S")
        if rec.rejection:
            # Never run: why it was refused takes the place of the run's numbers.
            why = f"{rec.rejection['code']}: {'; '.join(rec.rejection['reasons'])}"
            attempt, host, tail = "-", "-", why[:200]
        else:
            code = rec.result.get("exit_code")
            attempt, host = str(rec.attempt), rec.host or "-"
            tail = (f"{duration((rec.finished_at or now) - rec.received_at):>9} "
                    f"{'' if code is None else code:>4}")
            if error := errors.get(rec.task_id):
                tail += f" {error['code']}: {error.get('message') or ''}"[:200]
        lines.append(f"{rec.task_id:<36} {rec.state:<11} {attempt:>3} {host:<12} "
                     f"{started:<19} {tail}")
    return lines


def rejection_detail(records: list[TaskRecord]) -> list[str]:
    """The rejected messages of one task id: when, the code, every reason."""
    lines = []
    for rec in records:
        assert rec.rejection is not None
        at = datetime.fromtimestamp(rec.received_at).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"rejected at {at} ({rec.rejection['code']}), nothing run:")
        lines += [f"  {reason}" for reason in rec.rejection["reasons"]]
    return lines


def task_summary(rec: TaskRecord, with_events: bool = False) -> dict[str, Any]:
    """``tasks --json``: what the table shows, as data.  Not the journal's copy of the task:
    that keeps the upload URLs with their credentials, for recovery."""
    def at(ts: float | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(
            timespec="seconds").replace("+00:00", "Z")

    summary = {"task_id": rec.task_id, "state": rec.state, "attempt": rec.attempt,
               "host": rec.host, "received_at": at(rec.received_at),
               "finished_at": at(rec.finished_at),
               "duration_s": round((rec.finished_at or time.time()) - rec.received_at, 3),
               "exit_code": rec.result.get("exit_code")}
    if rec.rejection:
        summary["rejection"] = rec.rejection  # {code, reasons}: never run
    if with_events:
        summary["stage_seconds"] = {k: round(v, 3) for k, v in stage_timings(rec.events).items()}
        summary["events"] = rec.events
    return summary


def task_detail(rec: TaskRecord, config: Config, log_files: list[str]) -> list[str]:
    """One task: its state, its events, the time per stage, and where its logs are
    (``log_files``: those of the listeners running with this config)."""
    lines = [f"task {rec.task_id}: {rec.state}, attempt {rec.attempt}, host {rec.host or '-'}"]
    lines += [format_event(e) for e in rec.events]
    timings = stage_timings(rec.events)
    if timings:
        total = (rec.finished_at or time.time()) - rec.received_at
        parts = [f"{stage} {duration(timings[stage])}"
                 for stage in STATE_STAGE.values() if stage in timings]
        lines.append(f"time: {', '.join(parts)}; total {duration(total)}")
    run_dir = config.work_dir / "runs" / rec.task_id
    lines.append("logs:")
    if run_dir.is_dir():
        for path in sorted((run_dir / "artifacts").glob("*/stdout")):
            lines.append(f"  ansible output    {path}")
        for name in ("logs", "outputs"):
            archive = run_dir / "archives" / f"{name}.tar.gz"
            if archive.is_file():
                lines.append(f"  {name + ' archive':<17} {archive} "
                             f"({format_bytes(archive.stat().st_size)})")
    else:
        lines.append(f"  run dir           {run_dir} (removed: older than the last "
                     f"{config.execution.keep_runs} runs, execution.keep_runs)")
    lines.append(f"  audit log         {config.audit_file} (lines with \"task_id\": "
                 f"\"{rec.task_id}\")")
    for path in log_files:
        lines.append(f"  listener log      grep {rec.task_id} {path}")
    if not log_files:
        lines.append(f"  listener log      journalctl -u fem-ansible | grep {rec.task_id} (no "
                     "listener of this config runs with --log-file now: its log was that "
                     "file, else stderr)")
    return lines


class Progress(NodeObserver):
    """``fem-ansible run`` on a terminal: event lines scroll, and below them one line is
    redrawn with the task's state, its time so far and the upload's progress.

    :param out: the terminal.
    """

    SPIN = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO):
        self.out = out
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._state = "RECEIVED"
        self._state_since = self._started
        self._upload: tuple[str, int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._spin = itertools.cycle(self.SPIN)

    def start(self) -> Progress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        with self._lock:
            self.out.write("\r\x1b[K")
            self.out.flush()

    def echo(self, line: str) -> None:
        """Print a line above the status line."""
        with self._lock:
            self.out.write(f"\r\x1b[K{line}\n")
            self._draw()

    def on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event["state"] != self._state:
                self._state, self._state_since = event["state"], time.monotonic()
                self._upload = None

    def on_upload(self, task_id: str, kind: str, sent: int, total: int) -> None:
        with self._lock:
            self._upload = (kind, sent, total)

    def status(self) -> str:
        now = time.monotonic()
        line = (f"{self._state:<11} {duration(now - self._started)} "
                f"(this stage {duration(now - self._state_since)})")
        if self._upload:
            kind, sent, total = self._upload
            pct = 100 * sent // total if total else 100
            line += f"  uploading {kind} {format_bytes(sent)} of {format_bytes(total)} ({pct}%)"
        return line

    def _draw(self) -> None:
        if self._state not in TERMINAL_STATES:
            self.out.write(f"\r\x1b[K{next(self._spin)} {self.status()}")
        self.out.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                self._draw()

