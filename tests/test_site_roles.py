"""Which executors the listener may stop by the stop request alone (issue 29)."""

from __future__ import annotations

import shutil

from fem_ansible.site_roles import stopped_by_file
from tests.support.harness import REPO


def test_only_the_built_in_container_executors_are_stopped_by_the_request_alone(make_config,
                                                                                tmp_path):
    builtin = make_config()
    assert stopped_by_file("docker", builtin) and stopped_by_file("podman", builtin)
    assert not stopped_by_file("slurm", builtin)
    # A site's role of the same name replaces the built-in one: its own stop runs.
    site_roles = tmp_path / "roles"
    shutil.copytree(REPO / "roles" / "fem_executor_docker", site_roles / "fem_executor_docker")
    replaced = make_config(execution={"work_dir": str(tmp_path / "work"),
                                      "roles_path": [str(site_roles)]})
    assert not stopped_by_file("docker", replaced) and stopped_by_file("podman", replaced)
