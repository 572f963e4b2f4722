"""ansible-runner's child is closed without ptyprocess's 0.1 s wait once it has been reaped
(fem_ansible.runner.ReapedChildSpawn), and as pexpect closes it otherwise."""

from __future__ import annotations

import time
from pathlib import Path

import ansible_runner
import pexpect
import ptyprocess.ptyprocess
import pytest

from fem_ansible.runner import ReapedChildSpawn


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """What ptyprocess's close sleeps, recorded (and slept)."""
    slept: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(seconds)

    monkeypatch.setattr(ptyprocess.ptyprocess.time, "sleep", sleep)
    return slept


def test_ansible_runner_spawns_its_child_with_it() -> None:
    assert pexpect.spawn is ReapedChildSpawn


def test_a_reaped_child_is_closed_without_the_wait(sleeps: list[float]) -> None:
    child = pexpect.spawn("sh", ["-c", "exit 3"])
    while child.isalive():  # as ansible-runner's Runner.run waits for its child
        child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=1)
    child.close()
    assert sleeps == [0]
    assert child.exitstatus == 3


def test_a_live_child_is_closed_as_pexpect_closes_it(sleeps: list[float]) -> None:
    child = pexpect.spawn("sleep", ["30"])
    child.close()
    assert sleeps[0] == pytest.approx(0.1)
    assert not child.isalive()
    assert child.signalstatus is not None


def test_a_run_through_ansible_runner_keeps_its_output_and_status(tmp_path: Path) -> None:
    out, _err, rc = ansible_runner.run_command(
        executable_cmd="sh", cmdline_args=["-c", "echo from the child; exit 3"],
        private_data_dir=str(tmp_path), quiet=True)
    assert rc == 3
    assert "from the child" in out
