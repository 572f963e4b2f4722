"""The legacy protocol as the real orchestrator speaks it (issue 19), end to end: a client
written from the wire format of docs/legacy.md drives a real ``fem-ansible listen`` whose site
catalogue (``legacy.tools``) maps tools onto tasks; the tasks run on the real engine."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import uuid

import pika
import pytest

from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.legacy_orchestrator import LegacyOrchestrator, legacy_body

pytestmark = pytest.mark.e2e

TOKEN = "tok-3f9a1c77e2"  # 14 characters: the tool checks only the length it sees
# What Kaapana's fem-adapter prints on success (docs/legacy.md, "The reply to submit_run").
KAAPANA_COMMAND = (
    "sh -c 'test ${#FEM_TOKEN} -eq 14 && echo done > /sandbox/result.txt"
    " && printf \"{\\\"status\\\": \\\"success\\\", \\\"execution_id\\\": \\\"%s\\\","
    " \\\"workflow_run_id\\\": \\\"wf-run-1\\\", \\\"external_id\\\": \\\"ext-1\\\","
    " \\\"task_id\\\": \\\"%s\\\"}\" \"$0\" \"$1\"' %%execution_id%% %%task_id%%"
)


@pytest.fixture
def catalogue_site(site, tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    tools = {
        # Kaapana's json_launcher entry: the site's image, the message's command as argv.
        "kaapana-fem-adapter": {
            "image": site.env["FEM_TEST_IMAGE"],
            "command": ["%%TASK_COMMAND%%"],
            "env": {"FEM_TOKEN": "%%token%%"},
            "mounts": [{"source": "sandbox", "mount": "/sandbox"}],
        },
        # A tool that reads a received file from its sandbox and writes one beside it.
        "copier": {
            "image": site.env["FEM_TEST_IMAGE"],
            "command": ["sh", "-c", "cp /fem/received/in.bin /sandbox/out.bin"
                        " && echo '{\"copied\": true}'"],
            "mounts": [{"source": "sandbox", "mount": "/sandbox"}],
        },
        "sleeper": {"image": site.env["FEM_TEST_IMAGE"], "command": ["sleep", "300"]},
    }
    config = site.config(
        execution={"work_dir": str(site.work_dir), "max_parallel": 2, "shutdown_grace_s": 30},
        security={"max_message_bytes": "8Mi"},
        legacy={"enabled": True, "sandbox_path": str(sandbox),
                "data_path": str(tmp_path / "data" / "cohort"), "tools": tools})
    site.proc = site.listener(config)
    site.sandbox = sandbox
    site.legacy = LegacyOrchestrator(site.node)
    yield site
    site.legacy.close()


def test_kaapana_submit_run_through_the_catalogue(catalogue_site):
    site, orch = catalogue_site, catalogue_site.legacy
    # Kaapana's mock orchestrator's exact message: task_info {_id, command}, no image.
    task_info = {"_id": "kaapana-fem-adapter", "command": KAAPANA_COMMAND}
    reply = orch.call(legacy_body("submit_run", tool_id="kaapana-fem-adapter",
                                  task_info=task_info, execution_id="k1", token=TOKEN))
    # The reply is the command's stdout JSON itself (legacy.reply: stdout, the default).
    assert reply == {"status": "success", "execution_id": "k1", "workflow_run_id": "wf-run-1",
                     "external_id": "ext-1", "task_id": "kaapana-fem-adapter"}
    # The sandbox is the run's <sandbox>/<user>/<execution>/ itself.
    assert (site.sandbox / "alice" / "k1" / "result.txt").read_text() == "done\n"

    # An unknown tool is refused, nothing runs.
    refused = orch.call(legacy_body("submit_run", tool_id="not-in-catalogue",
                                    task_info=task_info, execution_id="k2"))
    assert refused["status"] == "error"
    assert refused["error"]["code"] == "policy_violation"
    assert "legacy.tools" in refused["error"]["message"]

    # json_action names the launcher entry (inferred): only submit_run is served.
    other = orch.call(legacy_body("submit_run", tool_id="kaapana-fem-adapter",
                                  task_info=task_info, execution_id="k3",
                                  json_action="delete_everything"))
    assert other["status"] == "error" and "json_action" in other["error"]["message"]

    # The token reached the container (its length checked there) and nowhere else.
    site.proc.stop()
    for path in [*site.work_dir.rglob("*"), site.proc.log]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_health_check_as_a_tool_and_as_an_action(catalogue_site):
    """The orchestrator's Health Check is a submit_run of tool ``health-check`` [NB]; the
    action form is answered the same; nothing is journaled or run."""
    site, orch = catalogue_site, catalogue_site.legacy
    keys = {"installation_check", "gpu_check", "paths_check", "resources_check",
            "docker_images_installed", "pem_certificates"}
    tool = orch.call(legacy_body("submit_run", tool_id="health-check",
                                 task_info={"_id": "health-check"}, execution_id="h1"))
    assert set(tool) == keys
    assert tool["installation_check"]["docker_version"].startswith("Docker version ")
    assert tool["paths_check"]["sandbox_path_exists"] is True
    assert set(orch.call(legacy_body("health-check", execution_id=None))) == keys
    assert not (site.work_dir / "runs").exists() or not any((site.work_dir / "runs").iterdir())


def test_receive_files_run_send_files_of_3_mib_and_cancel_run(catalogue_site):
    site, orch = catalogue_site, catalogue_site.legacy
    data = os.urandom(3 * 1024 * 1024)
    pushed = orch.call(legacy_body("receive_files", execution_id="f1", params={
        "files": [{"path": "in.bin", "data": base64.b64encode(data).decode(),
                   "sha256": hashlib.sha256(data).hexdigest()}]}))
    assert pushed["status"] == "success"
    assert pushed["files"] == [{"path": "in.bin", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}]
    root = site.sandbox / "alice" / "f1"  # the sandbox root, as the real client's [K]
    assert (root / "in.bin").read_bytes() == data

    assert orch.call(legacy_body("submit_run", tool_id="copier",
                                 task_info={"_id": "copier"}, execution_id="f1")) == {
        "copied": True}
    assert (root / "out.bin").read_bytes() == data

    sent = orch.call(legacy_body("send_files", execution_id="f1",
                                 params={"files": ["out.bin"]}))
    assert sent["status"] == "success" and [f["path"] for f in sent["files"]] == ["out.bin"]
    assert base64.b64decode(sent["files"][0]["data"]) == data
    assert sent["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    everything = orch.call(legacy_body("send_files", execution_id="f1"))
    assert sorted(f["path"] for f in everything["files"]) == ["in.bin", "out.bin"]

    # cancel_run stops a running legacy run; its submit_run is answered.
    corr = orch.send(legacy_body("submit_run", tool_id="sleeper",
                                 task_info={"_id": "sleeper"}, execution_id="c1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "legacy-c1 RUNNING" not in site.proc.log.read_text():
        time.sleep(0.2)
    cancel = orch.call(legacy_body("cancel_run", execution_id="c1"))
    assert cancel["status"] == "success" and cancel["cancel"] == "stopping"
    stopped = orch.result(corr)
    assert stopped["error"]["code"] == "cancelled", stopped
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_with_signatures_on_files_and_cancel_must_be_signed(site, tmp_path):
    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    sandbox = tmp_path / "sandbox"
    (sandbox / "alice" / "s1").mkdir(parents=True)
    (sandbox / "alice" / "s1" / "secret.txt").write_text("patient data")
    config = site.config(
        security={"signature": {"mode": "hmac", "key_file": str(key)}},
        legacy={"enabled": True, "sandbox_path": str(sandbox), "tools": {}})
    proc = site.listener(config)
    orch = LegacyOrchestrator(site.node)
    try:
        for action in ("send_files", "cancel_run", "receive_files"):
            params = {"files": [{"path": "x", "data": "eA=="}]} \
                if action == "receive_files" else None
            refused = orch.call(legacy_body(action, execution_id="s1", params=params))
            assert refused["status"] == "error", action
            assert refused["error"]["code"] == "signature_invalid", action
        assert not (sandbox / "alice" / "s1" / "x").exists()
        # Signed as a task is (x-fem-signature over the body): served.
        body = legacy_body("send_files", execution_id="s1").encode()
        sig = hmac.new(b"k" * 32, body, hashlib.sha256).hexdigest()
        corr = str(uuid.uuid4())
        orch.ch.basic_publish("", site.node, body, pika.BasicProperties(
            reply_to=orch.callback, correlation_id=corr,
            headers={"x-fem-signature": f"hmac-sha256={sig}"}))
        served = orch.result(corr)
        assert [f["path"] for f in served["files"]] == ["secret.txt"]
        assert proc.alive
    finally:
        orch.close()


FLCORE_SCRIPT = (
    'test -r "$FLOWER_SSL_CACERT" || exit 7; '
    'if touch /certs/x 2>/dev/null; then certs=rw; else certs=ro; fi; '
    'echo "round 1 for $NODE_NAME" > /sandbox/model.txt; '
    'nets=$(ls /sys/class/net | wc -l); '
    'printf \'{"certs": "%s", "nets": %s, "data": "%s"}\' "$certs" "$nets" '
    '"$(head -1 /data/patients.csv)"'
)


def test_the_flcore_tool_shape_runs_when_the_catalogue_allows_it(site, tmp_path):
    """DataTools4Heart's flagship tool [NB cell 29]: a sandbox sub-directory, the site's
    certificate directory read-only, its FLOWER_SSL_* variables and (its ports) a network
    the policy allows."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    certs = tmp_path / "rabbitmq-certificates"
    certs.mkdir()
    (certs / "rootCA_cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    certs.chmod(0o755)
    tool = {
        "image": site.env["FEM_TEST_IMAGE"],
        "command": ["sh", "-c", FLCORE_SCRIPT],
        "env": {"FLOWER_SSL_CACERT": "/certs/rootCA_cert.pem", "NODE_NAME": "%%node_name%%"},
        "mounts": [{"source": "sandbox/flcore", "mount": "/sandbox"},
                   {"source": str(certs), "mount": "/certs"},
                   {"source": "data", "mount": "/data"}],
        "network": "host",
    }
    config = site.config(
        policy={"networks": {"allow": ["host"]}},
        legacy={"enabled": True, "sandbox_path": str(sandbox),
                "data_path": str(tmp_path / "data" / "cohort"),
                "tools": {"flcore-client": tool}})
    site.listener(config)
    orch = LegacyOrchestrator(site.node)
    try:
        reply = orch.call(legacy_body("submit_run", tool_id="flcore-client",
                                      task_info={"_id": "flcore-client"}, execution_id="fl1"))
        assert reply["certs"] == "ro" and reply["data"] == "id,age", reply
        assert reply["nets"] > 1  # the host's network, not none (lo only)
        assert (sandbox / "alice" / "fl1" / "flcore" / "model.txt").read_text() == \
            f"round 1 for {site.node}\n"
        assert not (certs / "x").exists()
    finally:
        orch.close()


def test_the_flcore_tool_shape_is_refused_without_the_network(site, tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    config = site.config(legacy={"enabled": True, "sandbox_path": str(sandbox), "tools": {
        "flcore-client": {"image": site.env["FEM_TEST_IMAGE"], "command": ["true"],
                          "network": "host"}}})
    site.listener(config)
    orch = LegacyOrchestrator(site.node)
    try:
        refused = orch.call(legacy_body("submit_run", tool_id="flcore-client",
                                        task_info={"_id": "flcore-client"},
                                        execution_id="fl2"))
        assert refused["status"] == "error" and "policy.networks" in \
            refused["error"]["message"], refused
    finally:
        orch.close()
