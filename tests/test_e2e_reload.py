"""SIGHUP (issue 20 item 3), through a real listener: after logrotate-style renames the log
and audit lines go to new files, and a host added to the inventory takes tasks, with no
restart."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.support.harness import Listener

pytestmark = pytest.mark.e2e


def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.2)


def inventory(path: Path, *hosts: str) -> Path:
    local = {"ansible_connection": "local",
             "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
    path.write_text(yaml.safe_dump({"all": {"hosts": dict.fromkeys(hosts, local)}}))
    return path


def test_sighup_reopens_log_and_audit_and_rereads_the_inventory(site, tmp_path):
    inv = inventory(tmp_path / "inventory.yml", "localhost")
    config = site.config(execution={"work_dir": str(site.work_dir), "inventory": str(inv),
                                    "shutdown_grace_s": 30},
                         policy={**yaml.safe_load(site.config().read_text())["policy"],
                                 "targets": {"allow": ["localhost", "extra"]}})
    log = tmp_path / "listener.log"
    listener = Listener(config, tmp_path / "stdout.log", args=["--log-file", str(log)])
    listener.start(wait_connected=False)
    try:
        wait_for_text(log, "connected to the broker")
        rotate_and_reload(site, tmp_path, listener, inv, log)
    finally:
        listener.stop()


def rotate_and_reload(site, tmp_path: Path, listener: Listener, inv: Path, log: Path) -> None:
    work = site.work_dir
    orch = site.orchestrator

    orch.publish(site.task("before", target="extra"))
    before = orch.wait_terminal("before")
    assert before["state"] == "REJECTED" and "execution.inventory" in before["error"]["message"]

    # logrotate's part: move both files away; then the new host, then the signal
    audit = work / "audit.jsonl"
    log.rename(tmp_path / "listener.log.1")
    audit.rename(work / "audit.jsonl.1")
    inventory(inv, "localhost", "extra")
    listener.proc.send_signal(signal.SIGHUP)
    wait_for_text(log, "inventory re-read (2 host(s))")

    orch.publish(site.task("after", target="extra"))
    after = orch.wait_terminal("after")
    assert after["state"] == "COMPLETED", after
    assert {e.get("host") for e in orch.events("after")} - {None} == {"extra"}
    new_audit = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["task_id"] for r in new_audit} >= {"after"}
    assert "after" not in (work / "audit.jsonl.1").read_text()
    assert "before" in (work / "audit.jsonl.1").read_text()
    assert listener.alive
    assert "connected to the broker" not in log.read_text()  # the new file began at SIGHUP
