"""A sysadmin's first week on a real node (issue 31), end to end: log rotation without
systemd, the start-up messages when the broker is down or refuses the login, one line per
event nobody's queue receives."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from fem_ansible.service import ServiceLayout, logrotate_text
from tests.support.harness import Listener

pytestmark = pytest.mark.e2e


def audit_task_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["task_id"] for line in path.read_text().splitlines()}


def test_logrotate_without_systemd(site, tmp_path):
    """install-service's snippet, forced by ``logrotate -f`` while a listener runs: its
    postrotate (systemctl) does nothing here, and the listener's next lines, log and audit,
    go to the new files all the same."""
    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o700)
    layout = ServiceLayout(user="root", group="root", work_dir=site.work_dir,
                           log_dir=log_dir)
    log = layout.log_file
    lst = Listener(site.config(), tmp_path / "stderr.log", args=["--log-file", str(log)])
    lst.start(wait_connected=False)
    try:
        _rotate_while_running(site, tmp_path, layout, lst)
    finally:
        lst.stop()


def _rotate_while_running(site, tmp_path: Path, layout: ServiceLayout, lst: Listener) -> None:
    log = layout.log_file
    deadline = time.monotonic() + 60
    while not (log.exists() and "connected to the broker" in log.read_text()):
        assert time.monotonic() < deadline and lst.alive, lst.tail()
        time.sleep(0.2)
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
