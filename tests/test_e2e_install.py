"""The built wheel installed into a fresh venv runs the sample task with no source checkout
anywhere on its path (issue 8): the playbooks, roles, inventory and collections it needs are
inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.harness import REPO

pytestmark = pytest.mark.e2e

DATA_DIRS = ("playbooks", "roles", "inventory", "collections")


def clean_env() -> dict[str, str]:
    """No FEM_* overrides, no PYTHONPATH, nothing that points back into the checkout."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("FEM_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))}


def data_files() -> set[str]:
    files = set()
    for top in DATA_DIRS:
        for path in (REPO / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.add(path.relative_to(REPO).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, env=clean_env(), cwd=out)
    (built,) = out.glob("fem_ansible-*.whl")
    return built


def test_wheel_carries_every_playbook_role_inventory_and_collection_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        packaged = {n.removeprefix("fem_ansible/_data/") for n in z.namelist()
                    if n.startswith("fem_ansible/_data/")}
    assert data_files() - packaged == set()


def test_installed_wheel_runs_the_sample_task(site, wheel, tmp_path):
    env = clean_env()
    home = tmp_path / "elsewhere"  # cwd outside the repo
    home.mkdir()
    venv.EnvBuilder(with_pip=True, clear=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    # --no-compile: byte-compiling Ansible's thousands of modules is most of the install time
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-compile", str(wheel)],
                   check=True, env=env, cwd=home)

    where = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import sys, fem_ansible.runner as r; print(r.__file__); print(r.data_dir());"
         "print(any('/work/' in p and 'venv' not in p for p in sys.path[1:]))"],
        check=True, env=env, cwd=home, capture_output=True, text=True).stdout.split()
    venv_root = str(tmp_path / "venv")
    assert where[0].startswith(venv_root) and where[1].startswith(venv_root), where
    assert str(REPO) not in where[0] and where[2] == "False"

    config = site.config()
    task_file = home / "task.json"
    task_file.write_text(json.dumps(site.task("from-wheel")))
    done = subprocess.run([str(bin_dir / "fem-ansible"), "run", "--config", str(config),
                           str(task_file)], env=env, cwd=home, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    states = [line.split()[1] for line in done.stdout.splitlines() if line[:3].strip().isdigit()]
    assert states == ["RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"], \
        done.stdout
    # the journal of that run tells the same, through the installed command
    shown = subprocess.run([str(bin_dir / "fem-ansible"), "tasks", "--config", str(config)],
                           env=env, cwd=home, capture_output=True, text=True, check=True)
    assert "from-wheel" in shown.stdout and "COMPLETED" in shown.stdout
