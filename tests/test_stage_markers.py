"""Stage markers run in the controller under fem.core's ``mitogen_linear``
(``plugin_utils/stage_markers.py``): a marker forks no worker, and a run with them there
sends the same events, results and verdict as a run with every task in a worker."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.block import Block
from ansible.playbook.task import Task
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible.fastpath import patches
from fem_ansible.runner import (
    RunHooks,
    RunResult,
    RunSpec,
    collections_view,
    data_dir,
    run_playbook,
    scan_cache_dir,
)
from tests.support.plugin_import import forget_plain_imports

# Loaded at every interpreter's start (PYTHONPATH): logs the name of the task each worker
# process is forked for, found as the `self` of a frame above the fork (WorkerProcess.start).
FORK_LOG = """\
import os, sys

def _hook(event, args):
    if event != "os.fork":
        return
    frame = sys._getframe(1)
    while frame is not None:
        task = getattr(frame.f_locals.get("self"), "_task", None)
        if task is not None:
            with open(os.environ["FEM_TEST_FORK_LOG"], "a") as log:
                log.write(task.get_name() + "\\n")
            return
        frame = frame.f_back

sys.addaudithook(_hook)
"""

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


class _Stages(RunHooks):
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.reports: dict[str, Any] = {}

    def on_stage(self, stage: str) -> None:
        self.stages.append(stage)

    def on_report(self, data: dict[str, Any]) -> None:
        self.reports.update(data)


def _run(tmp_path: Path, name: str, off: str) -> tuple[RunResult, _Stages, list[str],
                                                         list[dict[str, Any]]]:
    """One run of PLAYBOOK under the fast path (``off``: the groups left out): its result,
    the stages it entered and what it reported, the tasks forked for, and its events."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(FORK_LOG)
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    inventory = tmp_path / "hosts"
    inventory.write_text(f"localhost ansible_connection=local "
                         f"ansible_python_interpreter={sys.executable}\n")
    forks = tmp_path / f"{name}.forks"
    forks.touch()
    pdd = tmp_path / name
    pdd.mkdir(mode=0o700)
    work = tmp_path / "work"
    spec = RunSpec(
        private_data_dir=pdd, ident=f"markers-{name}", playbook=tmp_path / "play.yml",
        inventory=inventory, limit="localhost", roles_path=[],
        collections=collections_view(work), scan_cache=scan_cache_dir(work),
        extravars={}, secrets={}, strategy="mitogen",
        env={"PYTHONPATH": f"{probe}:{Path(__file__).resolve().parents[1]}",
             "FEM_TEST_FORK_LOG": str(forks), "FEMCORE_FASTPATH_OFF": off})
    hooks = _Stages()
    result = run_playbook(spec, hooks, lambda: False)
    events = sorted((json.loads(p.read_text())
                     for p in (pdd / "artifacts" / spec.ident / "job_events").iterdir()),
                    key=lambda e: e["counter"])
    return result, hooks, forks.read_text().splitlines(), events


# What differs between any two runs: ids and times (``res`` is compared without its times).
VOLATILE = {"uuid", "play_uuid", "playbook_uuid", "task_uuid", "start", "end", "duration"}


def _shape(events: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each event's kind, output and data, without what differs from run to run."""
    def data(event: dict[str, Any]) -> dict[str, Any]:
        found = {k: v for k, v in event.get("event_data", {}).items() if k not in VOLATILE}
        if isinstance(found.get("res"), dict):
            found["res"] = {k: v for k, v in found["res"].items() if k not in VOLATILE}
        return found
    return [(e["event"], e.get("stdout", ""), data(e)) for e in events]


@pytest.mark.e2e
def test_markers_fork_no_worker_and_the_run_is_the_same(tmp_path: Path):
    fast, fast_hooks, fast_forks, fast_events = _run(tmp_path, "fast", "")
    stock, stock_hooks, stock_forks, stock_events = _run(tmp_path, "stock", "markers")

    assert stock_forks == MARKERS[:1] + IN_WORKERS[:2] + MARKERS[1:] + IN_WORKERS[2:]
    assert fast_forks == IN_WORKERS
    assert _shape(fast_events) == _shape(stock_events)
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
