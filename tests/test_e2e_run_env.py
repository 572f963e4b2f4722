"""A run gets only the environment it needs (issue 18): a secret in the listener's own
environment reaches neither the run's processes nor anything ansible-runner writes into the
run's private data dir (``artifacts/<ident>/command`` holds the run's environment)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

SECRET = "listener-only-9f3c1e7a"


def test_the_listeners_environment_stays_out_of_the_run(site):
    orch = site.orchestrator
    # Not FEM_*: those are the listener's config overrides.
    # FEMCORE_FASTPATH_OFF, bench/profile.py's --without, must reach the run: confined away,
    # every pair of bench/pairs.py compared the fast path with itself.
    # PYTHONPATH reaches it with its absolute entries only (runner._python_path).
    site.listener(env={"SITE_DB_PASSWORD": SECRET, "TZ": "UTC",
                       "FEMCORE_FASTPATH_OFF": "cpu_placement",
                       "PYTHONPATH": f":{site.work_dir.parent}:relative"})
    orch.publish(site.task("env-confined"))
    final = orch.wait_terminal("env-confined")
    assert final["state"] == "COMPLETED", final

    commands = list(site.work_dir.rglob("artifacts/*/command"))
    assert commands, "ansible-runner wrote no artifacts/<ident>/command"
    for command in commands:
        env = json.loads(command.read_text())["env"]
        assert "SITE_DB_PASSWORD" not in env and env.get("TZ") == "UTC"
        assert env.get("FEMCORE_FASTPATH_OFF") == "cpu_placement"
        assert env.get("PYTHONPATH") == str(site.work_dir.parent)
        assert env["FEM_JOB_ID"] and "ANSIBLE_CALLBACK_PLUGINS" in env
    leaked = [p for p in site.work_dir.rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
