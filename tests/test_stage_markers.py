"""Stage markers run in the controller under fem.core's ``mitogen_linear``
(``plugin_utils/stage_markers.py``): a marker forks no worker, and a run with them there
sends the same events, results and verdict as a run with every task in a worker."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.block import Block
from ansible.playbook.task import Task
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible.fastpath import patches
from fem_ansible.runner import data_dir
from tests.support.in_controller import run_forks, shape
from tests.support.plugin_import import forget_plain_imports

PLAYBOOK = """\
- name: Markers among other tasks
  hosts: all
  gather_facts: false
  tasks:
    - name: Main
      block:
        - name: Literal marker
          ansible.builtin.set_stats:
            data: {fem_stage: stage_in, fem_error_code: image_pull_failed}
            per_host: false
            aggregate: false
        - name: Templated set_stats
          ansible.builtin.set_stats:
            data: {fem_stage: run, twice: "{{ 2 * 2 }}"}
            aggregate: false
        - name: Fails and is rescued
          ansible.builtin.fail:
            msg: boom
      rescue:
        - name: Marker in rescue
          ansible.builtin.set_stats:
            data: {fem_stage: stage_out, note: [1, true, null]}
            aggregate: false
    - name: Registered marker
      ansible.builtin.set_stats:
        data: {fem_stage: done}
        aggregate: false
      register: marked
    - name: Quiet marker
      ansible.builtin.set_stats:
        data: {quiet: 1}
      no_log: true
    - name: Conditional set_stats
      ansible.builtin.set_stats:
        data: {skipped_here: true}
      when: false
    - name: Reads the registered marker
      ansible.builtin.assert:
        that: [marked.ansible_stats.data.fem_stage == "done"]
"""
IN_WORKERS = ["Templated set_stats", "Fails and is rescued", "Conditional set_stats",
              "Reads the registered marker"]
MARKERS = ["Literal marker", "Marker in rescue", "Registered marker", "Quiet marker"]


@pytest.mark.e2e
def test_markers_fork_no_worker_and_the_run_is_the_same(tmp_path: Path):
    # skips off on both sides: "Conditional set_stats" is a marker's look-alike skipped
    fast, fast_hooks, fast_forks, fast_events = run_forks(tmp_path, "fast", "skips", PLAYBOOK)
    stock, stock_hooks, stock_forks, stock_events = run_forks(tmp_path, "stock",
                                                              "markers,skips", PLAYBOOK)

    assert stock_forks == MARKERS[:1] + IN_WORKERS[:2] + MARKERS[1:] + IN_WORKERS[2:]
    assert fast_forks == IN_WORKERS
    assert shape(fast_events) == shape(stock_events)
    for result, hooks in ((fast, fast_hooks), (stock, stock_hooks)):
        assert (result.status, result.rc, result.failure) == ("successful", 0, None)
        assert hooks.reports == {"twice": 4, "note": [1, True, None]}
        assert hooks.stages == ["stage_in", "run", "stage_out", "done"]
    stats = next(e for e in fast_events if e["event"] == "playbook_on_stats")["event_data"]
    assert (stats["rescued"], stats["failures"], stats["skipped"]) == (
        {"localhost": 1}, {}, {"localhost": 1})


@pytest.fixture
def stage_markers(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The module as the plugin imports it, through Ansible's collection loader."""
    forget_plain_imports(monkeypatch)
    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader([str(data_dir() / "collections")])
    return importlib.import_module(
        "ansible_collections.fem.core.plugins.plugin_utils.stage_markers")


MARKER = {"name": "m", "ansible.builtin.set_stats": {"data": {"fem_stage": "run"},
                                                     "aggregate": False}}


@pytest.mark.parametrize(("extra", "marker"), [
    ({}, True),
    ({"register": "r", "ignore_errors": True, "tags": ["run"], "no_log": True}, True),
    ({"ansible.builtin.set_stats": {}}, True),
    ({"check_mode": True, "run_once": True, "debugger": "on_failed", "throttle": 1}, True),
    ({"ansible.builtin.set_stats": {"data": {"k": [1, None]}, "per_host": True}}, True),
    # the parser leaves an action: form unresolved (a `collections:` keyword may change it)
    ({"ansible.builtin.set_stats": None, "action": {
        "module": "ansible.builtin.set_stats", "data": {"k": 1}}}, False),
    ({"ansible.builtin.set_stats": None, "action": "ansible.builtin.set_stats",
      "args": {"data": {"k": 1}}}, False),
    ({"ansible.builtin.set_stats": None, "set_stats": {"data": {}}}, True),  # as resolved
    ({"when": "x"}, False),
    ({"changed_when": True}, False),
    ({"failed_when": "x"}, False),
    ({"loop": [1]}, False),
    ({"loop": []}, False),
    ({"run_once": "{{ once }}"}, False),
    ({"debugger": "{{ when }}"}, False),
    ({"throttle": "{{ n }}"}, False),
    ({"with_items": [1]}, False),
    ({"until": "r is done", "retries": 2}, False),
    ({"retries": 2}, False),
    ({"timeout": 5}, False),
    ({"async": 5}, False),
    ({"delegate_to": "other"}, False),
    ({"no_log": "{{ quiet }}"}, False),
    ({"module_defaults": {"ansible.builtin.set_stats": {"aggregate": True}}}, False),
    ({"ansible.builtin.set_stats": {"data": {"k": "{{ v }}"}}}, False),
    ({"ansible.builtin.set_stats": {"data": {"{% if 1 %}k{% endif %}": 1}}}, False),
    ({"ansible.builtin.set_stats": {"data": {"k": "#jinja2:variable_start_string:'[['\n[[ v ]]"}}},
     False),
    ({"ansible.builtin.set_stats": {"data": "{{ d }}"}}, False),
    ({"ansible.builtin.set_stats": {"data": {"not a name": 1}}}, False),
    ({"ansible.builtin.set_stats": {"data": {}, "per_host": "yes"}}, False),
    ({"ansible.builtin.set_stats": {"data": {}, "other": 1}}, False),
    ({"ansible.builtin.set_stats": None, "ansible.builtin.debug": {"msg": "x"}}, False),
])
def test_only_a_literal_set_stats_of_its_arguments_alone_is_a_marker(stage_markers, extra,
                                                                     marker):
    data = {k: v for k, v in {**MARKER, **extra}.items() if v is not None}
    assert (stage_markers.result(Task.load(data, loader=DataLoader())) is not None) is marker


@pytest.mark.parametrize(("args", "stats"), [
    ({}, {"data": {}, "per_host": False, "aggregate": True}),
    ({"data": {"k": [1]}, "per_host": True},
     {"data": {"k": [1]}, "per_host": True, "aggregate": True}),
    ({"data": {"k": "v"}, "aggregate": False},
     {"data": {"k": "v"}, "per_host": False, "aggregate": False}),
])
def test_a_markers_result_is_set_stats_own(stage_markers, args, stats):
    """set_stats.run's result, with what Ansible's task executor adds (``failed``,
    ``_ansible_no_log``); the e2e test compares whole runs."""
    task = Task.load({"name": "m", "ansible.builtin.set_stats": args, "no_log": True},
                     loader=DataLoader())
    returned = stage_markers.result(task)
    assert returned == {"changed": False, "ansible_stats": stats, "failed": False,
                        "_ansible_no_log": True}
    assert returned["ansible_stats"]["data"] is not task.args.get("data")


def test_the_release_the_markers_were_read_against_is_the_pinned_one():
    pins = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"ansible-core=={patches.MARKERS_RELEASE}"' in pins


def test_a_keyword_inherited_from_the_block_counts(stage_markers):
    block = Block.load({"block": [MARKER], "when": "x"}, loader=DataLoader())
    assert stage_markers.result(block.block[0]) is None
