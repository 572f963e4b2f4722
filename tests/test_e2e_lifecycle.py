"""The task lifecycle end to end: real RabbitMQ, Docker engine, registry, git daemon and
upload endpoint, through a real ``fem-ansible listen`` process (issue 2)."""

from __future__ import annotations

import hashlib
import json
import marshal
import types
from pathlib import Path

import ansible
import pytest
import requests
from ansible.utils.collection_loader import _collection_meta

from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.services import upload_requests

pytestmark = pytest.mark.e2e


def put_input(env, task_id: str, content: bytes) -> tuple[str, str]:
    url = f"{env['FEM_TEST_UPLOAD_URL']}/inputs/{task_id}/params.json"
    requests.put(url, data=content, timeout=10).raise_for_status()
    return url + "?X-Sig=input-secret", hashlib.sha256(content).hexdigest()


# mitogen is the default execution.strategy (the fast path: fem.core's mitogen_linear);
# linear (stock Ansible) is the sites' way out, and what the fast path falls back to.
STRATEGIES = pytest.mark.parametrize("strategy", ["mitogen", "linear"])


def assert_no_fallback(listener) -> None:
    """The fast path's start-up check passed on the pinned versions: no fallback
    (tests/test_fastpath.py has it failing)."""
    assert "fast path off" not in listener.log.read_text(), listener.tail()


@STRATEGIES
def test_task_runs_end_to_end(site, strategy):
    env, orch = site.env, site.orchestrator
    tid = "e2e-ok"
    params = b'{"rounds": 3}\n'
    url, digest = put_input(env, tid, params)
    task = site.task(tid, inputs=[{"url": url, "path": "params.json", "sha256": digest}])
    listener = site.listener(site.config(execution={"strategy": strategy}))
    orch.publish(task)
    final = orch.wait_terminal(tid)
    events = orch.events(tid)

    assert [e["state"] for e in events] == [
        "RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"], final
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["_routing_key"] for e in events][-1] == f"{site.node}.{tid}.COMPLETED"
    assert final["exit_code"] == 0 and final["error"] is None
    assert final["source_commit"] == env["FEM_TEST_GIT_COMMIT"]
    assert final["image_digest"] == env["FEM_TEST_IMAGE_DIGEST"]
    assert final["host"] == "localhost"

    # The archive uploaded is the one the event describes, and holds the task's result.
    outputs = final["outputs"]
    assert "?" not in outputs["url"] and "secret" not in json.dumps(events)
    archive = uploaded_file(env, outputs["url"])
    assert len(archive) == outputs["size"]
    assert hashlib.sha256(archive).hexdigest() == outputs["sha256"]
    result = tar_members(archive)["result.txt"]
    assert b"id,age" in result and b'"rounds": 3' in result and b"hello" in result.lower()
    logs = tar_members(uploaded_file(env, final["logs"]["url"]))
    assert b"task-done" in logs["stdout.log"]

    base = f"/{site.node}/{tid}"
    methods = {r["path"]: r["method"] for r in upload_requests(env)
               if r["path"].startswith(base)}
    assert methods == {f"{base}/outputs.tar.gz": "PUT", f"{base}/logs.tar.gz": "POST"}
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    # Runs keep ansible.builtin's routing metadata, and under mitogen the import scans of
    # Mitogen's module server, for the next run: private, written whole.
    cache = site.work_dir / "import-scan-cache"
    entries = list(cache.iterdir())
    assert cache.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in entries} <= {0o600}
    assert not [p for p in entries if p.name.endswith(".tmp")]
    kept = [marshal.loads(p.read_bytes()) for p in entries]
    runtime = Path(ansible.__file__).parent / "config/ansible_builtin_runtime.yml"
    assert _collection_meta._meta_yml_to_dict(runtime.read_bytes(), None) in kept
    assert any(isinstance(v, types.CodeType) for v in kept) == (strategy == "mitogen")
    assert_no_fallback(listener)


@STRATEGIES
def test_failures_are_reported_with_their_codes(site, strategy):
    env, orch = site.env, site.orchestrator
    listener = site.listener(site.config(execution={"strategy": strategy}))
    orch.publish(site.task("exit-3", command=["sh", "-c", "echo to-stderr >&2; exit 3"]))
    orch.publish(site.task("no-image",
                             image={"ref": f"{env['FEM_TEST_REGISTRY']}/fem/missing:1"}))
    orch.publish(site.task("no-version",
                             source={"repo": env["FEM_TEST_GIT_URL"], "version": "no-such-ref"}))
    # Pull policy never: the image on the host serves, a missing one fails the task.
    orch.publish(site.task("never-present",
                           image={"ref": env["FEM_TEST_IMAGE"], "pull_policy": "never"}))
    orch.publish(site.task("never-missing", image={
        "ref": f"{env['FEM_TEST_REGISTRY']}/fem/missing:1", "pull_policy": "never"}))

    failed = orch.wait_terminal("exit-3")
    assert failed["state"] == "FAILED" and failed["exit_code"] == 3
    assert failed["error"]["code"] == "execution_failed"
    assert [e["state"] for e in orch.events("exit-3")][-2:] == ["STAGING_OUT", "FAILED"]
    logs = tar_members(uploaded_file(env, failed["logs"]["url"]))
    assert b"to-stderr" in logs["stderr.log"]

    for tid, code in (("no-image", "image_pull_failed"), ("no-version", "source_checkout_failed"),
                      ("never-missing", "image_pull_failed")):
        final = orch.wait_terminal(tid)
        assert final["state"] == "FAILED", final
        assert final["error"]["code"] == code and final["error"]["stage"] == "stage_in"
        assert [e["state"] for e in orch.events(tid)] == ["RECEIVED", "STAGING_IN", "FAILED"]
    assert "is not present" in orch.wait_terminal("never-missing")["error"]["message"]
    present = orch.wait_terminal("never-present")
    assert present["state"] == "COMPLETED", present
    assert present["image_digest"] == env["FEM_TEST_IMAGE_DIGEST"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    assert_no_fallback(listener)


def test_input_redirect_is_refused(site):
    """A redirect could carry the input's headers anywhere: it is never followed."""
    env, orch = site.env, site.orchestrator
    url, _digest = put_input(env, "redirected", b"data\n")
    target = url.split("://", 1)[1].split("/", 1)[1]
    redirect = f"{env['FEM_TEST_UPLOAD_URL']}/_redirect/{target}"
    site.listener()
    orch.publish(site.task("redirected", inputs=[{"url": redirect, "path": "p.json",
                                                  "headers": {"X-Token": "tok"}}]))
    final = orch.wait_terminal("redirected")
    assert final["state"] == "FAILED" and final["error"]["code"] == "input_failed"
    assert [e["state"] for e in orch.events("redirected")] == [
        "RECEIVED", "STAGING_IN", "FAILED"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_malformed_message_is_rejected_and_dead_lettered(site):
    orch = site.orchestrator
    site.listener()
    orch.publish(b'{"schema": "fem.task/v1", "task_id": ')
    orch.publish({"schema": "fem.task/v1", "task_id": "bad-fields", "image": {"ref": "x"},
                  "unknown": 1})
    orch.publish(site.task("after-bad"))

    rejected = orch.wait_terminal(None)
    assert rejected["state"] == "REJECTED"
    assert rejected["error"]["code"] == "invalid_message"
    named = orch.wait_terminal("bad-fields")
    assert named["state"] == "REJECTED" and "unknown" in named["error"]["message"]
    assert orch.wait_terminal("after-bad")["state"] == "COMPLETED"
    dead = orch.dead_letters()
    assert len(dead) == 2
    assert all(h["x-fem-reject-reason"] == "invalid_message" for h, _ in dead)
    assert dead[0][1] == b'{"schema": "fem.task/v1", "task_id": '


def test_long_task_keeps_its_connection(site):
    """A task running longer than three heartbeat intervals finishes on the same connection."""
    orch = site.orchestrator
    listener = site.listener(site.config(broker={"heartbeat_s": 2}))
    orch.publish(site.task("long", command=["sh", "-c", "sleep 9; echo slept"]))
    final = orch.wait_terminal("long", timeout=120)
    assert final["state"] == "COMPLETED"
    log = listener.log.read_text()
    assert log.count("connected to the broker") == 1
    assert "connection lost" not in log
