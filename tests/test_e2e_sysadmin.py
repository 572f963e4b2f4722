"""A sysadmin's first week on a real node (issue 31), end to end: log rotation without
systemd, the start-up messages when the broker is down or refuses the login, one line per
event nobody's queue receives."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from click.testing import CliRunner

from fem_ansible.cli import main
from fem_ansible.service import ServiceLayout, logrotate_text
from tests.support.harness import AMQP_URL, Listener, new_node_id, site_config

pytestmark = pytest.mark.e2e


def audit_task_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["task_id"] for line in path.read_text().splitlines()}


@contextlib.contextmanager
def listener_logging_to(site, log: Path, stderr: Path) -> Iterator[Listener]:
    """A listener with ``--log-file log``, connected."""
    lst = Listener(site.config(), stderr, args=["--log-file", str(log)])
    lst.start(wait_connected=False)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "connected to the broker" in log.read_text()):
            assert time.monotonic() < deadline and lst.alive, lst.tail()
            time.sleep(0.2)
        yield lst
    finally:
        lst.stop()


def test_logrotate_without_systemd(site, tmp_path):
    """install-service's snippet, forced by ``logrotate -f`` while a listener runs: its
    postrotate (systemctl) does nothing here, and the listener's next lines, log and audit,
    go to the new files all the same."""
    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o700)
    layout = ServiceLayout(user="root", group="root", work_dir=site.work_dir,
                           log_dir=log_dir)
    log = layout.log_file
    with listener_logging_to(site, log, tmp_path / "stderr.log"):
        _rotate_while_running(site, tmp_path, layout)


def _rotate_while_running(site, tmp_path: Path, layout: ServiceLayout) -> None:
    log = layout.log_file
    site.orchestrator.publish(site.task("before-rotate"))
    assert site.orchestrator.wait_terminal("before-rotate")["state"] == "COMPLETED"

    config = tmp_path / "logrotate.conf"
    config.write_text(logrotate_text(layout))
    done = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"),
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(f"{layout.audit_file}.1").exists() and Path(f"{log}.1").exists()

    site.orchestrator.publish(site.task("after-rotate"))
    assert site.orchestrator.wait_terminal("after-rotate")["state"] == "COMPLETED"
    assert "after-rotate" in audit_task_ids(layout.audit_file)
    assert "before-rotate" not in audit_task_ids(layout.audit_file)
    assert "after-rotate" not in audit_task_ids(Path(f"{layout.audit_file}.1"))
    assert "after-rotate" in log.read_text()
    assert "after-rotate" not in Path(f"{log}.1").read_text()


def test_tasks_shows_failed_rows_error_code_and_the_log_in_use(site, tmp_path):
    log = tmp_path / "logs" / "the-listener.log"
    log.parent.mkdir()
    with listener_logging_to(site, log, tmp_path / "stderr.log") as lst:
        site.orchestrator.publish(site.task("fails-3", command=["sh", "-c", "exit 3"]))
        assert site.orchestrator.wait_terminal("fails-3")["state"] == "FAILED"
        config = str(lst.config)
        listed = CliRunner().invoke(main, ["tasks", "--config", config])
        (row,) = [x for x in listed.output.splitlines() if x.startswith("fails-3 ")]
        assert row.split()[1] == "FAILED" and " 3 execution_failed: " in row, row
        detail = CliRunner().invoke(main, ["tasks", "--config", config, "fails-3"]).output
        assert f"listener log      grep fails-3 {log}" in detail, detail
    # no listener of this config runs now
    detail = CliRunner().invoke(main, ["tasks", "--config", config, "fails-3"]).output
    assert "journalctl -u fem-ansible | grep fails-3" in detail, detail


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_lines(lst: Listener, text: str, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = lst.log.read_text().splitlines() if lst.log.exists() else []
        found = [x for x in lines if text in x]
        if len(found) >= count:
            return lines
        assert time.monotonic() < deadline, "\n".join(lines)
        time.sleep(0.2)


@pytest.mark.parametrize("url, said", [
    ("amqp://guest:guest@127.0.0.1:{port}/%2F",
     "broker: could not connect to guest@127.0.0.1:{port}: Connection refused — start "
     "RabbitMQ, open the port, or correct broker.url; trying again in "),
    ("amqp://guest:not-the-password@127.0.0.1:5672/%2F",
     "broker: login refused for guest@127.0.0.1:5672 — correct the user and password in "
     "broker.url"),
])
def test_broker_down_or_refusing_at_start_is_one_line_a_try(site, tmp_path, url, said):
    """Not "connection lost" (it never connected), no empty "AMQPConnectionError: ", and
    none of pika's own lines and tracebacks (issue 31)."""
    port = closed_port()
    lst = Listener(site.config(broker={"url": url.format(port=port)}), tmp_path / "l.log")
    lst.start(wait_connected=False)
    try:
        lines = wait_lines(lst, said.format(port=port), 2)
    finally:
        lst.stop()
    lines = lst.log.read_text().splitlines()
    assert all(" fem_ansible." in x for x in lines), "\n".join(lines)
    assert not [x for x in lines if "Traceback" in x or "pika" in x or "lost" in x]
    assert "not-the-password" not in "\n".join(lines)


def publish_raw(node_id: str, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        conn.channel().basic_publish("fem.tasks", node_id, body)
    finally:
        conn.close()


@pytest.mark.parametrize("legacy", [False, True])
def test_an_event_no_queue_receives_is_one_line_and_none_on_a_legacy_node(
        site, tmp_path, legacy):
    """pika's "Published message was returned" and ours were two warnings an event; a
    legacy-only node, whose orchestrator binds no queue to fem.events, had them for every
    event of every task (issue 31)."""
    node = new_node_id()  # no orchestrator binds fem.events for this node
    config = site_config(tmp_path, site.env, node, **({"legacy": {
        "enabled": True, "sandbox_path": str(tmp_path), "tools": {}}} if legacy else {}))
    lst = Listener(config, tmp_path / "l.log").start()
    try:
        for _ in range(2):
            publish_raw(node, b"not json")
        lines = wait_lines(lst, f"{node}._.REJECTED", 1 if legacy else 2)
        time.sleep(2)  # the second event's line, if any
        lines = lst.log.read_text().splitlines()
    finally:
        lst.stop()
    unroutable = [x for x in lines if "had no queue bound" in x]
    assert not [x for x in lines if "returned" in x or "pika" in x], "\n".join(lines)
    if legacy:
        assert len(unroutable) == 1 and " INFO " in unroutable[0], "\n".join(lines)
    else:
        assert len(unroutable) == 2 and all(" WARNING " in x for x in unroutable)


def test_a_broker_account_without_permissions_is_said_so(site, tmp_path):
    """Logged in, then refused the node's exchanges and queues: not "could not connect"
    (and not "start RabbitMQ"), not "connection lost"."""
    import uuid

    user, password = f"femt-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(["rabbitmqctl", "-q", "add_user", user, password], check=True,
                   capture_output=True, timeout=60)
    try:
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", "/", user, "", "", ""],
                       check=True, capture_output=True, timeout=60)
        lst = Listener(site.config(broker={"url": f"amqp://{user}:{password}@127.0.0.1:5672/%2F"}),
                       tmp_path / "l.log")
        lst.start(wait_connected=False)
        try:
            lines = wait_lines(lst, f"broker: setting up node {site.node}'s exchanges and "
                                    "queues failed (ACCESS_REFUSED", 1)
        finally:
            lst.stop()
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True,
                       timeout=60)
    assert not [x for x in lines if "could not connect" in x or "lost" in x or "pika" in x]
