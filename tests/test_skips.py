"""Tasks whose condition is false are skipped in the controller under fem.core's
``mitogen_linear`` (``plugin_utils/skips.py``): such a task forks no worker, and a run
with them there sends the same events, results and verdict as a run with every task in a
worker; what the worker could see otherwise still goes to a worker."""

from __future__ import annotations

import importlib
import types

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.block import Block
from ansible.playbook.task import Task
from ansible.plugins.loader import init_plugin_loader
from ansible.template import trust_as_template
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible.runner import data_dir
from tests.support.in_controller import run_forks, shape
from tests.support.plugin_import import forget_plain_imports

PLAYBOOK = """\
- name: Skips among other tasks
  hosts: all
  gather_facts: false
  vars:
    engine: docker
    creds: {}
  tasks:
    - name: Literal false
      ansible.builtin.debug:
        msg: never
      when: false
    - name: Other engine
      ansible.builtin.command: podman ps
      when: engine == 'podman'
    - name: No credentials
      ansible.builtin.copy:
        content: "{{ creds.password }}"
        dest: /nonexistent/creds
      when: creds.password is defined
      no_log: true
      register: wrote
    - name: True condition
      ansible.builtin.set_fact:
        ran: true
      when: engine == 'docker'
    - name: Reads the skipped result
      ansible.builtin.assert:
        that: [wrote is skipped, ran]
    - name: An include not taken
      ansible.builtin.include_tasks: nowhere.yml
      when: engine == 'podman'
    - name: A role not taken
      ansible.builtin.include_role:
        name: nowhere
      when: creds.user is defined
    - name: Inherited from the block
      when: engine != 'docker'
      block:
        - name: In a skipped block
          ansible.builtin.debug:
            msg: never
    - name: A connection variable a worker adds
      ansible.builtin.debug:
        msg: never
      when: ansible_user is defined
    - name: A lookup
      ansible.builtin.debug:
        msg: never
      when: lookup('ansible.builtin.env', 'HOME') == '/nowhere'
    - name: A loop
      ansible.builtin.debug:
        msg: never
      loop: [1, 2]
      when: item > 5
    - name: A condition that fails
      ansible.builtin.debug:
        msg: never
      when: undefined_thing.attr == 1
      ignore_errors: true
    - name: A string condition
      ansible.builtin.debug:
        msg: never
      when: "'no'"
      ignore_errors: true
"""
IN_CONTROLLER = ["Literal false", "Other engine", "No credentials", "An include not taken",
                 "A role not taken", "In a skipped block"]
IN_WORKERS = ["True condition", "Reads the skipped result",
              "A connection variable a worker adds", "A lookup", "A loop",
              "A condition that fails", "A string condition"]


@pytest.mark.e2e
def test_a_false_condition_forks_no_worker_and_the_run_is_the_same(tmp_path):
    fast, _, fast_forks, fast_events = run_forks(tmp_path, "fast", "", PLAYBOOK)
    stock, _, stock_forks, stock_events = run_forks(tmp_path, "stock", "skips", PLAYBOOK)

    assert sorted(stock_forks) == sorted(IN_CONTROLLER + IN_WORKERS)
    assert fast_forks == IN_WORKERS
    assert shape(fast_events) == shape(stock_events)
    for result in (fast, stock):
        assert (result.status, result.rc) == ("successful", 0)
    stats = next(e for e in fast_events if e["event"] == "playbook_on_stats")["event_data"]
    assert stats["skipped"] == {"localhost": 9} and stats["ignored"] == {"localhost": 2}


@pytest.fixture
def skips(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The module as the plugin imports it, through Ansible's collection loader."""
    forget_plain_imports(monkeypatch)
    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader([str(data_dir() / "collections")])
    return importlib.import_module("ansible_collections.fem.core.plugins.plugin_utils.skips")


TASK = {"name": "t", "ansible.builtin.debug": {"msg": "x"}}


def _load(data: dict) -> Task:
    """A task as the playbook's loader gives it: its conditions trusted as templates."""
    when = data.get("when")
    if isinstance(when, str):
        data = {**data, "when": trust_as_template(when)}
    elif isinstance(when, list):
        data = {**data, "when": [trust_as_template(w) for w in when]}
    return Task.load(data, loader=DataLoader())


@pytest.mark.parametrize(("extra", "task_vars", "skipped"), [
    ({"when": False}, {}, True),
    ({"when": "x == 1"}, {"x": 2}, True),
    ({"when": ["x == 2", "x == 1"]}, {"x": 2}, True),
    ({"when": "x is defined"}, {}, True),
    ({"when": "x == 2"}, {"x": 2}, False),  # true: a worker runs it
    ({}, {}, False),  # no condition
    ({"when": "x.y == 1"}, {}, False),  # raises: a worker fails it
    ({"when": "ansible_host is defined"}, {}, False),  # a worker would add it
    ({"when": "ansible_host == 'h'"}, {"ansible_host": "g"}, True),  # given: the same
    ({"when": "ansible_search_path is defined"}, {}, False),
    ({"when": "vars['x'] == 1"}, {"x": 2}, False),
    ({"when": "lookup('env', 'X') == '1'"}, {}, False),
    ({"when": "query('env', 'X') == ['1']"}, {}, False),
    ({"when": "x == 1", "loop": [1]}, {"x": 2}, False),
    ({"when": "x == 1", "with_items": [1]}, {"x": 2}, False),
    ({"when": "x == 1", "delegate_to": "other"}, {"x": 2}, False),
    ({"when": "x == 1", "no_log": "{{ quiet }}"}, {"x": 2}, False),
])
def test_only_a_clean_false_of_what_the_worker_would_see_is_skipped_here(
        skips, extra, task_vars, skipped):
    task = _load({**TASK, **extra})
    assert (skips.result(task, task_vars) is not None) is skipped


def test_the_result_is_the_workers(skips):
    task = _load({**TASK, "when": ["x == 2", "x == 1"], "no_log": True})
    assert skips.result(task, {"x": 2}) == {
        "changed": False, "skipped": True, "skip_reason": "Conditional result was False",
        "false_condition": "x == 1", "_ansible_no_log": True}


def test_an_include_whose_condition_is_false_is_skipped_here(skips):
    from ansible.playbook.role_include import IncludeRole
    from ansible.playbook.task_include import TaskInclude

    task = TaskInclude.load({"name": "i", "ansible.builtin.include_tasks": "x.yml",
                             "when": False}, loader=DataLoader())
    assert skips.result(task, {}) is not None
    role = IncludeRole.load({"name": "r", "ansible.builtin.include_role": {"name": "x"},
                             "when": trust_as_template("x == 1")}, loader=DataLoader())
    assert skips.result(role, {"x": 2}) is not None


def test_a_condition_inherited_from_the_block_counts(skips):
    block = Block.load({"block": [TASK], "when": trust_as_template("x == 1")},
                       loader=DataLoader())
    assert skips.result(block.block[0], {"x": 2}) is not None
