"""`submit --wait`, `cancel` and `tasks --json` as a sysadmin uses them (issue 20 item 7),
through the real broker and listener."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.harness import FEM

pytestmark = pytest.mark.e2e


def fem(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEM, *args], capture_output=True, text=True, timeout=300, **kw)


def test_submit_says_at_once_there_is_no_consumer_and_keeps_waiting(site, tmp_path):
    config = site.config()
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(site.task("waits")))
    submit = subprocess.Popen([FEM, "submit", "--wait", "--timeout", "240", "--config",
                               str(config), str(task_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        notice = submit.stderr.readline()  # before any listener exists
        assert f"no listener consumes fem.tasks.{site.node}" in notice, notice
        site.listener(config)
        out, err = submit.communicate(timeout=240)
    finally:
        submit.kill()
    assert submit.returncode == 0, out + err
    assert out.splitlines()[-1].split()[1] == "COMPLETED"

    listed = json.loads(fem("tasks", "--json", "--config", str(config)).stdout)
    assert [(t["task_id"], t["state"], t["exit_code"]) for t in listed] == \
        [("waits", "COMPLETED", 0)]
    one = json.loads(fem("tasks", "waits", "--json", "--config", str(config)).stdout)
    assert one["events"][-1]["state"] == "COMPLETED" and "run" in one["stage_seconds"]
    assert "X-Sig" not in json.dumps(one)  # the journal's upload URLs stay in the journal

    ended = fem("cancel", "waits", "--config", str(config))
    assert ended.returncode == 1 and "has ended already (COMPLETED)" in ended.stderr
    unknown = fem("cancel", "no-such-task", "--config", str(config))
    assert unknown.returncode == 1 and "no task no-such-task" in unknown.stderr
