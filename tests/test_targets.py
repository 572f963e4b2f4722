"""Unit tests of fem_ansible.targets: inventory groups, host picking, unreachable hosts."""

from __future__ import annotations

import sys
import tempfile

import pytest

from fem_ansible.errors import ConfigError, PolicyViolation
from fem_ansible.runner import collections_view
from fem_ansible.ssh_masters import scratch_control_dir
from fem_ansible.targets import Inventory, Targets, control_dir

LISTING = {
    "_meta": {"hostvars": {"a": {"fem_work_dir": "/srv/fem/"}, "b": {}, "c": {}}},
    "all": {"children": ["ungrouped", "compute"]},
    "compute": {"children": ["gpu"], "hosts": ["a"]},
    "gpu": {"hosts": ["b", "c"]},
    "ungrouped": {},
}


@pytest.fixture
def targets(make_config, tmp_path):
    t = Targets(make_config(), tmp_path)
    t._inventory = Inventory.from_list(LISTING)
    return t


def test_groups_include_child_groups_and_hosts_are_targets(targets):
    inv = targets.inventory
    assert inv.hosts_of("compute") == ["a", "b", "c"]
    assert inv.hosts_of("b") == ["b"] and inv.hosts_of("ungrouped") == []
    assert targets.work_dir("a") == "/srv/fem"
    assert targets.work_dir("b") == targets.config.execution.work_dir
    with pytest.raises(PolicyViolation, match=r"execution\.inventory"):
        targets.check({"task_id": "t", "target": "ungrouped"})


def test_least_busy_host_then_least_recently_picked(targets):
    assert [targets.acquire("compute") for _ in range(4)] == ["a", "b", "c", "a"]
    targets.release("b")
    assert targets.acquire("compute") == "b"


def test_unreachable_host_is_skipped_and_the_task_moves(targets):
    first = targets.acquire("gpu")
    tried: list[str] = []
    moved = targets.retry_host({"target": "gpu"}, first, True, [], tried)
    assert (first, moved, tried) == ("b", "c", ["b"])
    # b is passed over for the next task although it is the least busy.
    assert targets.acquire("gpu") == "c"
    # Nothing left to try: the task stays where it is and fails there.
    assert targets.retry_host({"target": "gpu"}, "c", True, [], ["b"]) is None
    # Not unreachable, or a stage already done on the host: no move.
    assert targets.retry_host({"target": "gpu"}, "c", False, [], []) is None
    assert targets.retry_host({"target": "gpu"}, "c", True, ["stage_in"],
                              []) is None


def test_fem_work_dir_must_be_a_plain_absolute_path():
    inv = Inventory.from_list({"_meta": {"hostvars": {"h": {"fem_work_dir": "{{ x }}/w"}}},
                               "all": {"hosts": ["h"]}})
    with pytest.raises(ConfigError, match="fem_work_dir"):
        inv.work_dir("h", "/var/lib/fem-ansible")


# What ssh adds to a ControlPath dir: "/", %C (40 bytes) and a temporary suffix (17).
SSH_ADDS = 58


@pytest.mark.parametrize("long_tmpdir", [False, True])
def test_control_dir_fits_a_socket_path(make_config, monkeypatch, tmp_path, long_tmpdir):
    """A long work dir goes to a temp dir; a long TMPDIR too, to /tmp (an outside review
    found doctor's hosts all unreachable with a 43-byte TMPDIR)."""
    if long_tmpdir:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        assert len(str(tmp_path)) > 43
    config = make_config(execution={"work_dir": "/" + "x" * 120})
    path = control_dir(config, "fem-node-" + "t" * 128 + ".a1")
    assert len(str(path)) + SSH_ADDS <= 107 and path.parent.stat().st_mode & 0o077 == 0
    with scratch_control_dir("fem-doctor-") as scratch:
        assert len(str(scratch)) + SSH_ADDS <= 107


def test_the_inventory_is_read_with_the_environment_runs_get(tmp_path, monkeypatch):
    """ansible-inventory, which runs a site's inventory scripts and plugins, sees what a
    run sees of the listener's environment (runner.PASSED_ENV), not a service manager's
    or an operator's other variables."""
    script = tmp_path / "inventory.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os\n"
        "seen = {k: os.environ.get(k, '') for k in ('SITE_SECRET', 'TZ')}\n"
        "print(json.dumps({'all': {'hosts': ['h']}, '_meta': {'hostvars': {'h': seen}}}))\n")
    script.chmod(0o755)
    monkeypatch.setenv("SITE_SECRET", "s3cret")
    monkeypatch.setenv("TZ", "Europe/Madrid")
    inventory = Inventory.load(script, collections_view(tmp_path / "work"))
    assert inventory.hostvars["h"] == {"SITE_SECRET": "", "TZ": "Europe/Madrid"}
