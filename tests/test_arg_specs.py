"""A role's argument validation that passes is answered in the controller under fem.core's
``mitogen_linear`` (``plugin_utils/arg_specs.py``): it forks no worker, and a run with it
there sends the same events, results and verdict as a run with every validation in a
worker; one that fails, or that the controller cannot judge as a worker would, still goes
to a worker."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.task import Task
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible.runner import data_dir
from tests.support.in_controller import run_forks, shape
from tests.support.plugin_import import forget_plain_imports

SPEC = """\
argument_specs:
  main:
    short_description: Takes a count and a name
    options:
      demo_count: {type: int, required: true, description: How many.}
      demo_name: {type: str, default: x, description: Which one.}
  other:
    short_description: Takes a mode
    options:
      demo_mode: {type: str, choices: [a, b], required: true, description: The mode.}
"""
PLAYBOOK = """\
- name: Validations among other tasks
  hosts: all
  gather_facts: false
  vars:
    base: 3
  tasks:
    - name: Passes, with a templated variable
      ansible.builtin.include_role:
        name: demo
      vars:
        demo_count: "{{ base + 1 }}"
    - name: Passes, imported, another entry point
      ansible.builtin.import_role:
        name: demo
        tasks_from: other
      vars:
        demo_mode: a
    - name: Fails and is rescued
      block:
        - name: Include with a bad count
          ansible.builtin.include_role:
            name: demo
          vars:
            demo_count: many
      rescue:
        - name: Rescued
          ansible.builtin.debug:
            msg: rescued
    - name: Under a condition
      ansible.builtin.include_role:
        name: demo
      vars:
        demo_count: 1
      when: base == 3
"""
VALIDATION = "Validating arguments against arg spec"


def _roles(tmp_path: Path) -> None:
    role = tmp_path / "roles" / "demo"
    (role / "meta").mkdir(parents=True)
    (role / "tasks").mkdir()
    (role / "meta" / "argument_specs.yml").write_text(SPEC)
    (role / "tasks" / "main.yml").write_text(
        "- name: Main's own\n  ansible.builtin.debug:\n    msg: '{{ demo_count }}'\n")
    (role / "tasks" / "other.yml").write_text(
        "- name: Other's own\n  ansible.builtin.debug:\n    msg: '{{ demo_mode }}'\n")


@pytest.mark.e2e
def test_a_passing_validation_forks_no_worker_and_the_run_is_the_same(tmp_path):
    _roles(tmp_path)
    fast, _, fast_forks, fast_events = run_forks(tmp_path, "fast", "", PLAYBOOK)
    stock, _, stock_forks, stock_events = run_forks(tmp_path, "stock", "arg_specs", PLAYBOOK)

    validations = [name for name in stock_forks if VALIDATION in name]
    assert len(validations) == 4
    # only the failing one goes to a worker (an include's condition is the include's own)
    assert [name for name in fast_forks if VALIDATION in name] == [validations[2]]
    assert [n for n in fast_forks if VALIDATION not in n] == [
        n for n in stock_forks if VALIDATION not in n]
    assert shape(fast_events) == shape(stock_events)
    for result in (fast, stock):
        assert (result.status, result.rc) == ("successful", 0)
    stats = next(e for e in fast_events if e["event"] == "playbook_on_stats")["event_data"]
    assert stats["rescued"] == {"localhost": 1}


@pytest.fixture
def arg_specs(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The module as the plugin imports it, through Ansible's collection loader."""
    forget_plain_imports(monkeypatch)
    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader([str(data_dir() / "collections")])
    return importlib.import_module(
        "ansible_collections.fem.core.plugins.plugin_utils.arg_specs")


def _task(args: dict, **keywords) -> Task:
    return Task.load({"name": "v", "action": "ansible.builtin.validate_argument_spec",
                      "args": args, **keywords}, loader=DataLoader())


OPTIONS = {"n": {"type": "int", "required": True}}
CONTEXT = {"type": "role", "name": "demo", "argument_spec_name": "main", "path": "/r"}


@pytest.mark.parametrize(("args", "task_vars", "keywords", "answered"), [
    ({"argument_spec": OPTIONS, "validate_args_context": CONTEXT}, {"n": 2}, {}, True),
    ({"argument_spec": OPTIONS, "provided_arguments": {"n": 2}}, {}, {}, True),
    ({"argument_spec": OPTIONS}, {"n": "2"}, {}, True),  # coerced, as the plugin does
    ({"argument_spec": OPTIONS}, {}, {}, False),  # fails: a worker fails it
    ({"argument_spec": OPTIONS}, {"n": "many"}, {}, False),
    ({"argument_spec": OPTIONS}, {"n": 2}, {"when": "x"}, False),
    ({"argument_spec": OPTIONS}, {"n": 2}, {"no_log": "{{ q }}"}, False),
    ({"argument_spec": OPTIONS, "other": 1}, {"n": 2}, {}, False),
    ({"argument_spec": {"n": {"type": "int", "description": "{{ x }}"}}}, {"n": 2}, {},
     False),
    ({"argument_spec": "{{ spec }}"}, {"n": 2}, {}, False),
    ({"provided_arguments": {}}, {"n": 2}, {}, False),
])
def test_only_a_literal_validation_that_passes_is_answered_here(arg_specs, args, task_vars,
                                                                keywords, answered):
    task = _task(args, **keywords)
    assert (arg_specs.result(task, task_vars) is not None) is answered


def test_the_result_is_the_action_plugins(arg_specs):
    task = _task({"argument_spec": OPTIONS, "validate_args_context": CONTEXT}, no_log=True)
    assert arg_specs.result(task, {"n": 2}) == {
        "validate_args_context": CONTEXT, "changed": False,
        "msg": "The arg spec validation passed", "_ansible_no_log": True}


def test_another_action_is_not_a_validation(arg_specs):
    task = Task.load({"name": "d", "ansible.builtin.debug": {"msg": "x"}}, loader=DataLoader())
    assert arg_specs.result(task, {}) is None
