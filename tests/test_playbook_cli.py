"""fem-ansible's ``ansible-playbook``: Ansible's own command, which does not collect its heap
on the way out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fem_ansible import runner


def _ansible_playbook(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(runner.playbook_command(*args),
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_it_is_ansible_playbook_with_its_own_name_and_exit_code(tmp_path: Path):
    out = _ansible_playbook("--version", env=dict(os.environ), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ansible-playbook [core ")
    assert f"executable location = {Path(sys.executable).parent / 'ansible-playbook'}" in out.stdout
    assert _ansible_playbook(str(tmp_path / "missing.yml"), env=dict(os.environ),
                             cwd=tmp_path).returncode != 0


def test_the_heap_is_frozen_at_exit_and_atexit_cleanup_still_runs(tmp_path: Path):
    """Finalization's garbage collections skip Ansible's heap (gc.freeze), and what Ansible
    does at exit still happens: its local temporary directory is removed."""
    playbook = tmp_path / "play.yml"
    playbook.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                        "    - ansible.builtin.debug: {msg: hello}\n")
    local_tmp = tmp_path / "local-tmp"
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
             "from fem_ansible.playbook_cli import main\n"
             f"sys.argv[1:] = [{str(playbook)!r}]\n"
             "main()\n")
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(local_tmp),
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    frozen = int(out.stderr.split("frozen ")[1].split()[0])
    assert frozen > 10_000, out.stderr
    assert local_tmp.is_dir() and list(local_tmp.iterdir()) == []
