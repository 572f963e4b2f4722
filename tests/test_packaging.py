"""The sdist and wheel build from any checkout state (issue 20 item 1): a demo run's
git-ignored `.fem-dev/` with its symlink into `collections/` once made hatchling skip the
real collections ("Forced include not found")."""

from __future__ import annotations

import tarfile
import zipfile

from tests.support.dists import build, checkout_after_demo
from tests.support.harness import REPO

DATA_DIRS = ("playbooks", "roles", "inventory", "collections")


def test_sdist_and_wheel_build_after_the_demo_ran(tmp_path):
    source = checkout_after_demo(tmp_path / "checkout")
    out = tmp_path / "dist"
    out.mkdir()
    sdist, wheel = build(source, out)

    expected = {p.relative_to(REPO).as_posix() for top in DATA_DIRS
                for p in (REPO / top).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    packaged = {n.removeprefix("fem_ansible/_data/") for n in names
                if n.startswith("fem_ansible/_data/")}
    assert expected - packaged == set()
    # what install-service and the guide need from the wheel alone
    assert {"contrib/fem-ansible.service", "examples/sample-task.json"} <= packaged
    assert not any(".fem-dev" in n for n in names)

    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {f"{top}/" in " ".join(members) for top in DATA_DIRS} == {True}
    assert "pyproject.toml" in members and not any(".fem-dev" in m for m in members)
