"""The legacy FEM-client protocol end to end (issue 5): the test plays the existing
FEM-orchestrator on the real broker (default exchange, exclusive callback queue, correlation
id, chunked reply checked by sha256) against a real ``fem-ansible listen`` with
``legacy.enabled``; tasks run through the real engine and registry."""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
import time

import pytest

from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.legacy_orchestrator import LegacyOrchestrator, legacy_body
from tests.support.services import load_env

pytestmark = pytest.mark.e2e

CHUNK = 4096
SCRIPT = (
    'mkdir -p /sandbox/sub && cat /data/patients.csv > /sandbox/sub/copy.csv'
    ' && { echo "site=$SITE"; cat /fem/received/in.txt 2>/dev/null; true; } > /sandbox/out.txt'
    # No '|' anywhere: it is the protocol's field separator.
    " && printf '{\"ok\": true, \"pad\": \"%09000d\"}' 0 && exit \"$1\""
)


def task_info(**extra):
    info = {
        "_id": "sandbox-writer", "name": "writer", "author": "test", "version": "1",
        "image": {"label": "x", "repository": f"{load_env()['FEM_TEST_REGISTRY']}/fem",
                  "name": "busybox", "tag": "1", "hash": "image_hash_value"},
        "port_mappings": [], "var_envs": {"SITE": "$SITE_NAME"},
        "volumes": [{"host_path": "$SANDBOX_PATH/%%user_id%%/%%execution_id%%",
                     "container_path": "/sandbox"},
                    {"host_path": "$DATA_PATH", "container_path": "/data"}],
        "cpus": "", "memory": "128Mi", "gpus": "", "inputs": "", "arguments": "",
        "outputs": {"model_dir": "", "move_to": ""}, "persistent": False, "pre_checks": False,
        "source_code": {"url": ""},
        "command": {"base": "sh -c", "args": [
            {"id": "script", "type": "string", "default_value": SCRIPT, "position": 1,
             "prefix": "", "separate": True, "required": True},
            {"id": "name", "type": "string", "default_value": "legacy", "position": 2},
            {"id": "code", "type": "int", "default_value": 0, "position": 3,
             "required": True},
        ]},
    }
    info.update(extra)
    return info


@pytest.fixture
def legacy_site(site, tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    config = site.config(legacy={
        "enabled": True, "sandbox_path": str(sandbox),
        "data_path": str(tmp_path / "data" / "cohort"),
        "site_vars": {"SITE_NAME": "site-one"}, "chunk_size": CHUNK,
        # The message's own task definition, and fem-ansible's richer reply record.
        "tools": {"*": {"from_task_info": True}}, "reply": "record",
    })
    listener = site.listener(config)
    orch = LegacyOrchestrator(site.node)
    site.sandbox = sandbox
    site.legacy = orch
    site.proc = listener
    yield site
    orch.close()


def test_submit_run_send_files_and_exit_codes(legacy_site):
    site, orch = legacy_site, legacy_site.legacy
    received = orch.call(legacy_body("receive_files", execution_id="e-ok", params={
        "files": [{"path": "in.txt", "data": base64.b64encode(b"hello-received\n").decode()}]}))
    assert received["status"] == "success"
    assert received["files"][0]["sha256"] == hashlib.sha256(b"hello-received\n").hexdigest()

    ok = orch.send(legacy_body("submit_run", task_info=task_info(), execution_id="e-ok"))
    failed = orch.send(legacy_body("submit_run", task_info=task_info(), execution_id="e-3",
                                   params={"code": 3}))
    info = orch.result(ok)
    assert info["status"] == "success" and info["return_code"] == 0, info
    assert {k: info[k] for k in ("execution_id", "action", "tool_id", "task_id", "user_id",
                                 "node")} == {
        "execution_id": "e-ok", "action": "submit_run", "tool_id": "tool-1",
        "task_id": "sandbox-writer", "user_id": "alice", "node": site.node}
    assert info["starting_time"] <= info["finish_time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", info["finish_time"])
    # The tool's stdout is the result (the original's contract), here bigger than a chunk.
    assert info["result"] == {"ok": True, "pad": "0" * 9000}
    assert orch.chunk_counts[ok] > 1

    # The outputs are in the run's sandbox on the listener's host.
    out = site.sandbox / "alice" / "e-ok"  # the sandbox root, as the real client's
    assert (out / "out.txt").read_text() == "site=site-one\nhello-received\n"
    assert (out / "sub" / "copy.csv").read_text().startswith("id,age")

    info3 = orch.result(failed)
    assert info3["status"] == "failed" and info3["return_code"] == 3, info3
    assert info3["execution_id"] == "e-3"

    sent = orch.call(legacy_body("send_files", execution_id="e-ok"))
    assert sent["status"] == "success"
    files = {f["path"]: base64.b64decode(f["data"]) for f in sent["files"]}
    assert files == {"in.txt": b"hello-received\n",
                     "out.txt": b"site=site-one\nhello-received\n",
                     "sub/copy.csv": (out / "sub" / "copy.csv").read_bytes()}
    assert all(hashlib.sha256(files[f["path"]]).hexdigest() == f["sha256"]
               for f in sent["files"])
    # Another user cannot fetch them.
    other = orch.call(legacy_body("send_files", execution_id="e-ok", user_id="mallory"))
    assert other["status"] == "error"

    health = orch.call(legacy_body("health-check", execution_id=None))
    assert health["paths_check"]["sandbox_path_exists"] is True
    assert health["paths_check"]["data_path_exists"] is True
    assert health["installation_check"]["docker_version"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    assert "token-secret-1" not in (site.work_dir / "audit.jsonl").read_text()


def test_a_5_mib_reply_reassembles_the_orchestrators_way(legacy_site):
    """A tool printing 5 MiB of JSON: its reply, in chunks of CHUNK base64 characters, is
    joined, decoded once and checked by the test orchestrator as the real one does."""
    orch = legacy_site.legacy
    size = 5 * 1024 * 1024
    script = (f"head -c {size} /dev/zero > /tmp/z && printf '{{\"pad\": \"'"
              " && tr '\\000' a < /tmp/z && printf '\"}'")
    info = task_info(command={"base": "sh -c", "args": [
        {"id": "script", "type": "string", "default_value": script, "position": 1}]})
    corr = orch.send(legacy_body("submit_run", task_info=info, execution_id="e-big"))
    result = orch.result(corr)
    assert result["status"] == "success", {k: v for k, v in result.items() if k != "result"}
    assert result["result"] == {"pad": "a" * size}
    assert orch.chunk_counts[corr] > size // CHUNK


def test_hostile_legacy_messages_are_answered_and_nothing_runs(legacy_site, tmp_path):
    site, orch = legacy_site, legacy_site.legacy
    marker1, marker2 = tmp_path / "pwned1", tmp_path / "pwned2"
    hostile = {
        "import in task_info": legacy_body(
            "submit_run", execution_id="h1",
            task_info=f"__import__('os').system('touch {marker1}')"),
        "import in parametric_args": legacy_body(
            "submit_run", execution_id="h2", task_info=task_info(),
            params=f"{{'code': __import__('os').system('touch {marker2}')}}"),
        "volume of /etc": legacy_body(
            "submit_run", execution_id="h3", task_info=task_info(volumes=[
                {"host_path": "/etc", "container_path": "/sandbox"}])),
        "unknown site var": legacy_body(
            "submit_run", execution_id="h4",
            task_info=task_info(var_envs={"KEY": "$BROKER_PASSWORD"})),
        "wrong field count": "submit_run|tool-1|{}|{}",
        "path escape in receive_files": legacy_body(
            "receive_files", execution_id="h5",
            params={"files": [{"path": "../../../etc/x", "data": "eA=="}]}),
    }
    corrs = {name: orch.send(body) for name, body in hostile.items()}
    for name, corr in corrs.items():
        result = orch.result(corr, timeout=60)
        assert result["status"] == "error", (name, result)
        error = result["result"]["error"] if "result" in result else result["error"]
        assert error["code"] in ("invalid_message", "policy_violation"), (name, error)
        if name.startswith(("import", "volume", "unknown")):
            assert result["return_code"] is None and result["action"] == "submit_run"
    assert "legacy.volumes" in orch.result(corrs["volume of /etc"])["result"]["error"]["message"]
    assert "$BROKER_PASSWORD" in \
        orch.result(corrs["unknown site var"])["result"]["error"]["message"]

    # Still consuming: a cancel recorded before its task arrives keeps that task from starting.
    cancel = orch.call(legacy_body("cancel_run", execution_id="c1"))
    assert cancel["status"] == "success" and cancel["cancel"] == "recorded"
    info = orch.call(legacy_body("submit_run", task_info=task_info(), execution_id="c1"))
    assert info["status"] == "cancelled" and info["return_code"] is None
    assert "resources_check" in orch.call(legacy_body("pre_checks", execution_id=None))

    # Nothing ran: no marker, no container, no run dir but the cancelled one's.
    assert not marker1.exists() and not marker2.exists()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    runs = site.work_dir / "runs"
    assert not runs.exists() or {p.name for p in runs.iterdir()} <= {"legacy-c1"}
    db = sqlite3.connect(site.work_dir / "journal.sqlite")
    assert [r[0] for r in db.execute("SELECT task_id FROM tasks")] == ["legacy-c1"]
    assert not (site.sandbox / "alice" / "h5").exists() or \
        not any((site.sandbox / "alice" / "h5").rglob("x"))
    assert site.proc.alive


def test_legacy_runs_obey_max_parallel(site, tmp_path):
    """With one slot, a second submit_run waits for it held unacked by the listener (the
    legacy queue is still consumed, for control actions): not journaled, not in the queue's
    ready messages, then run once the slot frees."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    config = site.config(
        execution={"work_dir": str(site.work_dir), "max_parallel": 1,
                   "shutdown_grace_s": 30},
        legacy={"enabled": True, "sandbox_path": str(sandbox),
                "data_path": str(tmp_path / "data" / "cohort"),
                "site_vars": {"SITE_NAME": "s"}, "chunk_size": CHUNK,
                "tools": {"*": {"from_task_info": True}}, "reply": "record"})
    proc = site.listener(config)
    orch = LegacyOrchestrator(site.node)
    try:
        slow = task_info(command={"base": "sh -c", "args": [
            {"id": "s", "type": "string", "position": 1,
             "default_value": "sleep 6 && echo '{\"n\": 1}'"}]})
        first = orch.send(legacy_body("submit_run", task_info=slow, execution_id="p1"))
        db = site.work_dir / "journal.sqlite"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if db.exists() and _states(db).get("legacy-p1") == "RUNNING":
                break
            time.sleep(0.2)
        second = orch.send(legacy_body("submit_run", task_info=slow, execution_id="p2"))
        time.sleep(2)
        # p2 is delivered and held unacked, not journaled: a crash gives it back.
        assert orch.ch.queue_declare(site.node, passive=True).method.message_count == 0
        assert "legacy-p2" not in _states(db)
        assert orch.result(first)["result"] == {"n": 1}
        assert orch.result(second)["result"] == {"n": 1}
        assert proc.alive
    finally:
        orch.close()


def _states(db) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT task_id, state FROM tasks"))
    finally:
        conn.close()
