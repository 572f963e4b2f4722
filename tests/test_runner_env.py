"""The environment the listener gives Ansible: the strategy setting reaches it."""

from __future__ import annotations

from pathlib import Path

from fem_ansible.runner import ansible_env


def test_mitogen_strategy_names_the_installed_plugin():
    env = ansible_env("fem-n-t.a1", "mitogen")
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert (Path(env["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_linear.py").is_file()
    assert env["FEM_JOB_ID"] == "fem-n-t.a1"


def test_linear_strategy_is_stock_ansible():
    env = ansible_env("fem-n-t.a1", "linear")
    assert "ANSIBLE_STRATEGY" not in env and "ANSIBLE_STRATEGY_PLUGINS" not in env
