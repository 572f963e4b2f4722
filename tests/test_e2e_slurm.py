"""The Slurm executor end to end (issue 9): a real one-node Slurm cluster (tests/support/slurm.py)
whose job step runs the task's container on the local Docker engine, through a real listener,
broker, registry, git daemon and upload endpoint."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.support import slurm
from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers, task_name

pytestmark = pytest.mark.e2e

JOB_ID = re.compile(r"Slurm job (\d+)")


@pytest.fixture(scope="session")
def cluster():
    """The cluster, started for these tests unless one runs; the last test process to be
    done with it stops what was started."""
    slurm.acquire()
    yield
    slurm.release()


@pytest.fixture
def slurm_site(site, cluster):
    """A site whose tasks may run on Slurm; tasks choose it with ``executor: slurm``."""
    site.slurm_config = site.config(
        policy={"executors": {"allow": ["docker", "slurm"]}},
        execution={"max_parallel": 2, "default_executor": "slurm", "shutdown_grace_s": 30},
    )
    return site


def job_ids(events) -> set[str]:
    return {m.group(1) for e in events for m in [JOB_ID.search(e["message"] or "")] if m}


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def active_jobs(name: str) -> list[str]:
    """Jobs of that name the cluster still holds (pending, running, completing)."""
    return subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                          text=True, check=True).stdout.split("\n")[:-1]


def wait_message(orch, task_id: str, pattern: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orch.drain(0.2)
        for event in orch.events(task_id):
            if re.search(pattern, event["message"] or ""):
                return event
    raise AssertionError(f"no event matching {pattern!r} for {task_id}: "
                         f"{[(e['state'], e['message']) for e in orch.events(task_id)]}")


def wait_output(node: str, text: str, timeout: float = 60) -> None:
    """Until a container of ``node`` has written ``text`` to its stdout: a job Slurm
    reports running may not have started its container's command yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=fem.node_id={node}"],
                             capture_output=True, text=True, check=True).stdout.split()
        for cid in ids:
            out = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
            if text in out.stdout:
                return
        time.sleep(0.2)
    raise AssertionError(f"no container of {node} wrote {text!r} within {timeout}s")


def test_tasks_run_as_slurm_jobs(slurm_site):
    site, env, orch = slurm_site, slurm_site.env, slurm_site.orchestrator
    site.listener(site.slurm_config)
    orch.publish(site.task("slurm-ok"))
    orch.publish(site.task("slurm-exit-3", command=["sh", "-c", "echo to-stderr >&2; exit 3"]))
    orch.publish(site.task("slurm-timeout", command=["sh", "-c", "echo waiting; sleep 300"],
                           resources={"memory": "128Mi", "timeout_s": 3}))

    final = orch.wait_terminal("slurm-ok")
    events = orch.events("slurm-ok")
    assert final["state"] == "COMPLETED" and final["exit_code"] == 0, events
    states = [e["state"] for e in events]
    assert states[:3] == ["RECEIVED", "STAGING_IN", "RUNNING"]
    assert states[-2:] == ["STAGING_OUT", "COMPLETED"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # Its progress events name one job, which Slurm ran under the task's name.
    progress = [e for e in events if e["state"] == "RUNNING"][1:]
    assert progress and all("Slurm job" in e["message"] for e in progress), events
    (job_id,) = job_ids(events)
    job = scontrol(job_id)
    name = task_name(site.node, "slurm-ok")
    assert job["JobName"] == name and job["JobState"] == "COMPLETED"
    assert job["ExitCode"] == "0:0"
    assert final["source_commit"] == env["FEM_TEST_GIT_COMMIT"]

    result = tar_members(uploaded_file(env, final["outputs"]["url"]))["result.txt"]
    assert b"id,age" in result and b"hello" in result.lower()
    logs = tar_members(uploaded_file(env, final["logs"]["url"]))
    assert b"task-done" in logs["stdout.log"]

    failed = orch.wait_terminal("slurm-exit-3")
    assert failed["state"] == "FAILED" and failed["exit_code"] == 3, orch.events("slurm-exit-3")
    assert failed["error"]["code"] == "execution_failed"
    assert [e["state"] for e in orch.events("slurm-exit-3")][-2:] == ["STAGING_OUT", "FAILED"]
    (failed_job,) = job_ids(orch.events("slurm-exit-3"))
    assert scontrol(failed_job)["ExitCode"] == "3:0"
    assert b"to-stderr" in tar_members(uploaded_file(env, failed["logs"]["url"]))["stderr.log"]

    # At the timeout the job is cancelled and its step stops the container.
    timed_out = orch.wait_terminal("slurm-timeout")
    assert timed_out["state"] == "TIMED_OUT", orch.events("slurm-timeout")
    assert timed_out["exit_code"] is None and timed_out["error"]["code"] == "timeout"
    (timeout_job,) = job_ids(orch.events("slurm-timeout"))
    assert scontrol(timeout_job)["JobState"] == "CANCELLED"
    assert b"waiting" in tar_members(uploaded_file(env, timed_out["logs"]["url"]))["stdout.log"]

    for tid in ("slurm-ok", "slurm-exit-3", "slurm-timeout"):
        assert active_jobs(task_name(site.node, tid)) == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_cancel_while_running_leaves_no_job_and_no_container(slurm_site):
    site, orch = slurm_site, slurm_site.orchestrator
    site.listener(site.slurm_config)
    tid = "slurm-cancel"
    orch.publish(site.task(tid, command=["sh", "-c", "echo started; sleep 300"]))
    wait_message(orch, tid, r"Slurm job \d+ is running")
    wait_output(site.node, "started")  # else the cancel may land before the tool's echo
    orch.cancel(tid)

    final = orch.wait_terminal(tid)
    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled"
    assert final["exit_code"] is None
    assert [e["state"] for e in orch.events(tid)][-2:] == ["STAGING_OUT", "CANCELLED"]
    (job_id,) = job_ids(orch.events(tid))
    assert scontrol(job_id)["JobState"] == "CANCELLED"
    assert active_jobs(task_name(site.node, tid)) == []
    logs = tar_members(uploaded_file(site.env, final["logs"]["url"]))
    assert b"started" in logs["stdout.log"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_listener_killed_while_the_job_runs_finds_it_again(slurm_site):
    site, orch = slurm_site, slurm_site.orchestrator
    tid = "slurm-restart"
    name = task_name(site.node, tid)
    since = subprocess.run(["date", "+%s"], capture_output=True, text=True,
                           check=True).stdout.strip()
    listener = site.listener(site.slurm_config)
    orch.publish(site.task(tid, command=[
        "sh", "-c", "echo first; sleep 12; echo once >> /fem/output/runs.txt; echo task-done"]))
    wait_message(orch, tid, r"Slurm job \d+ is running")
    listener.kill9()
    assert len(active_jobs(name)) == 1  # the job outlives the listener

    site.listener(site.slurm_config, name="listener2.log")
    final = orch.wait_terminal(tid)
    events = orch.events(tid)
    assert final["state"] == "COMPLETED" and final["attempt"] == 2, events
    assert [e["state"] for e in events].count("COMPLETED") == 1
    # The second attempt found the first one's job: one job id in every message, one
    # container start on the engine, one run of the command.
    attempt2 = [e for e in events if e["attempt"] == 2 and JOB_ID.search(e["message"] or "")]
    assert attempt2, events
    (job_id,) = job_ids(events)
    assert scontrol(job_id)["JobName"] == name
    starts = subprocess.run(
        ["docker", "events", "--since", since, "--until", str(int(time.time()) + 1),
         "--filter", f"container={name}", "--filter", "event=start", "--format", "{{.ID}}"],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert len(starts) == 1, starts
    result = tar_members(uploaded_file(site.env, final["outputs"]["url"]))
    assert result["runs.txt"] == b"once\n"
    assert active_jobs(name) == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
