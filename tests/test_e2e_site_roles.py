"""Roles a site owns (issue 6): the example site's roles (examples/site/roles) on
``execution.roles_path``, through a real listener and the real services.

- its ``fem_stage_out`` replaces the built-in one: the outputs archive carries the manifest
  only the site's role writes, written outside the container's output dir (a link the task
  plants there in its name does not make the host write through it, issue 18);
- its ``fem_executor_audited`` is a site executor: a task naming it runs through it (its
  note is in the task's logs) once ``policy.executors.allow`` lists it; it writes that note
  with ``community.general.ini_file``, which runs see only through
  ``execution.collections``, as the example's config.yml says.

The roles of tests/site_roles/ (issue 17): the outcome is Ansible's own verdict, so a
site's role that rescues its own error completes, one that does not fails naming its role
and task, and a helper role of any name inherits the stage of the role including it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
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


# Ansible's own verdict (issue 17): site roles of tests/site_roles/, written as a sysadmin
# writes them, from docs/roles.md alone.
VERDICT_ROLES = REPO / "tests" / "site_roles"


def verdict_site(site, roles: str, **listener):
    """A listener whose roles path is ``tests/site_roles/<roles>``, allowing the site
    executor ``accounted``."""
    config = site.config(execution={"work_dir": str(site.work_dir), "max_parallel": 2,
                                    "roles_path": [str(VERDICT_ROLES / roles)]})
    data = yaml.safe_load(config.read_text())
    data["policy"]["executors"] = {"allow": ["docker", "accounted"]}
    config.write_text(yaml.safe_dump(data))
    return site.listener(config, **listener)


def outcome_audit(site, task_id: str) -> dict:
    lines = [json.loads(line) for line in (site.work_dir / "audit.jsonl").read_text().splitlines()]
    return next(a for a in lines if a["decision"] == "outcome" and a["task_id"] == task_id)


def test_site_roles_that_rescue_their_own_errors_complete(site):
    """A stage-out that falls back to SHA-256 where the host has no ``b3sum``, and an
    executor that runs the job when the accounting service is down: each rescues a failed
    task (``block``/``rescue``; the play's recap says failed=0, rescued=1), so each task
    ends COMPLETED with its outputs uploaded."""
    assert shutil.which("b3sum") is None, "the site's stage-out must find no b3sum here"
    env, orch = site.env, site.orchestrator
    verdict_site(site, "rescuing")
    orch.publish(site.task("rescued-stage-out"))
    orch.publish(site.task("rescued-executor", executor="accounted"))

    for tid in ("rescued-stage-out", "rescued-executor"):
        final = orch.wait_terminal(tid)
        assert final["state"] == "COMPLETED" and final["error"] is None, final
        assert [e["state"] for e in orch.distinct_events(tid)] == [
            "RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"]
        outputs = tar_members(uploaded_file(env, final["outputs"]["url"]))
        # The rescue's manifest: SHA-256 of the task's result.
        digest = hashlib.sha256(outputs["result.txt"]).hexdigest()
        assert outputs["MANIFEST"].decode() == f"{digest}  ./result.txt\n"
        logs = tar_members(uploaded_file(env, final["logs"]["url"]))
        assert b"task-done" in logs["stdout.log"]
    logs = tar_members(uploaded_file(env, orch.wait_terminal("rescued-executor")["logs"]["url"]))
    assert b"accounting service unavailable" in logs["accounting.txt"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_site_roles_without_rescue_fail_naming_role_and_task(site):
    """The same roles without ``rescue``: FAILED, the message naming the site's role and
    its task (in the event, the JSON log and the audit line), with the stage's code."""
    orch = site.orchestrator
    listener = verdict_site(site, "strict", args=["--log-format", "json"])
    orch.publish(site.task("strict-stage-out"))
    orch.publish(site.task("strict-executor", executor="accounted"))

    expected = {
        "strict-stage-out": ("stage_out", "stage_out_failed", "STAGING_OUT",
                             "fem_stage_out: Write a BLAKE3 manifest of the outputs: "),
        "strict-executor": ("run", "execution_failed", "RUNNING",
                            "fem_executor_accounted: Post the job to the accounting service: "),
    }
    for tid, (stage, code, last_state, message) in expected.items():
        final = orch.wait_terminal(tid)
        assert final["state"] == "FAILED", final
        assert (final["error"]["stage"], final["error"]["code"]) == (stage, code), final
        assert final["message"].startswith(message), final
        assert final["error"]["message"] == final["message"]
        assert final["outputs"] is None
        assert [e["state"] for e in orch.distinct_events(tid)][-2:] == [last_state, "FAILED"]
        audit = outcome_audit(site, tid)
        assert (audit["state"], audit["error"], audit["stage"], audit["message"]) == (
            "FAILED", code, stage, final["message"])
        logged = [json.loads(line) for line in listener.log.read_text().splitlines()
                  if line.startswith("{")]
        assert any(entry.get("task_id") == tid and final["message"] in entry["message"]
                   for entry in logged), tid
    assert "b3sum" in orch.wait_terminal("strict-stage-out")["message"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_helper_role_inherits_the_stage_of_the_role_including_it(site):
    """A site's ``fem_source`` that checks out through a helper role of its own,
    ``site_git_mirror``: the helper's failure is the stage-in's, ``source_checkout_failed``,
    and the message names the helper and its task."""
    orch = site.orchestrator
    verdict_site(site, "helper")
    orch.publish(site.task("helper-source"))
    final = orch.wait_terminal("helper-source")
    assert final["state"] == "FAILED", final
    assert final["error"]["stage"] == "stage_in"
    assert final["error"]["code"] == "source_checkout_failed"
    assert final["message"].startswith("site_git_mirror: Clone the source from the site's mirror: ")
    assert [e["state"] for e in orch.distinct_events("helper-source")] == [
        "RECEIVED", "STAGING_IN", "FAILED"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_a_site_executor_is_cancelled_through_its_stop_entry_point(site):
    """On the listener's own host the listener asks the built-in container executors' run
    module to stop by itself (issue 29); a site's executor is stopped through its own
    ``stop`` entry point, the stop playbook.  The example's delegates to the built-in
    Docker executor's stop, so the task ends CANCELLED only if that playbook ran."""
    orch = site.orchestrator
    example = yaml.safe_load((SITE_ROLES.parent / "config.yml").read_text())["execution"]
    config = site.config(execution={"work_dir": str(site.work_dir),
                                    "roles_path": [str(SITE_ROLES)],
                                    "collections": example["collections"]})
    data = yaml.safe_load(config.read_text())
    data["policy"]["executors"] = {"allow": ["docker", "audited"]}
    config.write_text(yaml.safe_dump(data))
    site.listener(config)
    orch.publish(site.task("site-cancel", executor="audited",
                           command=["sh", "-c", "echo begun; sleep 300"]))
    orch.wait_state("site-cancel", "RUNNING")
    orch.cancel("site-cancel")
    final = orch.wait_terminal("site-cancel", timeout=120)
    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled", final
    logs = tar_members(uploaded_file(site.env, final["logs"]["url"]))
    assert b"begun" in logs["stdout.log"] and logs["exit_code"] == b"143\n"
    assert b"fem_executor_audited" in logs["site-executor.txt"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
