"""The node's disk stays safe (DESIGN.md §7, issue 18) through a real listener: a task that
fills its output dir past ``policy.limits.output_bytes`` is stopped while it runs, FAILED
``limit_exceeded`` with nothing uploaded; inputs are capped together, not each."""

from __future__ import annotations

import pytest
import requests

from tests.support import slurm
from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.services import upload_requests

pytestmark = pytest.mark.e2e


def uploads_under(env, base: str) -> list[str]:
    return [r["path"] for r in upload_requests(env)
            if r["path"].startswith(base) and r["method"] in ("PUT", "POST")]


@pytest.fixture(params=["docker", "podman", "slurm"])
def executor(request, site):
    """Each executor watches the output dir its own way (Docker API, podman CLI, Slurm
    poll)."""
    if request.param == "slurm":
        slurm.acquire()
        request.addfinalizer(slurm.release)
    return request.param


def test_output_filled_past_the_limit_stops_the_task_and_uploads_nothing(site, executor):
    env, orch = site.env, site.orchestrator
    tid = f"fills-output-{executor}"
    site.listener(site.config(
        policy={"limits": {"memory": "512Mi", "timeout_s": 600, "output_bytes": "4Mi"},
                "executors": {"allow": ["docker", "podman", "slurm"]}},
        execution={"podman": {"insecure_registries": [env["FEM_TEST_REGISTRY"]]}}))
    # Far more than the limit, then it would run for minutes: only the watch ends it early.
    orch.publish(site.task(tid, source=None, datasets=None, executor=executor, command=[
        "sh", "-c", "dd if=/dev/zero of=/fem/output/fill bs=1M count=32 && sleep 600"],
        resources={"memory": "128Mi", "timeout_s": 500}))
    final = orch.wait_terminal(tid, timeout=240)
    assert final["state"] == "FAILED", final
    # Read from the failed result's fem_error_code (the "verdict" branch); before it is
    # merged the listener reports the stage's default, execution_failed.
    assert final["error"]["code"] == "limit_exceeded", final
    assert "policy.limits.output_bytes" in final["error"]["message"]
    assert "STAGING_OUT" not in [e["state"] for e in orch.events(tid)]
    assert uploads_under(env, f"/{site.node}/{tid}/") == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_inputs_are_capped_together(site):
    env, orch = site.env, site.orchestrator
    tid = "inputs-total"
    inputs = []
    for name in ("a.bin", "b.bin"):
        url = f"{env['FEM_TEST_UPLOAD_URL']}/inputs/{site.node}/{name}"
        requests.put(url, data=b"x" * (600 << 10), timeout=10).raise_for_status()
        inputs.append({"url": url, "path": name})
    # Each input (600 KiB) is under the limit; both together are over it.
    site.listener(site.config(policy={"limits": {"memory": "512Mi", "timeout_s": 600,
                                                 "input_bytes": "1Mi"}}))
    orch.publish(site.task(tid, source=None, datasets=None, inputs=inputs))
    final = orch.wait_terminal(tid)
    assert final["state"] == "FAILED" and final["error"]["code"] == "input_failed", final
    assert [e["state"] for e in orch.events(tid)] == ["RECEIVED", "STAGING_IN", "FAILED"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
