"""Every wait bounded, every wait cancellable (issue 26, reproduction 7): an allowed upload
endpoint that reads the body, then answers a byte every few seconds, or closes inside its
answer's head; a cancel in the play's stage-out; a registry that answers a byte at a time.
Through a real listener, broker, engine, registry, git daemon and upload endpoint; the
misbehaving server is tests/support/slow_server.py on its own loopback port."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.slow_server import SlowServer

pytestmark = pytest.mark.e2e


def _to(srv: SlowServer, site, task_id: str, **overrides) -> dict:
    """The sample task, its outputs uploaded to ``srv`` (its logs to the real endpoint)."""
    return site.task(task_id, outputs={"upload": {"url": f"{srv.url}/{task_id}/o.tar.gz"}},
                     **overrides)


def _config(site, *servers: SlowServer, **http):
    uploads = [f"{site.env['FEM_TEST_UPLOAD_URL']}/**", *(f"{s.url}/**" for s in servers)]
    return site.config(policy={"uploads": {"allow": uploads}}, http=http)


def test_cancel_during_a_trickling_upload_frees_the_slot(site):
    orch = site.orchestrator
    with SlowServer("trickle", interval_s=5) as srv:
        site.listener(_config(site, srv))  # one slot; the default deadline, an hour
        orch.publish(_to(srv, site, "held"))
        orch.publish(site.task("next"))  # waits in the broker while "held" has the slot
        srv.wait_open(1, timeout=240)  # the outputs' body is read, the answer trickles
        assert orch.wait_state("held", "STAGING_OUT")
        cancelled_at = time.monotonic()
        orch.cancel("held")
        final = orch.wait_terminal("held", timeout=30)
        assert time.monotonic() - cancelled_at < 30
        assert final["state"] == "CANCELLED", final
        assert final["error"]["code"] == "cancelled" and final["error"]["stage"] == "stage_out"
        assert final["exit_code"] is None
        # The upload's connection was closed by the listener, not by the server.
        end = time.monotonic() + 10
        while srv.open and time.monotonic() < end:
            time.sleep(0.1)
        assert srv.open == 0
        following = orch.wait_terminal("next", timeout=240)
        assert following["state"] == "COMPLETED", following
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_cut_answer_fails_and_deadline_ends_a_trickler(site):
    orch = site.orchestrator
    with SlowServer("cut") as cut, SlowServer("trickle", interval_s=2) as trickle:
        site.listener(_config(site, cut, trickle, upload_tries=2, retry_backoff_s=0.2,
                              transfer_timeout_s=8))
        orch.publish(_to(cut, site, "cut"))
        orch.publish(_to(trickle, site, "trickled"))
        cut_end = orch.wait_terminal("cut", timeout=240)
        assert cut_end["state"] == "FAILED", cut_end
        assert cut_end["error"]["code"] == "stage_out_failed"
        assert "COMPLETED" not in [e["state"] for e in orch.events("cut")]
        assert cut.bodies == 2, "both tries were made and answered with a cut head"
        trickled = orch.wait_terminal("trickled", timeout=240)
        assert trickled["state"] == "FAILED", trickled
        assert trickled["error"]["code"] == "stage_out_failed"
        assert "not done within 8s (http.transfer_timeout_s)" in trickled["error"]["message"]
        # 39 bytes at one every 2 s would take 78 s; the deadline ended it after 8.
        assert trickle.bodies == 1
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_cancel_during_the_plays_stage_out_stops_it(site, tmp_path):
    """A site's stage-out that would take two minutes: the cancel stops the play there and
    cleans up, instead of letting it finish (as it did before issue 26)."""
    orch = site.orchestrator
    tasks = tmp_path / "roles" / "fem_stage_out" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(
        "- name: A stage-out that takes its time\n"
        "  ansible.builtin.wait_for:\n"
        "    timeout: 120\n")
    site.listener(site.config(execution={"work_dir": str(site.work_dir),
                                         "roles_path": [str(tmp_path / "roles")]}))
    orch.publish(site.task("slow-out"))
    orch.wait_state("slow-out", "STAGING_OUT")
    time.sleep(2)  # into the site's role
    cancelled_at = time.monotonic()
    orch.cancel("slow-out")
    final = orch.wait_terminal("slow-out", timeout=30)
    assert time.monotonic() - cancelled_at < 30
    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled", final
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_pull_from_a_trickling_registry_ends_at_its_timeout(site, tmp_path):
    """The registry answers a byte every 5 s (the engine's every read in time): the pull
    ends at the host's ``fem_image_pull_timeout``, the task FAILED ``image_pull_failed``."""
    orch = site.orchestrator
    with SlowServer("trickle", interval_s=5) as registry:
        host = registry.url.removeprefix("http://")
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "fem_image_pull_timeout": 10}}}}))
        site.listener(site.config(
            execution={"work_dir": str(site.work_dir), "inventory": str(inventory)},
            policy={"images": {"allow": [f"{host}/**"]}}))
        orch.publish(site.task("slow-pull", source=None,
                               image={"ref": f"{host}/fem/slow:1", "pull_policy": "always"}))
        final = orch.wait_terminal("slow-pull", timeout=240)
    assert final["state"] == "FAILED", final
    assert final["error"]["code"] == "image_pull_failed"
    assert "Timed out after 10 second(s)" in final["error"]["message"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
