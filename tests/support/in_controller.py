"""Runs of a small playbook under fem.core's ``mitogen_linear`` with a patch group left
out or not: which tasks forked a worker, and every event, to compare a task answered in the
controller (stage markers, skips) with the same task in a worker."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fem_ansible.runner import (
    RunHooks,
    RunResult,
    RunSpec,
    collections_view,
    run_playbook,
    scan_cache_dir,
)

# Loaded at every interpreter's start (PYTHONPATH): logs the name of the task each worker
# process is forked for, found as the `self` of a frame above the fork (WorkerProcess.start).
FORK_LOG = """\
import os, sys

def _hook(event, args):
    if event != "os.fork":
        return
    frame = sys._getframe(1)
    while frame is not None:
        task = getattr(frame.f_locals.get("self"), "_task", None)
        if task is not None:
            with open(os.environ["FEM_TEST_FORK_LOG"], "a") as log:
                log.write(task.get_name() + "\\n")
            return
        frame = frame.f_back

sys.addaudithook(_hook)
"""

class Stages(RunHooks):
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.reports: dict[str, Any] = {}

    def on_stage(self, stage: str) -> None:
        self.stages.append(stage)

    def on_report(self, data: dict[str, Any]) -> None:
        self.reports.update(data)


def run_forks(tmp_path: Path, name: str, off: str, playbook: str) -> tuple[
        RunResult, Stages, list[str], list[dict[str, Any]]]:
    """One run of ``playbook`` under the fast path (``off``: the groups left out): its result,
    the stages it entered and what it reported, the tasks forked for, and its events."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(FORK_LOG)
    (tmp_path / "play.yml").write_text(playbook)
    inventory = tmp_path / "hosts"
    inventory.write_text(f"localhost ansible_connection=local "
                         f"ansible_python_interpreter={sys.executable}\n")
    forks = tmp_path / f"{name}.forks"
    forks.touch()
    pdd = tmp_path / name
    pdd.mkdir(mode=0o700)
    work = tmp_path / "work"
    spec = RunSpec(
        private_data_dir=pdd, ident=f"markers-{name}", playbook=tmp_path / "play.yml",
        inventory=inventory, limit="localhost", roles_path=[],
        collections=collections_view(work), scan_cache=scan_cache_dir(work),
        extravars={}, secrets={}, strategy="mitogen",
        env={"PYTHONPATH": f"{probe}:{Path(__file__).resolve().parents[2]}",
             "FEM_TEST_FORK_LOG": str(forks), "FEMCORE_FASTPATH_OFF": off})
    hooks = Stages()
    result = run_playbook(spec, hooks, lambda: False)
    events = sorted((json.loads(p.read_text())
                     for p in (pdd / "artifacts" / spec.ident / "job_events").iterdir()),
                    key=lambda e: e["counter"])
    return result, hooks, forks.read_text().splitlines(), events


# What differs between any two runs: ids and times (``res`` is compared without its times).
VOLATILE = {"uuid", "play_uuid", "playbook_uuid", "task_uuid", "start", "end", "duration"}


def shape(events: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each event's kind, output and data, without what differs from run to run."""
    def data(event: dict[str, Any]) -> dict[str, Any]:
        found = {k: v for k, v in event.get("event_data", {}).items() if k not in VOLATILE}
        if isinstance(found.get("res"), dict):
            found["res"] = {k: v for k, v in found["res"].items() if k not in VOLATILE}
        return found
    return [(e["event"], e.get("stdout", ""), data(e)) for e in events]
