"""The fast path's start-up check: every private name of Mitogen and Ansible it patches has
the shape it was written for, else one warning and runs as with Mitogen's own strategy (or
stock ``linear``), never failing tasks."""

from __future__ import annotations

import importlib
import json
import marshal
import subprocess
import sys
import types
from pathlib import Path

import ansible_mitogen.affinity
import ansible_mitogen.module_finder
import ansible_mitogen.planner
import ansible_mitogen.services
import mitogen.master
import mitogen.minify
import mitogen.parent
import pytest
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible import fastpath
from fem_ansible.fastpath import patches
from fem_ansible.runner import data_dir
from tests.support.plugin_import import forget_plain_imports

FORWARDS = "ansible_mitogen.services:ContextService._send_module_forwards"
PLUGIN = "ansible_collections.fem.core.plugins.strategy.mitogen_linear"
DOCUMENTED = 'def f():\n    "doc"\n    return 1  # dropped\n'


def test_the_installed_versions_are_the_ones_the_patches_were_written_for():
    assert patches.missing(patches.PATCHES) == []


def test_a_name_absent_or_of_another_shape_is_named(monkeypatch):
    monkeypatch.delattr(ansible_mitogen.services.ContextService, "_send_module_forwards")
    monkeypatch.setattr(mitogen.minify, "minimize_source", lambda source, level=1: source)
    assert patches.missing(patches.STRATEGY) == [
        "mitogen.minify:minimize_source (changed)", f"{FORWARDS} (absent)"]
    assert patches.missing(["routing"]) == []


def test_a_caller_no_longer_looking_up_compile_is_a_change(monkeypatch):
    def get_code(module):  # a release that compiles through something else
        return module
    monkeypatch.setattr(ansible_mitogen.module_finder, "get_code", get_code)
    assert patches.missing(["import_scans"]) == [
        "ansible_mitogen.module_finder:get_code (changed)"]


@pytest.fixture
def load_plugin(monkeypatch):
    """Loads fem.core's plugin as Ansible does; what it may replace is put back after."""
    for module, name in ((mitogen.master, "compile"), (ansible_mitogen.module_finder, "compile")):
        monkeypatch.setattr(module, name, getattr(module, name, compile), raising=False)
    for owner, name in ((mitogen.minify, "minimize_source"),
                        (ansible_mitogen.planner, "_load_collections"),
                        (mitogen.parent.Connection, "get_econtext_config"),
                        (mitogen.parent.Connection, "start_child"),
                        (ansible_mitogen.affinity, "policy")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    forget_plain_imports(monkeypatch)
    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader([str(data_dir() / "collections")])

    def load() -> types.ModuleType:
        monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
        return importlib.import_module(PLUGIN)

    return load


def test_the_plugin_applies_nothing_when_a_name_is_missing(load_plugin, monkeypatch):
    """Where the check runs again: the plugin as it loads (the installation changed under a
    running listener), with one warning in the run's output."""
    warnings = []
    monkeypatch.setattr("ansible.utils.display.Display.warning",
                        lambda self, msg, *a, **kw: warnings.append(msg))
    stock_policy = ansible_mitogen.affinity.policy
    monkeypatch.delattr(ansible_mitogen.services.ContextService, "_send_module_forwards")
    plugin = load_plugin()
    assert plugin._stage_markers is None  # every task forks a worker, markers too
    assert plugin._freeze is False
    assert mitogen.master.compile is compile
    assert mitogen.minify.minimize_source(DOCUMENTED) == "def f():\n\n return 1\n"
    assert ansible_mitogen.affinity.policy is stock_policy
    assert len(warnings) == 1 and f"{FORWARDS} (absent)" in warnings[0]


def test_a_group_left_out_for_the_benchmark_is_not_applied(load_plugin, monkeypatch):
    monkeypatch.setenv(patches.OFF_ENV, "unminified, cpu_placement")
    stock_policy = ansible_mitogen.affinity.policy
    plugin = load_plugin()
    assert plugin._stage_markers is not None and plugin._freeze is True
    assert mitogen.master.compile is plugin.cached_compile
    assert mitogen.minify.minimize_source(DOCUMENTED) != DOCUMENTED
    assert ansible_mitogen.affinity.policy is stock_policy
    monkeypatch.setenv(patches.OFF_ENV, "markers,frozen_heap")
    plugin = load_plugin()
    assert plugin._stage_markers is None and plugin._freeze is False


def test_set_stats_taking_other_arguments_turns_the_markers_off(monkeypatch):
    import ansible.plugins.action.set_stats as set_stats
    monkeypatch.setattr(set_stats.ActionModule, "_VALID_ARGS",
                        frozenset({"aggregate", "data", "per_host", "scope"}))
    assert patches.missing(["markers"]) == [
        "ansible.plugins.action.set_stats:ActionModule._VALID_ARGS (changed)"]


def _report(monkeypatch, **report) -> None:
    """The check's subprocess answers ``report`` (the listener's side of the check)."""
    answer = {"mitogen": "/mitogen/plugins/strategy", "error": None, "missing": [],
              "groups": [], **report}
    monkeypatch.setattr(fastpath.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(
        a, 0, stdout=json.dumps(answer), stderr=""))


@pytest.mark.parametrize(("report", "env", "says"), [
    ({}, {"ANSIBLE_STRATEGY": fastpath.FEM_STRATEGY}, None),
    ({"missing": [f"{FORWARDS} (absent)"], "groups": ["own_host"]},
     {"ANSIBLE_STRATEGY": "mitogen_linear",
      "ANSIBLE_STRATEGY_PLUGINS": "/mitogen/plugins/strategy"}, "Mitogen's own"),
    ({"missing": ["x:_meta_yml_to_dict (changed)"], "groups": ["routing"]},
     {"ANSIBLE_STRATEGY": fastpath.FEM_STRATEGY}, "runs go without routing"),
    ({"missing": ["y:compile (changed)"], "groups": ["compiled_templates"]},
     {"ANSIBLE_STRATEGY": fastpath.FEM_STRATEGY}, "runs go without compiled_templates"),
    ({"mitogen": None, "error": "AnsibleError: too old"}, {}, "linear"),
])
def test_the_listener_picks_the_runs_strategy_from_the_check(monkeypatch, caplog, report, env,
                                                              says):
    _report(monkeypatch, **report)
    assert fastpath._check() == env
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (says is not None)
    assert all(says in w and "fast path off" in w for w in warnings)


def test_a_check_that_does_not_run_means_stock_linear(monkeypatch, caplog):
    def fails(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args)
    monkeypatch.setattr(fastpath.subprocess, "run", fails)
    assert fastpath._check() == {}
    assert ["fast path off" in r.getMessage() for r in caplog.records] == [True]


# -- through the real listener -------------------------------------------------------------

# Run as sitecustomize in every Python process of the listener's, it removes the name only
# in the start-up check's: as a Mitogen release without it would look to the check, while
# Mitogen's own strategy, which runs the tasks then, keeps working.
REMOVE_IN_CHECK = """\
import sys
if any(arg.endswith("plugin_utils/fastpath.py") for arg in sys.orig_argv):
    import ansible_mitogen.services
    del ansible_mitogen.services.ContextService._send_module_forwards
"""


@pytest.mark.e2e
def test_a_listener_on_a_mismatching_mitogen_warns_once_and_completes_tasks(site, tmp_path):
    custom = tmp_path / "site-custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(REMOVE_IN_CHECK)
    lst = site.listener(site.config(execution={"strategy": "mitogen"}),
                        env={"PYTHONPATH": str(custom)})
    for tid in ("first", "second"):
        site.orchestrator.publish(site.task(tid))
        final = site.orchestrator.wait_terminal(tid)
        assert final["state"] == "COMPLETED", final
    log = lst.log.read_text()
    warned = [line for line in log.splitlines() if "fast path off" in line]
    assert len(warned) == 1, log
    assert f"{FORWARDS} (absent)" in warned[0] and "WARNING" in warned[0].upper()
    assert f"Mitogen's own {fastpath.MITOGEN_STRATEGY}" in warned[0]
    # Mitogen's own plugin ran the tasks: no import scans kept (fem.core's would have),
    # while fem-ansible's ansible-playbook still kept the routing metadata it checked.
    kept = [marshal.loads(p.read_bytes())
            for p in Path(site.work_dir / "import-scan-cache").iterdir()]
    assert kept and not any(isinstance(v, types.CodeType) for v in kept)
