"""Record the event sequences of tests/test_verdict.py: the playbooks of
tests/data/verdict/ run through ansible-runner on the local host, each event cut to the
fields the listener reads, written to tests/data/verdict/events.json.

Run it again (``.venv/bin/python -m tests.support.record_verdict_events``) after an upgrade
of ansible-core or ansible-runner, and look at the diff.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import ansible_runner

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "tests" / "data" / "verdict"
# name: (playbook, extra-vars, inventory)
LOCAL = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
SCENARIOS: dict[str, tuple[str, dict[str, Any], str]] = {
    "all_well": ("stages.yml", {}, LOCAL),
    "stage_out_rescued": ("stages.yml", {"stage_out_fails": True, "rescue_it": True}, LOCAL),
    "stage_out_failed": ("stages.yml", {"stage_out_fails": True}, LOCAL),
    "stage_out_failed_cleanup_failed": (
        "stages.yml", {"stage_out_fails": True, "cleanup_fails": True}, LOCAL),
    "stage_out_rescued_cleanup_failed": (
        "stages.yml", {"stage_out_fails": True, "rescue_it": True, "cleanup_fails": True}, LOCAL),
    "run_failed_cleanup_rescued": (
        "stages.yml", {"run_rc": 3, "run_stderr": "no such file", "cleanup_rescues": True},
        LOCAL),
    "run_failed_ignored": ("stages.yml", {"run_rc": 3, "run_ignored": True}, LOCAL),
    "rescue_failed_again": ("stages.yml", {"refail": True}, LOCAL),
    "rescue_failed_again_always_failed": (
        "stages.yml", {"refail": True, "refail_always": True, "cleanup_fails": True}, LOCAL),
    "helper_failed": ("stages.yml", {"helper_fails": True}, LOCAL),
    "module_error_code": ("stages.yml", {"stage_out_code": "input_failed"}, LOCAL),
    "module_unknown_error_code": ("stages.yml", {"stage_out_code": "cancelled"}, LOCAL),
    "unreachable": ("stages.yml", {},
                    "target ansible_host=127.0.0.1 ansible_port=1 ansible_user=nobody\n"),
    "broken_playbook": ("broken.yml", {}, LOCAL),
}
KEEP = ("role", "task", "ignore_errors", "failures", "dark", "rescued", "ignored")
KEEP_RES = ("msg", "reason", "stderr", "fem_error_code", "ansible_stats", "results")


def cut(event: dict[str, Any]) -> dict[str, Any] | None:
    kind = event.get("event")
    if kind == "verbose":
        return {"event": kind, "stdout": event.get("stdout", "").replace(str(REPO), ".")}
    if kind not in ("playbook_on_task_start", "runner_on_ok", "runner_on_failed",
                    "runner_on_unreachable", "playbook_on_stats"):
        return None
    data = event.get("event_data", {})
    kept = {k: data[k] for k in KEEP if k in data}
    res = data.get("res")
    if isinstance(res, dict):
        kept["res"] = {k: res[k] for k in KEEP_RES if k in res}
    return {"event": kind, "event_data": kept}


def record(playbook: str, extravars: dict[str, Any], inventory: str) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as pdd:
        runner = ansible_runner.run(
            private_data_dir=pdd, project_dir=str(HERE), playbook=playbook,
            inventory=inventory, extravars=extravars, quiet=True,
            envvars={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                     "ANSIBLE_NOCOLOR": "True", "ANSIBLE_SSH_ARGS": "-o ConnectTimeout=5"},
            event_handler=lambda e: bool(events.append(e)) or True)
    return {"status": runner.status, "rc": runner.rc,
            "events": [c for c in map(cut, events) if c is not None]}


def dump(recorded: dict[str, dict[str, Any]]) -> str:
    """JSON with one event a line, so that a new recording reads as a diff of events."""
    runs = []
    for name, run in recorded.items():
        events = ",\n".join(f"  {json.dumps(e)}" for e in run["events"])
        runs.append(f" {json.dumps(name)}: {{\"status\": {json.dumps(run['status'])}, "
                    f"\"rc\": {run['rc']}, \"events\": [\n{events}\n ]}}")
    return "{\n" + ",\n".join(runs) + "\n}\n"


def main() -> None:
    recorded = {name: record(*spec) for name, spec in SCENARIOS.items()}
    (HERE / "events.json").write_text(dump(recorded))


if __name__ == "__main__":
    main()
