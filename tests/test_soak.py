"""Soak: many short tasks through one listener with random kill -9 restarts and one broker
restart; every task ends in exactly one terminal event and nothing is left behind (issue 3).

The size is ``SOAK_TASKS`` (default 8, what CI runs); the README's figures come from
``SOAK_TASKS=200``.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest

from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.services import start_rabbitmq, stop_rabbitmq

pytestmark = [pytest.mark.e2e, pytest.mark.serial]

TERMINAL = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED", "REJECTED"}


def test_soak_with_kills_and_a_broker_restart(site):
    size = int(os.environ.get("SOAK_TASKS", "8"))
    rng = random.Random(size)
    orch = site.orchestrator
    listener = site.listener(site.config(execution={"max_parallel": 2, "max_attempts": 10}))
    ids = [f"soak-{i}" for i in range(size)]
    for tid in ids:
        orch.publish(site.task(tid, command=["sh", "-c", "echo ok > /fem/output/r.txt"],
                               source=None, datasets=[]))
    started = progress_at = time.monotonic()
    kills = broker_restarts = 0
    done_at_kill = 0

    def finished() -> set[str]:
        orch.drain(0.5)
        return {e["task_id"] for e in orch.received if e["state"] in TERMINAL}

    # A kill -9 first, then the broker restart, both a few seconds apart so that they land
    # while tasks are in flight however fast tasks are; then kills at random, each once a
    # task has finished since the last one: however slow the machine, tasks get done.  A
    # run fails when no task finishes for 5 minutes (a hang), not on its total time.
    done = 0
    while done < size:
        time.sleep(rng.uniform(2, 6) if kills + broker_restarts < 2 else rng.uniform(8, 20))
        if (now_done := len(finished())) > done:
            done, progress_at = now_done, time.monotonic()
        assert time.monotonic() - progress_at < 300, f"stuck at {done}/{size} finished"
        if kills and not broker_restarts:
            orch.conn.close()
            stop_rabbitmq()
            time.sleep(3)
            start_rabbitmq()
            orch.reconnect()
            broker_restarts += 1
        elif done < size and (not kills or done > done_at_kill):
            listener.kill9()
            kills += 1
            done_at_kill = done
            listener.start()
    elapsed = time.monotonic() - started
    orch.drain(2.0)
    listener.stop()

    terminal_seqs: dict[str, set[int]] = {}
    for e in orch.received:
        if e["state"] in TERMINAL:
            terminal_seqs.setdefault(e["task_id"], set()).add(e["seq"])
    duplicates = [t for t, seqs in terminal_seqs.items() if len(seqs) != 1]
    states: Counter[str] = Counter()
    for tid in ids:
        final = next(e for e in orch.events(tid) if e["state"] in TERMINAL)
        states[final["state"] + (f"/{final['error']['code']}" if final["error"] else "")] += 1
    print(f"\nsoak: {size} tasks, {kills} kill -9, {broker_restarts} broker restart, "
          f"{elapsed:.0f}s; terminal: {dict(states)}; duplicates: {len(duplicates)}")
    assert set(terminal_seqs) == set(ids)
    # Only the listener's own give-up is an acceptable failure here.
    assert set(states) <= {"COMPLETED", "FAILED/interrupted"}, states
    assert duplicates == []
    assert kills >= 1 and broker_restarts == 1
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
