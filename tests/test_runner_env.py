"""The environment the listener gives Ansible: the strategy setting reaches it, and runs see
only the collections they may use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fem_ansible.config import load_config
from fem_ansible.errors import ConfigError
from fem_ansible.runner import ansible_env, collections_view, scan_cache_dir


@pytest.fixture
def view(tmp_path: Path) -> Path:
    return collections_view(tmp_path / "work")


def test_mitogen_strategy_is_fem_cores_plugin_with_its_scan_cache(view: Path, tmp_path: Path):
    env = ansible_env("fem-n-t.a1", "mitogen", view, tmp_path / "scans")
    assert env["ANSIBLE_STRATEGY"] == "fem.core.mitogen_linear"
    assert (view / "ansible_collections/fem/core/plugins/strategy/mitogen_linear.py").is_file()
    assert env["FEM_IMPORT_SCAN_CACHE"] == str(tmp_path / "scans")
    assert env["FEM_JOB_ID"] == "fem-n-t.a1"
    assert "FEM_IMPORT_SCAN_CACHE" not in ansible_env("fem-doctor", "mitogen", view)


def test_the_scan_cache_dir_is_private_and_loses_stale_temp_files(tmp_path: Path):
    cache = tmp_path / "work" / "import-scan-cache"
    cache.mkdir(parents=True, mode=0o755)
    (cache / ".abc.1.2.tmp").write_bytes(b"x")
    os.utime(cache / ".abc.1.2.tmp", (1, 1))  # a run killed long ago, mid-write
    (cache / ".def.3.4.tmp").write_bytes(b"x")  # a run writing now
    (cache / "abc").write_bytes(b"entry")
    assert scan_cache_dir(tmp_path / "work") == cache
    assert cache.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in cache.iterdir()) == [".def.3.4.tmp", "abc"]


@pytest.mark.parametrize("listeners, runs", [
    (":/opt/fem/lib::rel/dir:/srv/site", "/opt/fem/lib:/srv/site"),
    ("", None), ("rel:.", None)])
def test_runs_get_the_listeners_python_path_absolute_entries_only(
        view: Path, monkeypatch, listeners: str, runs: str | None):
    """A run's ansible-playbook imports the listener's own fem_ansible; an empty or relative
    entry would put the run's working directory ahead of the standard library."""
    monkeypatch.setenv("PYTHONPATH", listeners)
    assert ansible_env("fem-n-t.a1", "linear", view).get("PYTHONPATH") == runs


def test_a_scan_cache_dir_that_is_not_ours_is_told(tmp_path: Path, caplog):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "import-scan-cache").symlink_to(tmp_path / "elsewhere")
    scan_cache_dir(tmp_path / "work")
    assert "is not a directory of this user's" in caplog.text
    caplog.clear()
    scan_cache_dir(tmp_path / "work2")
    assert "import-scan-cache" not in caplog.text


def test_linear_strategy_is_stock_ansible_and_keeps_routing_metadata(view: Path, tmp_path):
    env = ansible_env("fem-n-t.a1", "linear", view)
    assert "ANSIBLE_STRATEGY" not in env and "FEM_IMPORT_SCAN_CACHE" not in env
    env = ansible_env("fem-n-t.a1", "linear", view, tmp_path / "scans")
    assert env["FEM_IMPORT_SCAN_CACHE"] == str(tmp_path / "scans")


def _listing(view: Path) -> set[str]:
    root = view / "ansible_collections"
    return {f"{ns.name}.{c.name}" for ns in root.iterdir() for c in ns.iterdir()}


def test_the_view_holds_the_roles_collections_and_the_sites_and_is_made_once(tmp_path: Path):
    work = tmp_path / "work"
    view = collections_view(work, ("community.general",))
    assert _listing(view) == {"fem.core", "community.docker", "containers.podman",
                              "community.general"}
    assert (view / "ansible_collections/community/docker/plugins/modules/"
            "docker_image_pull.py").is_file()
    assert (view / "ansible_collections/fem/core/plugins/modules/docker_task.py").is_file()
    # Another process (no cache) finds the same directory; nothing else is left in work/.
    collections_view.cache_clear()
    assert collections_view(work, ("community.general",)) == view
    assert [p.name for p in work.iterdir()] == [view.name]


def test_a_view_half_made_by_a_killed_process_is_removed(tmp_path: Path):
    work, kept = tmp_path / "work", tmp_path / "kept"
    kept.mkdir()
    (kept / "file").write_text("x")
    for name in (".collections-killed", ".collections-now"):
        (work / name / "ansible_collections").mkdir(parents=True)
        (work / name / "ansible_collections" / "fem").symlink_to(kept)
    os.utime(work / ".collections-killed", (1, 1))
    collections_view.cache_clear()
    view = collections_view(work)
    assert sorted(p.name for p in work.iterdir()) == [".collections-now", view.name]
    assert (kept / "file").read_text() == "x"  # links removed, never followed


def test_a_collection_not_installed_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"execution\.collections: collection nosuch\.thing "
                                          r"is not installed"):
        collections_view(tmp_path / "work", ("nosuch.thing",))


def test_a_malformed_collection_name_is_refused(tmp_path: Path):
    cfg = tmp_path / "config.yml"
    cfg.write_text("node_id: n1\nexecution:\n  collections: ['../../etc']\n")
    with pytest.raises(ConfigError, match=r"execution\.collections: '\.\./\.\./etc' is not "
                                          r"a collection name"):
        load_config(cfg, environ={})


def _ini_file(view: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """``community.general.ini_file`` through ad-hoc Ansible with the run's environment."""
    env = {**os.environ, **ansible_env("fem-test", "linear", view)}
    return subprocess.run(
        ["ansible", "localhost", "-c", "local", "-m", "community.general.ini_file", "-a",
         f"path={target} section=s option=o value=v"],
        env=env, capture_output=True, text=True, timeout=120, check=False)


def test_ansible_resolves_only_the_collections_in_the_view(tmp_path: Path):
    target = tmp_path / "x.ini"
    refused = _ini_file(collections_view(tmp_path / "a"), target)
    assert refused.returncode != 0
    assert "Cannot resolve 'community.general.ini_file'" in refused.stdout
    assert not target.exists()
    done = _ini_file(collections_view(tmp_path / "b", ("community.general",)), target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "o = v" in target.read_text()


def test_doctor_checks_the_collections_without_creating_anything(tmp_path: Path):
    from fem_ansible.doctor import check_ansible

    work = tmp_path / "work"
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"node_id: n1\nexecution:\n  work_dir: {work}\n"
                   "  collections: [community.general, nosuch.thing]\n")
    [check] = list(check_ansible(load_config(cfg, environ={})))
    assert (check.status, check.name) == ("fail", "ansible")
    assert "collection nosuch.thing is not installed" in check.detail
    cfg.write_text(f"node_id: n1\nexecution:\n  work_dir: {work}\n"
                   "  collections: [community.general]\n")
    [check] = list(check_ansible(load_config(cfg, environ={})))
    assert check.status == "ok" and check.detail.endswith(
        "collections fem.core, community.docker, community.general, containers.podman")
    assert not work.exists()
