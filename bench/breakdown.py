"""A checkout's task time, phase by phase and playbook task by playbook task, over many tasks.

    .venv/bin/python bench/breakdown.py                        # this checkout, 6 tasks
    .venv/bin/python bench/breakdown.py --tree DIR --tasks 6   # another checkout's harness

One listener (the benchmark's services and task) takes a warm-up task, then ``--tasks``
measured ones, one at a time.  For each, from its run's job events (their ``created`` times,
as bench/profile.py reads them): published to COMPLETED, the controller CPU, the phases
(published to ansible-playbook's first event, to ``playbook_on_start``, to the first task,
the play to ``playbook_on_stats``, then to COMPLETED) and each playbook task's own duration
(its ``playbook_on_task_start`` to its result).  Prints them as one JSON object of lists;
bench/before_after.py ``--breakdown`` runs it on both sides and prints the medians side by
side, which is how a few tenths of a second a task are told from a whole task's run-to-run
noise (bench/RESULTS.md, issue 17).  ``--tree`` uses that checkout's bench/run.py and
harness, so its listener runs what it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any


def created(job_event: dict) -> float:
    """An ansible-runner job event's ``created`` (ISO 8601 with offset), in epoch seconds."""
    return datetime.fromisoformat(job_event["created"]).timestamp()


def job_events(work_dir: Path, task_id: str) -> tuple[Path, list[dict]]:
    """The ``job_events`` dir of task ``task_id``'s run under a listener's ``work_dir``, and
    its events in the order ansible-runner counted them."""
    found = next(p for p in work_dir.rglob("job_events") if f"/{task_id}/" in str(p))
    return found, sorted((json.loads(p.read_text()) for p in found.iterdir()),
                         key=lambda e: e["counter"])


def measure(tasks: int) -> dict[str, Any]:
    from run import Bench

    bench = Bench(quick=True)
    node = f"bd{uuid.uuid4().hex[:6]}"
    lst, orch = bench.listener(node)
    out: dict[str, Any] = {"phases": {}, "tasks": {}}

    def add(name: str, value: float) -> None:
        out["phases"].setdefault(name, []).append(value)

    # A checkout from before issue 30 counts no CPU by cgroup and has nothing to close.
    cpu = getattr(bench, "cpu", None)
    try:
        bench.fem_once(lst, orch, node, "warm")
        for i in range(tasks):
            cpu0 = cpu(node) if cpu else 0.0
            t0 = time.time()
            total = bench.fem_once(lst, orch, node, f"m{i}")
            add("published to COMPLETED (s)", total)
            if cpu:
                add("controller CPU (s)", cpu(node) - cpu0)
            _, events = job_events(bench.tmp / node / "work", f"m{i}")
            at = {e["event"]: created(e) for e in reversed(events)}  # each one's first
            first_task = at["playbook_on_task_start"]
            stats = created(next(e for e in events if e["event"] == "playbook_on_stats"))
            add("published to first event (s)", created(events[0]) - t0)
            add("first event to playbook start (s)", at["playbook_on_start"] - created(events[0]))
            add("playbook start to first task (s)", first_task - at["playbook_on_start"])
            add("play: first task to stats (s)", stats - first_task)
            add("stats to COMPLETED (s)", t0 + total - stats)
            started: tuple[str, float] = ("", first_task)
            for e in events:
                data = e.get("event_data", {})
                if e["event"] == "playbook_on_task_start":
                    started = (f"{data.get('role', '')}: {data.get('task', '')}", created(e))
                elif e["event"] in ("runner_on_ok", "runner_on_skipped", "runner_on_failed"):
                    out["tasks"].setdefault(started[0], []).append(created(e) - started[1])
    finally:
        lst.stop()
        orch.close()
        getattr(bench, "close", lambda: None)()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose bench/run.py and harness to use")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve() / "bench"))
    print(json.dumps(measure(args.tasks)))


if __name__ == "__main__":
    main()
