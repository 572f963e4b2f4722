"""The version a node reports is the installed distribution's (issue 27): after an upgrade,
``fem-ansible --version``, the ``fem_info`` metric and the heartbeat say what ``pip show``
says, not a number written into the source."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.dists import build, checkout_after_demo, venv_for_another_user
from tests.support.harness import REPO

OTHER = "7.6.5.post3"


def test_version_and_fem_info_come_from_the_installed_wheel(tmp_path):
    source = checkout_after_demo(tmp_path / "checkout")
    project = source / "pyproject.toml"
    text, n = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{OTHER}"', project.read_text())
    assert n == 1
    project.write_text(text)
    out = tmp_path / "dist"
    out.mkdir()
    _sdist, wheel = build(source, out)
    assert OTHER in wheel.name

    # this venv's packages beside the new one, which comes first on the path
    bin_dir = venv_for_another_user(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"),
                    "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   env=env, check=True, capture_output=True)

    version = subprocess.run([str(bin_dir / "fem-ansible"), "--version"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"fem-ansible, version {OTHER}"

    config = tmp_path / "config.yml"
    config.write_text(f"node_id: site-v\nexecution:\n  work_dir: {tmp_path / 'work'}\n")
    probe = (
        "import pathlib, sys, fem_ansible\n"
        "from prometheus_client import generate_latest\n"
        "from fem_ansible.config import load_config\n"
        "from fem_ansible.metrics import Metrics\n"
        "print(pathlib.Path(fem_ansible.__file__).parent)\n"
        "metrics = Metrics(load_config(sys.argv[1], environ={}))\n"
        "print(generate_latest(metrics.registry).decode())\n"
    )
    done = subprocess.run([str(bin_dir / "python"), "-c", probe, str(config)], env=env,
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    package, exposition = done.stdout.split("\n", 1)
    # the wheel's copy ran, not this checkout's
    assert Path(package).is_relative_to(tmp_path / "venv"), package
    (info,) = [line for line in exposition.splitlines() if line.startswith("fem_info{")]
    assert f'version="{OTHER}"' in info, info


def test_a_source_tree_without_metadata_says_its_pyproject_version():
    """Run from a checkout with no distribution installed (no site-packages at all), the
    version is the one ``pyproject.toml`` would build."""
    expected = re.search(r'(?m)^version = "([^"]*)"$',
                         (REPO / "pyproject.toml").read_text()).group(1)
    done = subprocess.run([sys.executable, "-I", "-S", "-c",
                           f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                           "import fem_ansible; print(fem_ansible.__version__)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == expected
