"""Faults of the node itself through a real listener, broker and engine (issue 28): its work
dir's file system fills up, its journal cannot be written.  The listener stays alive
throughout, says why it takes no task, and heals by itself."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from tests.support.harness import AMQP_URL, NOTHING_LEFT, Listener, leftovers, task_name
from tests.support.own_dockerd import OwnDockerd
from tests.test_e2e_doctor import doctor, line
from tests.test_e2e_metrics import free_port, scrape, value

pytestmark = pytest.mark.e2e

MiB = 1024**2


@pytest.fixture
def small_work_dir(site) -> Iterator[Path]:
    """The site's work dir on a 40 MiB file system of its own (a tmpfs), unmounted at the
    end whatever happened; the listeners are stopped first (the site fixture's teardown
    runs after this one's, but a mounted dir cannot be left behind)."""
    work = site.work_dir
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "fem-test-work",
                    str(work)], check=True)
    try:
        yield work
    finally:
        for proc in site.listeners:
            proc.stop()
        subprocess.run(["docker", "rm", "-f", "-v", *leftovers(site.node, work)["containers"]],
                       capture_output=True)
        subprocess.run(["umount", "-l", str(work)], check=False)


class NodeStatus:
    """The node's heartbeats (``fem.node/v1``), on a queue of their own."""

    def __init__(self, node_id: str):
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, "fem.events", routing_key=f"{node_id}._node.HEARTBEAT")
        self.seen: list[dict] = []

    def wait(self, accepting: bool, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.conn.sleep(0.1)
                continue
            beat = json.loads(body)
            self.seen.append(beat)
            if beat["accepting"] is accepting:
                return beat
        raise AssertionError(f"no heartbeat with accepting={accepting}: {self.seen[-3:]}")

    def close(self) -> None:
        self.conn.close()


def fill_task(site, tid: str, mib: int) -> dict:
    return site.task(tid, source=None, datasets=None, command=[
        "sh", "-c", f"dd if=/dev/zero of=/fem/output/fill bs=1M count={mib}; sleep 1"],
        resources={"memory": "128Mi", "timeout_s": 300})


def test_a_task_that_fills_the_disk_fails_and_frees_what_it_took(site, small_work_dir):
    orch = site.orchestrator
    lst = site.listener(site.config(execution={
        "work_dir": str(small_work_dir), "shutdown_grace_s": 30, "min_free_bytes": "8Mi"}))
    orch.publish(fill_task(site, "fills", 80))
    started = time.monotonic()
    final = orch.wait_terminal("fills", timeout=120)
    assert final["state"] == "FAILED" and final["error"]["code"] == "disk_full", final
    assert time.monotonic() - started < 90
    # The file system and the figures are named.
    assert str(small_work_dir) in final["error"]["message"], final
    assert "free" in final["error"]["message"]
    assert lst.alive
    # The next task runs without anyone freeing space.
    orch.publish(site.task("after", source=None, datasets=None,
                           command=["sh", "-c", "echo ok > /fem/output/ok"]))
    assert orch.wait_terminal("after", timeout=120)["state"] == "COMPLETED"
    assert leftovers(site.node, small_work_dir) == NOTHING_LEFT
    assert not (small_work_dir / "runs" / "fills" / "artifacts").exists() or \
        sum(f.stat().st_size for f in (small_work_dir / "runs").rglob("*") if f.is_file()) \
        < 8 * MiB
    assert lst.alive


def test_the_disk_watcher_stops_a_task_at_the_floor(site, small_work_dir):
    """Written slowly, 1 MiB at a time: the executor's watcher sees the file system fall
    below execution.min_free_bytes and stops the container before the disk is full."""
    orch = site.orchestrator
    lst = site.listener(site.config(execution={
        "work_dir": str(small_work_dir), "shutdown_grace_s": 30, "min_free_bytes": "20Mi"}))
    orch.publish(site.task("slow-fill", source=None, datasets=None, command=[
        "sh", "-c", "i=0; while [ $i -lt 30 ]; do dd if=/dev/zero of=/fem/output/f$i bs=1M "
        "count=1 2>/dev/null; i=$((i+1)); sleep 0.2; done; sleep 300"],
        resources={"memory": "128Mi", "timeout_s": 300}))
    final = orch.wait_terminal("slow-fill", timeout=120)
    assert final["state"] == "FAILED" and final["error"]["code"] == "disk_full", final
    assert final["error"]["stage"] == "run"
    message = final["error"]["message"]
    assert "below the node's floor of 20971520 bytes" in message, message
    assert f"mounted at {small_work_dir}" in message, message
    assert "STAGING_OUT" not in [e["state"] for e in orch.events("slow-fill")]
    assert leftovers(site.node, small_work_dir) == NOTHING_LEFT
    assert lst.alive


def test_recovery_on_a_full_disk_does_not_crash_loop(site, small_work_dir, tmp_path):
    """The listener killed under a running task, the disk filled meanwhile: the next one
    starts, stays up, ends the task (freeing what it took) and takes tasks again."""
    orch = site.orchestrator
    status = NodeStatus(site.node)
    config = site.config(
        execution={"work_dir": str(small_work_dir), "shutdown_grace_s": 30,
                   "min_free_bytes": "4Mi"},
        audit={"file": str(tmp_path / "audit.jsonl")})
    first = site.listener(config)
    try:
        orch.publish(site.task("long", source=None, datasets=None, command=[
            "sh", "-c", "dd if=/dev/zero of=/fem/output/half bs=1M count=8; sleep 300"],
            resources={"memory": "128Mi", "timeout_s": 300}))
        orch.wait_state("long", "RUNNING", timeout=120)
        first.kill9()
        ballast = small_work_dir / "ballast"
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=4k"], capture_output=True)
        second = site.listener(config, name="listener2.log")
        final = orch.wait_terminal("long", timeout=120)
        assert final["state"] == "FAILED" and final["error"]["code"] == "disk_full", final
        assert "recovered with the work dir" in final["error"]["message"]
        assert second.alive
        ballast.unlink()
        status.wait(accepting=True)
        orch.publish(site.task("then", source=None, datasets=None,
                               command=["sh", "-c", "echo ok > /fem/output/ok"]))
        assert orch.wait_terminal("then", timeout=120)["state"] == "COMPLETED"
        assert leftovers(site.node, small_work_dir) == NOTHING_LEFT
        assert second.alive
    finally:
        status.close()


def test_a_listener_started_on_a_full_disk_waits_for_its_journal(site, small_work_dir,
                                                                 tmp_path):
    """Stopped cleanly (SQLite removed its WAL files), then the disk filled: SQLite cannot
    open the journal.  The listener waits for it instead of exiting into a restart loop."""
    config = site.config(
        execution={"work_dir": str(small_work_dir), "shutdown_grace_s": 30,
                   "min_free_bytes": 0},
        audit={"file": str(tmp_path / "audit.jsonl")})
    first = site.listener(config)
    assert first.stop() == 0
    ballast = small_work_dir / "ballast"
    subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=4k"], capture_output=True)
    second = Listener(config, tmp_path / "listener2.log")
    site.listeners.append(second)
    second.start(wait_connected=False)
    second.wait_for_log("cannot be opened on a full file system")
    time.sleep(3)
    assert second.alive
    ballast.unlink()
    second.wait_for_log("connected to the broker", timeout=90)
    site.orchestrator.publish(site.task("then", source=None, datasets=None,
                                        command=["sh", "-c", "echo ok > /fem/output/ok"]))
    assert site.orchestrator.wait_terminal("then", timeout=120)["state"] == "COMPLETED"
    assert second.alive


def test_a_journal_that_cannot_be_written_loses_nothing_and_heals(site, small_work_dir,
                                                                 tmp_path):
    orch = site.orchestrator
    status = NodeStatus(site.node)
    # No floor, and the audit log elsewhere: the journal is the first to meet the full disk.
    config = site.config(
        execution={"work_dir": str(small_work_dir), "shutdown_grace_s": 30,
                   "min_free_bytes": 0},
        audit={"file": str(tmp_path / "audit.jsonl")})
    port = free_port()
    lst = site.listener(config, args=["--metrics-port", str(port)])
    try:
        status.wait(accepting=True)
        # The file system filled to the last block from outside (logs, another service).
        ballast = small_work_dir / "ballast"
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=4k"], capture_output=True)
        orch.publish(site.task("waits", source=None, datasets=None,
                               command=["sh", "-c", "echo ok > /fem/output/ok"]))
        beat = status.wait(accepting=False)
        assert "the journal cannot be written" in beat["reason"], beat
        assert "disk is full" in beat["reason"], beat
        samples = scrape(port)
        assert value(samples, "fem_node_accepting") == 0
        assert value(samples, "fem_node_fault", cause="journal") == 1
        assert value(samples, "fem_node_fault", cause="disk") == 0
        code, lines = doctor(config)
        assert code == 1 and "disk is full" in line(lines, "✗ journal:")
        time.sleep(3)
        orch.drain()
        assert orch.events("waits") == []  # not journaled, so not acked: in the broker
        assert lst.alive
        ballast.unlink()
        assert "reason" not in status.wait(accepting=True)
        assert orch.wait_terminal("waits", timeout=120)["state"] == "COMPLETED"
        samples = scrape(port)
        assert value(samples, "fem_node_accepting") == 1
        assert value(samples, "fem_node_fault", cause="journal") == 0
        events = orch.distinct_events("waits")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["state"] == "RECEIVED"
        assert lst.alive
        assert leftovers(site.node, small_work_dir) == NOTHING_LEFT
    finally:
        status.close()


def test_a_container_killed_for_memory_is_oom_killed_with_its_limit(site):
    """Docker's State.OOMKilled.  Podman's module reports its own State.OOMKilled the same
    way, but this machine's podman leaves it false for a container the kernel killed (exit
    137): not asserted there."""
    orch = site.orchestrator
    site.listener()
    tid = "oom"
    # tail keeps a line that never ends in memory: it grows until the kernel kills it.
    orch.publish(site.task(tid, source=None, datasets=None,
                           command=["tail", "/dev/zero"],
                           resources={"memory": "32Mi", "timeout_s": 120}))
    final = orch.wait_terminal(tid, timeout=240)
    assert final["state"] == "FAILED", final
    assert final["error"]["code"] == "oom_killed", final
    assert "32.0 MiB" in final["error"]["message"], final
    assert final["exit_code"] == 137
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


@pytest.fixture(params=[False, True], ids=["no-live-restore", "live-restore"])
def own_engine(request, tmp_path_factory, monkeypatch):
    """A dockerd of the test's own, which the listener and its runs use (DOCKER_HOST), and
    which the test may stop and start."""
    engine = OwnDockerd(tmp_path_factory.mktemp("dockerd"), live_restore=request.param)
    try:
        engine.start()
        monkeypatch.setenv("DOCKER_HOST", engine.host)
        yield engine
    finally:
        engine.close()


def test_the_engine_restarted_under_a_task_ends_it_once(site, own_engine):
    orch = site.orchestrator
    status = NodeStatus(site.node)
    lst = site.listener()
    try:
        status.wait(accepting=True)
        name = task_name(site.node, "eng")
        orch.publish(site.task("eng", source=None, datasets=None, command=[
            "sh", "-c", "sleep 20; echo done > /fem/output/done"],
            resources={"memory": "128Mi", "timeout_s": 120}))
        orch.wait_state("eng", "RUNNING", timeout=120)
        deadline = time.monotonic() + 60
        while "running" not in own_engine.docker(
                "inspect", "-f", "{{.State.Status}}", name, check=False).stdout:
            assert time.monotonic() < deadline, "the task's container never ran"
            time.sleep(0.5)
        own_engine.stop()
        beat = status.wait(accepting=False, timeout=60)
        assert "the Docker engine at" in beat["reason"] and "does not answer" in beat["reason"]
        time.sleep(3)
        own_engine.start()
        final = orch.wait_terminal("eng", timeout=180)
        if own_engine.live_restore:  # the container survived: the task carries on
            assert final["state"] == "COMPLETED", final
        else:
            assert final["state"] == "FAILED", final
            assert final["error"]["code"] == "engine_unavailable", final
        status.wait(accepting=True, timeout=60)
        time.sleep(2)
        orch.drain()
        terminal = [e for e in orch.distinct_events("eng")
                    if e["state"] in ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED")]
        assert len(terminal) == 1, terminal
        assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
        assert lst.alive
    finally:
        status.close()
