"""The podman executor end to end (issue 6): tasks with ``executor: podman`` run on Debian's
podman through a real listener, broker, registry, git daemon and upload endpoint."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers, task_name

pytestmark = pytest.mark.e2e


@pytest.fixture
def podman_site(site):
    """A site whose tasks may run on podman; the test registry is plain HTTP on loopback,
    which podman (unlike dockerd) only pulls from when the site says so."""
    site.podman_config = site.config(
        policy={"executors": {"allow": ["docker", "podman"]}},
        execution={"max_parallel": 2, "shutdown_grace_s": 30,
                   "podman": {"insecure_registries": [site.env["FEM_TEST_REGISTRY"]]}},
    )
    return site


def podman_starts(name: str, since: str) -> list[str]:
    """Ids of the containers of that name podman started since ``since`` (epoch seconds)."""
    return subprocess.run(
        ["podman", "events", "--stream=false", "--since", since, "--filter", f"container={name}",
         "--filter", "event=start", "--format", "{{.ID}}"],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()


def podman_running(name: str) -> bool:
    return name in subprocess.run(
        ["podman", "ps", "--format", "{{.Names}}", "--filter", f"name={name}"],
        capture_output=True, text=True, check=True).stdout.split()


def test_tasks_run_on_podman(podman_site):
    site, env, orch = podman_site, podman_site.env, podman_site.orchestrator
    since = str(int(time.time()) - 1)
    site.listener(site.podman_config)
    tid = "podman-ok"
    sh, dash_c, script = site.task(tid)["command"]
    command = [sh, dash_c, script + " && echo scratch > /fem/scratch/s.txt"
               " && cp /fem/scratch/s.txt /fem/output/ && id -u > /fem/output/uid.txt"]
    # Pulled anew: podman's own store may hold the tag from a registry seeded earlier (the
    # seeded image's digest changes when the registry storage is made anew).
    orch.publish(site.task(tid, executor="podman", command=command,
                           image={"ref": env["FEM_TEST_IMAGE"], "pull_policy": "always"},
                           scratch=[{"name": "work", "mount": "/fem/scratch"}]))
    orch.publish(site.task("podman-exit-3", executor="podman",
                           command=["sh", "-c", "echo to-stderr >&2; exit 3"]))
    orch.publish(site.task("podman-timeout", executor="podman", command=[
        "sh", "-c", "trap 'exit 143' TERM; echo waiting; sleep 300 & wait"],
                           resources={"memory": "128Mi", "timeout_s": 3}))

    final = orch.wait_terminal(tid)
    events = orch.events(tid)
    assert [e["state"] for e in events] == [
        "RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"], events
    assert final["exit_code"] == 0 and final["error"] is None
    assert final["image_digest"] == env["FEM_TEST_IMAGE_DIGEST"]
    assert final["source_commit"] == env["FEM_TEST_GIT_COMMIT"]
    outputs = tar_members(uploaded_file(env, final["outputs"]["url"]))
    assert b"id,age" in outputs["result.txt"] and b"hello" in outputs["result.txt"].lower()
    assert outputs["s.txt"] == b"scratch\n"  # the scratch dir, bound by podman
    assert outputs["uid.txt"] == b"65534\n"  # the busybox image's user is root: fallback
    logs = tar_members(uploaded_file(env, final["logs"]["url"]))
    assert b"task-done" in logs["stdout.log"] and logs["exit_code"] == b"0\n"
    # podman, not Docker, ran it, once.
    assert len(podman_starts(task_name(site.node, tid), since)) == 1

    failed = orch.wait_terminal("podman-exit-3")
    assert failed["state"] == "FAILED" and failed["exit_code"] == 3, orch.events("podman-exit-3")
    assert failed["error"]["code"] == "execution_failed"
    assert [e["state"] for e in orch.events("podman-exit-3")][-2:] == ["STAGING_OUT", "FAILED"]
    logs = tar_members(uploaded_file(env, failed["logs"]["url"]))
    assert b"to-stderr" in logs["stderr.log"] and b"to-stderr" not in logs["stdout.log"]

    # At the timeout podman_task stops the container itself.
    timed_out = orch.wait_terminal("podman-timeout")
    assert timed_out["state"] == "TIMED_OUT", orch.events("podman-timeout")
    assert timed_out["exit_code"] is None and timed_out["error"]["code"] == "timeout"
    logs = tar_members(uploaded_file(env, timed_out["logs"]["url"]))
    assert b"waiting" in logs["stdout.log"] and logs["exit_code"] == b"null\n"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_cancel_stops_the_podman_container(podman_site):
    site, orch = podman_site, podman_site.orchestrator
    site.listener(site.podman_config)
    tid = "podman-cancel"
    name = task_name(site.node, tid)
    orch.publish(site.task(tid, executor="podman", command=["sh", "-c", "echo begun; sleep 300"]))
    orch.wait_state(tid, "RUNNING")
    deadline = time.monotonic() + 120
    while not podman_running(name):
        assert time.monotonic() < deadline, "the podman container never ran"
        time.sleep(0.2)
    orch.cancel(tid)

    final = orch.wait_terminal(tid, timeout=120)
    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled"
    assert final["exit_code"] is None
    assert [e["state"] for e in orch.events(tid)][-2:] == ["STAGING_OUT", "CANCELLED"]
    assert b"begun" in tar_members(uploaded_file(site.env, final["logs"]["url"]))["stdout.log"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_plain_http_registry_needs_the_site_setting(site):
    """Without ``execution.podman.insecure_registries`` podman verifies TLS, so the pull
    from the plain-HTTP test registry fails: the setting is what lets it through."""
    orch = site.orchestrator
    site.listener(site.config(policy={"executors": {"allow": ["podman"]}}))
    tid = "podman-tls"
    orch.publish(site.task(tid, executor="podman",
                           image={"ref": site.env["FEM_TEST_IMAGE"], "pull_policy": "always"}))
    final = orch.wait_terminal(tid)
    assert final["state"] == "FAILED", orch.events(tid)
    assert final["error"]["code"] == "image_pull_failed" and final["error"]["stage"] == "stage_in"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
