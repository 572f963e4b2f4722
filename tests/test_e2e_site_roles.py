"""Roles a site owns (issue 6): the example site's roles (examples/site/roles) on
``execution.roles_path``, through a real listener and the real services.

- its ``fem_stage_out`` replaces the built-in one: the outputs archive carries the manifest
  only the site's role writes, written outside the container's output dir (a link the task
  plants there in its name does not make the host write through it, issue 18);
- its ``fem_executor_audited`` is a site executor: a task naming it runs through it (its
  note is in the task's logs) once ``policy.executors.allow`` lists it; it writes that note
  with ``community.general.ini_file``, which runs see only through
  ``execution.collections``, as the example's config.yml says.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import yaml

from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, REPO, leftovers

pytestmark = pytest.mark.e2e

SITE_ROLES = REPO / "examples" / "site" / "roles"


def test_site_roles_replace_and_add(site, tmp_path):
    env, orch = site.env, site.orchestrator
    victim = tmp_path / "host-file.txt"
    victim.write_text("the host's\n")
    example = yaml.safe_load((SITE_ROLES.parent / "config.yml").read_text())["execution"]
    config = site.config(execution={"work_dir": str(site.work_dir), "max_parallel": 2,
                                    "roles_path": [str(SITE_ROLES)],
                                    "collections": example["collections"]})
    data = yaml.safe_load(config.read_text())
    data["policy"]["executors"] = {"allow": ["docker", "audited"]}
    config.write_text(yaml.safe_dump(data))
    site.listener(config)
    task = site.task("site-stage-out")
    task["command"][-1] += f" && ln -s {victim} /fem/output/MANIFEST.sha256"
    orch.publish(task)
    orch.publish(site.task("site-executor", executor="audited"))

    replaced = orch.wait_terminal("site-stage-out")
    assert replaced["state"] == "COMPLETED", replaced
    outputs = tar_members(uploaded_file(env, replaced["outputs"]["url"]))
    digest = hashlib.sha256(outputs["result.txt"]).hexdigest()
    assert outputs["MANIFEST.sha256"].decode() == f"{digest}  ./result.txt\n"
    assert victim.read_text() == "the host's\n"
    with tarfile.open(fileobj=io.BytesIO(uploaded_file(env, replaced["outputs"]["url"]))) as tar:
        manifests = [m for m in tar.getmembers() if m.name.endswith("MANIFEST.sha256")]
    assert [(m.name, m.isfile()) for m in manifests] == [("MANIFEST.sha256", True)]
    logs = tar_members(uploaded_file(env, replaced["logs"]["url"]))
    assert "site-executor.txt" not in logs and b"task-done" in logs["stdout.log"]

    added = orch.wait_terminal("site-executor")
    assert added["state"] == "COMPLETED" and added["exit_code"] == 0, added
    logs = tar_members(uploaded_file(env, added["logs"]["url"]))
    assert b"run by the site executor fem_executor_audited" in logs["site-executor.txt"]
    assert b"task-done" in logs["stdout.log"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_site_playbook_dir_is_not_on_the_import_path(site, tmp_path):
    """A site playbook (``execution.playbook``) whose dir holds a ``profile.py``: no
    interpreter of the run imports it.  Ansible once started in the playbook's dir, and
    Mitogen's interpreter on the listener's host imports from its working dir first: this
    file shadowed the stdlib's ``profile``, which Mitogen imports as it starts, and every
    task of the site failed."""
    plays = tmp_path / "site-playbooks"
    plays.mkdir()
    (plays / "task.yml").write_text((REPO / "playbooks" / "task.yml").read_text())
    imported = tmp_path / "imported"
    (plays / "profile.py").write_text(
        f"open({str(imported)!r}, 'w').close()\n"
        "raise SystemExit('the playbook dir was imported')\n")
    site.listener(site.config(execution={"work_dir": str(site.work_dir),
                                         "playbook": str(plays / "task.yml")}))
    site.orchestrator.publish(site.task("site-playbook"))
    done = site.orchestrator.wait_terminal("site-playbook")
    assert done["state"] == "COMPLETED", done
    assert not imported.exists()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
