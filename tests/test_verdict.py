"""Ansible's verdict on a run (fem_ansible.verdict), from event sequences Ansible really
sent: tests/data/verdict/events.json, recorded by tests/support/record_verdict_events.py
from the playbooks beside it (ansible-core 2.19, ansible-runner 2.4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fem_ansible.stages import Stage
from fem_ansible.verdict import Failure, PlayWatcher

RECORDED = json.loads(
    (Path(__file__).parent / "data" / "verdict" / "events.json").read_text())


class Seen:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.reports: list[dict[str, Any]] = []

    def on_stage(self, stage: str) -> None:
        self.stages.append(stage)

    def on_report(self, data: dict[str, Any]) -> None:
        self.reports.append(data)


def replay(name: str) -> tuple[Failure | None, Seen]:
    run = RECORDED[name]
    seen = Seen()
    watcher = PlayWatcher(seen)
    for event in run["events"]:
        watcher.event(event)
    return watcher.verdict(run["status"], run["rc"]), seen


@pytest.mark.parametrize("name", ["all_well", "stage_out_rescued", "run_failed_ignored"])
def test_rescued_and_ignored_failures_are_no_failure(name):
    failure, seen = replay(name)
    assert failure is None
    assert seen.stages == ["stage_in", "run", "stage_out", "done", "cleanup"]
    # Markers are not reports; what roles report is.
    assert seen.reports == [{"fem_exit_code": 0}]


@pytest.mark.parametrize(("name", "expected"), [
    ("stage_out_failed", Failure(
        "stage_out", "stage_out_failed",
        "site_stage_out: Archive the outputs: non-zero return code")),
    # A failure in cleanup (always) never hides the stage's.
    ("stage_out_failed_cleanup_failed", Failure(
        "stage_out", "stage_out_failed",
        "site_stage_out: Archive the outputs: non-zero return code")),
    # The stage-out's own failure was rescued: the cleanup's is the one.
    ("stage_out_rescued_cleanup_failed", Failure(
        "stage_out", "stage_out_failed", "site_cleanup: Remove the container: the engine is down")),
    # The cleanup's rescued failure comes after the run's, which was not rescued.
    ("run_failed_cleanup_rescued", Failure(
        "run", "execution_failed", "Run the job: non-zero return code: no such file")),
    # The rescue failed again: its failure is the one, not the one it rescued.
    ("rescue_failed_again", Failure(
        "run", "execution_failed",
        "Fall back to the accounting spool: spool full after Post to the accounting service")),
    # ... nor the inner always's, nor the cleanup's that came after it.
    ("rescue_failed_again_always_failed", Failure(
        "run", "execution_failed",
        "Fall back to the accounting spool: spool full after Post to the accounting service")),
    # A helper role of any name is in the stage (and step) of the marker before it.
    ("helper_failed", Failure(
        "stage_in", "source_checkout_failed", "site_helper: Fetch from the mirror: mirror down")),
    # A known fem_error_code of the failed task wins over the stage's code ...
    ("module_error_code", Failure(
        "stage_out", "input_failed",
        "site_stage_out: Check the output size: outputs over the limit")),
    # ... a code a task may not give does not.
    ("module_unknown_error_code", Failure(
        "stage_out", "stage_out_failed",
        "site_stage_out: Check the output size: outputs over the limit")),
])
def test_the_failure_that_ended_the_play(name, expected):
    failure, _ = replay(name)
    assert failure == expected


def test_unreachable_host():
    failure, seen = replay("unreachable")
    assert failure is not None and failure.unreachable
    assert (failure.stage, failure.code) == ("run", "execution_failed")
    assert failure.message.startswith("Run the job: host unreachable: ")
    # Nothing runs on an unreachable host after it, not even cleanup.
    assert seen.stages == ["stage_in", "run"]


def test_a_play_that_never_started_fails_with_ansibles_error_and_rc():
    failure, seen = replay("broken_playbook")
    assert failure is not None and not failure.unreachable
    assert (failure.stage, failure.code) == ("stage_in", "input_failed")
    assert failure.message.startswith("ansible-playbook failed (rc 1): [ERROR]: the role "
                                      "'no_such_role' was not found")
    assert seen.stages == []


@pytest.mark.parametrize(("status", "message"), [
    ("timeout", "the playbook outlived its time limit"),
    ("canceled", "the playbook was stopped"),
])
def test_a_stopped_run_fails_in_the_stage_it_was_in(status, message):
    run = RECORDED["stage_out_rescued"]
    watcher = PlayWatcher(Seen())
    for event in run["events"]:
        if event["event"] == "playbook_on_stats":
            break
        watcher.event(event)
    assert watcher.verdict(status, 254) == Failure("stage_out", "stage_out_failed", message)


def test_failed_status_with_clean_stats_is_still_a_failure():
    """Ansible's exit code counts: a run ansible-runner calls failed is never a success."""
    watcher = PlayWatcher(Seen())
    for event in RECORDED["all_well"]["events"]:
        watcher.event(event)
    assert watcher.verdict("failed", 3) == Failure(
        "stage_out", "stage_out_failed", "ansible-playbook failed (rc 3)")


def failed_once(event_data: dict[str, Any]) -> Failure | None:
    """The verdict on a run whose one failure event was ``event_data``."""
    watcher = PlayWatcher(Seen())
    watcher.event({"event": "runner_on_failed", "event_data": event_data})
    watcher.event({"event": "playbook_on_stats", "event_data": {"failures": {"h": 1}}})
    return watcher.verdict("failed", 2)


def test_loop_failure_names_the_failed_item():
    assert failed_once({
        "role": "fem_volumes", "task": "Download the inputs",
        "res": {"msg": "One or more items failed", "results": [
            {"failed": False, "msg": "ok"},
            {"failed": True, "msg": "HTTP Error 404", "fem_error_code": "input_failed"}]},
    }) == Failure("stage_in", "input_failed", "fem_volumes: Download the inputs: HTTP Error 404")


def test_a_no_log_failure_says_so_and_nothing_more():
    censored = "the output has been hidden due to the fact that 'no_log: true' was specified " \
               "for this result"
    assert failed_once({
        "role": "fem_image", "task": "Write the registry credentials",
        "res": {"censored": censored, "changed": False},
    }) == Failure("stage_in", "input_failed",
                  f"fem_image: Write the registry credentials: {censored}")


def test_a_command_failing_without_stderr_gives_its_exit_code():
    """Ansible says "non-zero return code" and nothing else when a command fails silently;
    the recorded events keep no ``rc``, a real run's do (issue 31)."""
    run = json.loads(json.dumps(RECORDED["stage_out_failed"]))
    for event in run["events"]:
        if event["event"] == "runner_on_failed":
            event["event_data"]["res"]["rc"] = 3
    watcher = PlayWatcher(Seen())
    for event in run["events"]:
        watcher.event(event)
    assert watcher.verdict(run["status"], run["rc"]) == Failure(
        "stage_out", "stage_out_failed",
        "site_stage_out: Archive the outputs: non-zero return code (exit code 3)")


def test_the_task_playbooks_markers_are_exactly_the_stages():
    """playbooks/task.yml writes its markers as YAML literals: they name every Stage, in
    the order of the enum, and nothing else, so that neither can change without the other."""
    play = yaml.safe_load((Path(__file__).parents[1] / "playbooks" / "task.yml").read_text())

    def markers(tasks: list[dict[str, Any]]) -> list[str]:
        found = []
        for task in tasks:
            for section in ("block", "rescue", "always"):
                found += markers(task.get(section) or [])
            stats = task.get("ansible.builtin.set_stats") or {}
            if "fem_stage" in (stats.get("data") or {}):
                found.append(stats["data"]["fem_stage"])
        return found

    found = [m for task_list in play for m in markers(task_list["tasks"])]
    assert list(dict.fromkeys(found)) == [str(stage) for stage in Stage]
    assert all(isinstance(m, str) and m in tuple(Stage) for m in found)
