"""Never lose, never double-run (issue 3): recovery after kill -9, broker loss, consumer
timeout, duplicates, parallelism across listeners, timeout, cancel, upload failures,
shutdown.  All through a real listener process, broker, engine and upload endpoint."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from fem_ansible.journal import Journal
from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.services import start_rabbitmq, stop_rabbitmq, upload_requests

pytestmark = pytest.mark.e2e

TERMINAL = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED", "REJECTED"}


def uploads_of(site, task_id: str, name: str) -> list[dict]:
    return [r for r in upload_requests(site.env)
            if r["path"] == f"/{site.node}/{task_id}/{name}" and r["status"] < 300]


def assert_single_terminal(orch, task_id: str, state: str = "COMPLETED") -> dict:
    orch.drain(1.0)
    events = orch.distinct_events(task_id)
    terminal = [e for e in events if e["state"] in TERMINAL]
    assert [e["state"] for e in terminal] == [state], [e["state"] for e in events]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return terminal[0]


@pytest.mark.parametrize("kill_at", ["STAGING_IN", "RUNNING", "STAGING_OUT"])
def test_kill_9_then_restart_finishes_once(site, kill_at):
    env, orch = site.env, site.orchestrator
    tid = f"kill-{kill_at.lower()}"
    # The container counts its own starts: a container restarted would say so.
    command = ["sh", "-c", "echo start >> /fem/output/starts.txt; sleep 6; echo done"]
    listener = site.listener()
    orch.publish(site.task(tid, command=command))
    orch.wait_state(tid, kill_at)
    listener.kill9()
    listener.start()
    final = orch.wait_terminal(tid)
    assert final["state"] == "COMPLETED", final
    assert_single_terminal(orch, tid)
    assert len(uploads_of(site, tid, "outputs.tar.gz")) == 1
    if kill_at != "STAGING_IN":
        data = (Path(env["FEM_TEST_UPLOAD_DIR"]) / site.node / tid / "outputs.tar.gz").read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            starts = tar.extractfile("./starts.txt").read()
        assert starts == b"start\n"
        assert final["attempt"] == 2
    listener.stop()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


@pytest.mark.serial
def test_broker_down_for_20s_loses_no_event(site):
    orch = site.orchestrator
    site.listener()
    tid = "broker-down"
    orch.publish(site.task(tid, command=["sh", "-c", "sleep 12; echo done"]))
    orch.wait_state(tid, "RUNNING")
    orch.conn.close()
    stop_rabbitmq()
    try:
        time.sleep(20)
    finally:
        start_rabbitmq()
    orch.reconnect()
    final = orch.wait_terminal(tid, timeout=240)
    assert final["state"] == "COMPLETED"
    events = orch.distinct_events(tid)
    assert [e["state"] for e in events] == [
        "RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


def _rabbit_eval(expr: str) -> str:
    return subprocess.run(["rabbitmqctl", "eval", expr], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.serial
def test_task_outliving_consumer_timeout_is_not_redelivered(site):
    orch = site.orchestrator
    before = _rabbit_eval("application:get_env(rabbit, consumer_timeout).")
    tick = _rabbit_eval("application:get_env(rabbit, channel_tick_interval).")
    _rabbit_eval("application:set_env(rabbit, consumer_timeout, 2000).")
    _rabbit_eval("application:set_env(rabbit, channel_tick_interval, 500).")
    try:
        listener = site.listener()
        orch.publish(site.task("outlives", command=["sh", "-c", "sleep 10; echo done"]))
        final = orch.wait_terminal("outlives", timeout=180)
    finally:
        for key, value in (("consumer_timeout", before), ("channel_tick_interval", tick)):
            if value.startswith("{ok,"):
                _rabbit_eval(f"application:set_env(rabbit, {key}, {value[4:-1]}).")
            else:
                _rabbit_eval(f"application:unset_env(rabbit, {key}).")
    assert final["state"] == "COMPLETED"
    assert_single_terminal(orch, "outlives")
    log = listener.log.read_text()
    assert "already in the journal" not in log and "connection lost" not in log


def test_same_task_id_twice_runs_once(site):
    orch = site.orchestrator
    # Two slots, so the copy sent while the task runs is consumed while it runs.
    listener = site.listener(site.config(execution={"max_parallel": 2}))
    task = site.task("twice", command=["sh", "-c", "sleep 3; echo done"])
    orch.publish(task)
    orch.wait_state("twice", "RUNNING")
    orch.publish(task)  # while it runs
    listener.wait_for_log("already in the journal (RUNNING)")
    first = orch.wait_terminal("twice")
    orch.publish(task)  # after it finished
    listener.wait_for_log("already in the journal (COMPLETED)")
    orch.drain(2.0)
    states = [e["state"] for e in orch.events("twice")]
    assert states.count("RUNNING") == 1 and states.count("RECEIVED") == 1
    completed = [e for e in orch.events("twice") if e["state"] == "COMPLETED"]
    assert len(completed) == 2 and completed[0] == completed[1] == first  # same seq, same body
    assert len(uploads_of(site, "twice", "outputs.tar.gz")) == 1


def test_two_listeners_share_a_queue_within_their_slots(site, tmp_path):
    orch = site.orchestrator
    listeners = []
    for name in ("l1", "l2"):
        cfg = site.config(listener_id=name,
                          execution={"work_dir": str(tmp_path / f"work-{name}"),
                                     "max_parallel": 2})
        listeners.append(site.listener(cfg, name=f"{name}.log"))
    ids = [f"par-{i}" for i in range(10)]
    for tid in ids:
        orch.publish(site.task(tid, command=["sh", "-c", "sleep 2; echo done"]))
    for tid in ids:
        assert orch.wait_terminal(tid, timeout=300)["state"] == "COMPLETED"
    for tid in ids:
        assert_single_terminal(orch, tid)
    ran = []
    for name in ("l1", "l2"):
        journal = Journal(tmp_path / f"work-{name}" / "journal.sqlite")
        spans = []
        for rec in journal.recent(100):
            events = journal.get(rec.task_id, with_events=True).events
            times = [datetime.fromisoformat(e["ts"]) for e in events]
            spans.append((min(times), max(times)))
            ran.append(rec.task_id)
        for start, _ in spans:  # tasks held at each task's start, itself included
            assert sum(1 for s, e in spans if s <= start <= e) <= 2
    assert sorted(ran) == sorted(ids)


def test_timeout_stops_the_container_and_uploads_logs(site):
    orch = site.orchestrator
    site.listener()
    task = site.task("too-long", command=["sh", "-c", "echo begun; sleep 60"],
                       resources={"timeout_s": 3, "memory": "64Mi"})
    orch.publish(task)
    final = orch.wait_terminal("too-long")
    assert final["state"] == "TIMED_OUT" and final["error"]["code"] == "timeout"
    assert final["exit_code"] is None
    assert [e["state"] for e in orch.events("too-long")][-2:] == ["STAGING_OUT", "TIMED_OUT"]
    assert len(uploads_of(site, "too-long", "logs.tar.gz")) == 1
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_cancel_while_running_and_before_start(site):
    orch = site.orchestrator
    site.listener()  # one slot: the second task waits in the broker
    orch.publish(site.task("running", command=["sh", "-c", "echo begun; sleep 120"]))
    orch.publish(site.task("waiting"))
    orch.wait_state("running", "RUNNING")
    orch.cancel("waiting")
    orch.cancel("running")
    final = orch.wait_terminal("running", timeout=120)
    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled"
    assert [e["state"] for e in orch.events("running")][-2:] == ["STAGING_OUT", "CANCELLED"]
    assert len(uploads_of(site, "running", "logs.tar.gz")) == 1
    waiting = orch.wait_terminal("waiting")
    assert [e["state"] for e in orch.events("waiting")] == ["RECEIVED", "CANCELLED"]
    assert waiting["error"]["code"] == "cancelled"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_upload_endpoint_down_fails_and_keeps_archives(site):
    env, orch = site.env, site.orchestrator
    site.listener(site.config(http={"upload_tries": 3, "retry_backoff_s": 0.2}))
    requests.post(f"{env['FEM_TEST_UPLOAD_URL']}/_control/fail",
                  params={"count": 3, "status": 503, "path_prefix": f"/{site.node}/down/"},
                  timeout=5).raise_for_status()
    orch.publish(site.task("down"))
    final = orch.wait_terminal("down")
    assert final["state"] == "FAILED" and final["error"]["code"] == "stage_out_failed"
    assert final["error"]["stage"] == "stage_out"
    tries = [r for r in upload_requests(env)
             if r["path"] == f"/{site.node}/down/outputs.tar.gz"]
    assert len(tries) == 3
    kept = site.work_dir / "runs" / "down" / "archives"
    assert (kept / "outputs.tar.gz").is_file() and (kept / "logs.tar.gz").is_file()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_sigterm_lets_running_task_finish_and_takes_no_new_one(site):
    orch = site.orchestrator
    listener = site.listener()
    orch.publish(site.task("finishing", command=["sh", "-c", "sleep 5; echo done"]))
    orch.wait_state("finishing", "RUNNING")
    orch.publish(site.task("not-taken"))
    assert listener.stop(timeout=90) == 0
    assert orch.wait_terminal("finishing")["state"] == "COMPLETED"
    orch.drain(1.0)
    assert orch.events("not-taken") == []
    listener.start()
    assert orch.wait_terminal("not-taken")["state"] == "COMPLETED"
