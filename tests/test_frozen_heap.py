"""fem.core's ``mitogen_linear`` freezes the run's heap when the play starts (fast path
group ``frozen_heap``): a worker forked after it inherits the frozen objects, which its
garbage collections no longer walk; without the group nothing is frozen."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.local_play import run_local_play

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


def _frozen(tmp_path: Path, off: str) -> int:
    return int(run_local_play(tmp_path, PLAYBOOK, {"lookup_plugins/frozen.py": LOOKUP},
                              off)["frozen"])


@pytest.mark.e2e
def test_a_worker_inherits_the_run_frozen_only_with_the_group(tmp_path: Path):
    assert _frozen(tmp_path, "") > 10000
    assert _frozen(tmp_path, "frozen_heap") == 0
