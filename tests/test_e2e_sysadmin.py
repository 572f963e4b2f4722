"""A sysadmin's first week on a real node (issue 31), end to end: log rotation without
systemd, the start-up messages when the broker is down or refuses the login, one line per
event nobody's queue receives."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fem_ansible.cli import main
from fem_ansible.service import ServiceLayout, logrotate_text
from tests.support.harness import Listener

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
