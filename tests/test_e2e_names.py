"""Names by construction (issue 26), through a real listener, broker, engine, registry, git
daemon and upload endpoint: two tasks whose ids, joined with ``-``, once named the same
object (the account reader of ``vic`` was task ``vic-accounts``' container; scratch ``x-y``
of ``s1`` and scratch ``y`` of ``s1-x`` were one volume) now never touch each other."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from fem_ansible import naming
from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers

pytestmark = pytest.mark.e2e

# Runs until the test lets it finish (a file in its output dir), whatever the timing.
WAIT_GO = "until [ -e /fem/output/go ]; do sleep 0.2; done"


def running_container(node_id: str, task_id: str) -> dict | None:
    """``docker inspect`` of the task's running container, found by its exact labels (so
    this works whatever the naming rule)."""
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=fem.node_id={node_id}",
                          "--filter", f"label=fem.task_id={task_id}"],
                         capture_output=True, text=True, check=True).stdout.split()
    if len(ids) != 1:
        return None
    out = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]


def wait_running(node_id: str, task_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = running_container(node_id, task_id)
        if info and info["State"]["Running"]:
            return info
        time.sleep(0.2)
    raise AssertionError(f"the container of {task_id} never ran")


def let_finish(info: dict) -> None:
    """Create ``go`` in the output dir the running container ``info`` has mounted."""
    (output,) = [m["Source"] for m in info["Mounts"] if m["Destination"] == "/fem/output"]
    (Path(output) / "go").touch()


def test_a_task_never_removes_the_container_of_a_task_named_like_its_reader(site):
    """Task ``vic``'s cleanup removes its own account reader: never ``vic-accounts``'
    container, which runs meanwhile and completes untouched."""
    orch = site.orchestrator
    site.listener(site.config(execution={"max_parallel": 2}))
    orch.publish(site.task("vic-accounts", command=[
        "sh", "-c", f"{WAIT_GO}; echo still-here > /fem/output/result.txt; echo task-done"]))
    other = wait_running(site.node, "vic-accounts")
    orch.publish(site.task("vic"))

    assert orch.wait_terminal("vic")["state"] == "COMPLETED", orch.events("vic")
    after = running_container(site.node, "vic-accounts")
    assert after is not None and after["Id"] == other["Id"], "vic's cleanup touched it"
    let_finish(other)
    final = orch.wait_terminal("vic-accounts")
    assert final["state"] == "COMPLETED", orch.events("vic-accounts")
    outputs = tar_members(uploaded_file(site.env, final["outputs"]["url"]))
    assert outputs["result.txt"] == b"still-here\n"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_two_tasks_whose_joined_names_meet_share_no_scratch(site):
    """Task ``s1`` with scratch ``x-y`` and task ``s1-x`` with scratch ``y``: each sees only
    what it wrote to its scratch, both complete, nothing is left."""
    orch = site.orchestrator
    site.listener(site.config(execution={"max_parallel": 2}))
    orch.publish(site.task("s1", scratch=[{"name": "x-y", "mount": "/scratch"}], command=[
        "sh", "-c", "echo secret-of-s1 > /scratch/s1.txt; " + WAIT_GO +
        "; ls -A /scratch > /fem/output/scratch.txt"]))
    first = wait_running(site.node, "s1")
    # Named and labelled by the rule: the container and the volume of its scratch.
    assert first["Name"] == "/" + naming.object_name(site.node, "s1", naming.TASK)
    assert first["Config"]["Labels"]["fem.purpose"] == naming.TASK
    (volume,) = [m["Name"] for m in first["Mounts"] if m["Destination"] == "/scratch"]
    assert volume == naming.object_name(site.node, "s1", naming.SCRATCH, "x-y")
    made = json.loads(subprocess.run(["docker", "volume", "inspect", volume],
                                     capture_output=True, text=True, check=True).stdout)[0]
    assert made["Labels"] == {"fem.node_id": site.node, "fem.task_id": "s1",
                              "fem.purpose": naming.SCRATCH}
    orch.publish(site.task("s1-x", scratch=[{"name": "y", "mount": "/scratch"}], command=[
        "sh", "-c", "ls -A /scratch > /fem/output/scratch.txt; cat /scratch/* "
        ">> /fem/output/scratch.txt; echo planted > /scratch/planted.txt; true"]))

    second = orch.wait_terminal("s1-x")
    assert second["state"] == "COMPLETED", orch.events("s1-x")
    seen = tar_members(uploaded_file(site.env, second["outputs"]["url"]))["scratch.txt"]
    assert seen == b"", f"s1-x saw s1's scratch: {seen!r}"
    let_finish(first)
    final = orch.wait_terminal("s1")
    assert final["state"] == "COMPLETED", orch.events("s1")
    seen = tar_members(uploaded_file(site.env, final["outputs"]["url"]))["scratch.txt"]
    assert seen == b"s1.txt\n", f"s1's scratch holds another task's files: {seen!r}"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
