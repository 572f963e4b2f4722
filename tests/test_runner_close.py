"""ansible-runner's child (fem_ansible.runner.RunnerSpawn) is answered without pexpect's
0.05 s wait, every time before its prompt reads, and closed without ptyprocess's 0.1 s wait
once it has been reaped, and as pexpect closes it otherwise."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ansible_runner
import pexpect
import pexpect.pty_spawn
import ptyprocess.ptyprocess
import pytest

from fem_ansible.runner import RunnerSpawn


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """What ptyprocess's close sleeps, recorded (and slept)."""
    slept: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(seconds)

    monkeypatch.setattr(ptyprocess.ptyprocess.time, "sleep", sleep)
    monkeypatch.setattr(pexpect.pty_spawn.time, "sleep", sleep)
    return slept


def test_ansible_runner_spawns_its_child_with_it() -> None:
    assert pexpect.spawn is RunnerSpawn


def test_a_reaped_child_is_closed_without_the_wait(sleeps: list[float]) -> None:
    child = pexpect.spawn("sh", ["-c", "exit 3"])
    while child.isalive():  # as ansible-runner's Runner.run waits for its child
        child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=1)
    child.close()
    assert sleeps == [0]
    assert child.exitstatus == 3


#: A program asking for a password as Ansible's vault prompt does (Python's getpass on the
#: pty), printing what it read.
ASKS = "import getpass; print('read', repr(getpass.getpass('Vault password (fem): ')))"


def test_a_prompt_is_answered_at_once_and_the_answer_is_read(sleeps: list[float]) -> None:
    for attempt in range(20):  # an answer that came before getpass's flush would be lost
        child = pexpect.spawn(sys.executable, ["-I", "-c", ASKS], echo=False,
                              encoding="utf-8")
        child.expect(r"Vault password \(fem\):\s*?$", timeout=10)
        child.sendline(f"secret {attempt}")
        child.expect(pexpect.EOF, timeout=10)
        assert f"read 'secret {attempt}'" in child.before
        child.close()
        assert child.exitstatus == 0
    assert 0.05 not in sleeps


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
