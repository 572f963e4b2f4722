"""fem.core's ``mitogen_linear`` freezes the run's heap when the play starts (fast path
group ``frozen_heap``): a worker forked after it inherits the frozen objects, which its
garbage collections no longer walk; without the group nothing is frozen."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from fem_ansible.runner import (
    RunHooks,
    RunSpec,
    collections_view,
    run_playbook,
    scan_cache_dir,
)

# Runs in the worker, where Ansible templates a task's arguments.
LOOKUP = """\
import gc
from ansible.plugins.lookup import LookupBase

class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return [gc.get_freeze_count()]
"""
PLAYBOOK = """\
- name: Frozen
  hosts: all
  gather_facts: false
  tasks:
    - name: Report what a worker inherited frozen
      ansible.builtin.set_stats:
        data: {frozen: "{{ lookup('frozen') }}"}
"""


class _Reports(RunHooks):
    def __init__(self) -> None:
        self.reports: dict[str, Any] = {}

    def on_report(self, data: dict[str, Any]) -> None:
        self.reports.update(data)


def _frozen(tmp_path: Path, off: str) -> int:
    (tmp_path / "lookup_plugins").mkdir(exist_ok=True)
    (tmp_path / "lookup_plugins" / "frozen.py").write_text(LOOKUP)
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    inventory = tmp_path / "hosts"
    inventory.write_text(f"localhost ansible_connection=local "
                         f"ansible_python_interpreter={sys.executable}\n")
    pdd = tmp_path / f"pdd-{off or 'all'}"
    pdd.mkdir(mode=0o700)
    work = tmp_path / "work"
    spec = RunSpec(
        private_data_dir=pdd, ident="frozen", playbook=tmp_path / "play.yml",
        inventory=inventory, limit="localhost", roles_path=[],
        collections=collections_view(work), scan_cache=scan_cache_dir(work),
        extravars={}, secrets={}, strategy="mitogen",
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
             "FEMCORE_FASTPATH_OFF": off})
    hooks = _Reports()
    result = run_playbook(spec, hooks, lambda: False)
    assert (result.status, result.rc) == ("successful", 0), result
    return int(hooks.reports["frozen"])


@pytest.mark.e2e
def test_a_worker_inherits_the_run_frozen_only_with_the_group(tmp_path: Path):
    assert _frozen(tmp_path, "") > 10000
    assert _frozen(tmp_path, "frozen_heap") == 0
