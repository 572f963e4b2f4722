"""The one intake (issue 17 item 2): one function from bytes to an accepted task or one
rejection listing every problem, in the contract's order (DESIGN.md §3); allow-lists as
globs (issue 20 item 5); rejected messages in the journal and in ``fem-ansible tasks``."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fem_ansible import policy, schema
from fem_ansible.cli import main
from fem_ansible.errors import RejectedError
from fem_ansible.journal import Journal
from fem_ansible.lifecycle import Node, _Execution
from fem_ansible.listener import Listener
from fem_ansible.signatures import HEADER, sign_hmac

IMAGE = "127.0.0.1:5000/fem/busybox:1"
KEY = b"intake-test-key"


def body(**fields) -> bytes:
    return json.dumps({"schema": "fem.task/v1", "task_id": "t1", "image": {"ref": IMAGE},
                       **fields}).encode()


def rejection(intake, raw: bytes, headers=None, **kw) -> RejectedError:
    with pytest.raises(RejectedError) as err:
        intake.read(raw, headers, **kw)
    return err.value


def test_a_task_is_frozen_with_its_decision(make_config, make_intake):
    intake = make_intake(make_config())
    task = intake.read(body(datasets=[{"name": "cohort", "mount": "/data"}]), None)
    assert (task.task_id, task.executor, task.target, task.image) == (
        "t1", "docker", "localhost", IMAGE)
    assert task.decision.datasets[0]["name"] == "cohort"
    assert task.decision.policy["network"] == "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.task_id = "other"  # type: ignore[misc]
    data = task.to_dict()
    data["image"]["ref"] = "changed"
    assert task.to_dict()["image"]["ref"] == IMAGE  # a copy each time
    assert task.public()["outputs"]["path"] == "/fem/output"


def test_every_policy_violation_at_once_in_human_units(make_config, make_intake):
    intake = make_intake(make_config())
    err = rejection(intake, body(image={"ref": "docker.io/library/busybox"}, network="host",
                                 resources={"memory": "64Gi"}))
    assert err.code == "policy_violation" and err.task_id == "t1"
    assert [rule for rule, _ in err.violations] == [
        "policy.images", "policy.networks", "policy.limits.memory"]
    assert "policy.limits.memory: asks 64 GiB, the limit is 2 GiB" in err.reasons
    assert err.message.startswith("3 problems: ")
    assert all(reason in err.message for reason in err.reasons)


def test_schema_errors_come_whole(make_config, make_intake):
    intake = make_intake(make_config())
    err = rejection(intake, body(network=7, command="id", extra=True))
    assert err.code == "invalid_message" and err.task_id == "t1"
    assert len(err.reasons) == 3, err.reasons
    assert any(r.startswith("network:") for r in err.reasons)
    assert any(r.startswith("command:") for r in err.reasons)
    assert any("extra" in r for r in err.reasons)


def test_a_flood_of_schema_errors_is_one_bounded_rejection(make_config, make_intake):
    """A body near the size limit can break the schema 300 000 times; the rejection lists a
    bounded number and says there were more, so the REJECTED event, the journal's row, the
    audit line and the log line stay small."""
    config = make_config()
    raw = body(command=[1] * 300_000)
    assert len(raw) < config.security.max_message_bytes
    err = rejection(make_intake(config), raw)
    assert err.code == "invalid_message" and err.task_id == "t1"
    assert len(err.reasons) == schema.MAX_SCHEMA_ERRORS + 1, len(err.reasons)
    assert err.reasons[-1].startswith("(more schema errors")
    assert len(err.message) < 100 * schema.MAX_SCHEMA_ERRORS


def test_a_cancel_is_checked_as_a_task_is(make_config, make_intake):
    """node_id and not_after of a control message: a not_after that is no time is
    invalid_message, as a task's, never an exception."""
    intake = make_intake(make_config())

    def cancel(**fields) -> bytes:
        return json.dumps({"schema": "fem.control/v1", "action": "cancel", "task_id": "t1",
                           **fields}).encode()

    assert intake.read_control(cancel(not_after="2999-01-01T00:00:00Z"), None)["task_id"] == "t1"
    for fields, code in (({"not_after": "soon"}, "invalid_message"),
                         ({"not_after": "2000-01-01T00:00:00Z"}, "expired"),
                         ({"node_id": "elsewhere"}, "wrong_node")):
        with pytest.raises(RejectedError) as err:
            intake.read_control(cancel(**fields), None)
        assert (err.value.code, err.value.task_id) == (code, "t1"), fields


def test_target_and_executor_are_checked_with_the_policy(make_config, make_intake):
    """What only this node knows (the inventory's hosts, the executor's role) is part of the
    same rejection: validate and listen cannot differ on it."""
    config = make_config(policy={"targets": {"allow": ["localhost", "gpu-*"]},
                                 "executors": {"allow": ["docker", "norole"]}})
    err = rejection(make_intake(config), body(target="gpu-01", executor="norole",
                                              resources={"cpus": 4}))
    rules = [rule for rule, _ in err.violations]
    assert rules == ["policy.limits.cpus", "execution.inventory", "policy.executors"], rules
    assert "policy.limits.cpus: asks 4, the limit is 1" in err.reasons


def test_contract_order_and_codes(make_config, make_intake, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    config = make_config(security={"signature": {"mode": "hmac", "key_file": str(key_file)},
                                   "max_message_bytes": 4096})
    intake = make_intake(config)

    def signed(raw: bytes) -> dict[str, str]:
        return {HEADER: sign_hmac(raw, KEY)}

    big = body(labels={"x": "y" * 5000})
    assert rejection(intake, big, signed(big)).code == "invalid_message"  # size first
    err = rejection(intake, b"not json", {HEADER: "hmac-sha256=00"})
    assert (err.code, err.task_id) == ("signature_invalid", None)  # before parsing
    assert rejection(intake, b"not json", signed(b"not json")).task_id is None
    wrong = body(node_id="elsewhere", image={"ref": "evil.example/x:1"})
    assert rejection(intake, wrong, signed(wrong)).code == "wrong_node"  # before policy
    unnamed = body()
    assert rejection(intake, unnamed, signed(unnamed)).code == "wrong_node"
    late = body(node_id="site-a", not_after="2000-01-01T00:00:00Z",
                image={"ref": "evil.example/x:1"})
    assert rejection(intake, late, signed(late)).code == "expired"
    refused = body(node_id="site-a", image={"ref": "evil.example/x:1"})
    assert rejection(intake, refused, signed(refused)).code == "policy_violation"
    ok = body(node_id="site-a")
    assert intake.read(ok, signed(ok)).key_id.startswith("hmac:")
    # A local file (run, validate) is read without a signature, the rest the same.
    assert intake.read(ok, None, signed=False).key_id is None


@pytest.mark.parametrize(("allow", "name", "allowed"), [
    (["gpu-*"], "gpu-01", True),
    (["gpu-*"], "gpux", False),
    (["gpu-?"], "gpu-1", True),
    (["**"], "anything", True),
    (["localhost"], "localhost2", False),
])
def test_name_allow_lists_are_globs(allow, name, allowed):
    assert policy.allowed(name, allow) is allowed


def test_targets_executors_networks_match_globs(make_config, make_intake):
    config = make_config(policy={"networks": {"allow": ["lab-*"]},
                                 "executors": {"allow": ["dock*"]},
                                 "targets": {"allow": ["local*"]}})
    intake = make_intake(config)
    task = intake.read(body(network="lab-1", executor="docker", target="localhost"), None)
    assert task.decision.policy["network"] == "lab-1"
    err = rejection(intake, body(network="host", executor="podman"))
    assert [rule for rule, _ in err.violations] == ["policy.executors", "policy.networks"]


def test_image_allow_list_entries_are_normalised_like_the_reference(make_config, make_intake):
    """``busybox:1.36`` in the allow-list is the image ``busybox:1.36`` names; a glob's ``*``
    stays inside one path segment."""
    config = make_config(policy={"images": {"allow": ["busybox:1.36", "127.0.0.1:5000/fem/*"]}})
    intake = make_intake(config)
    assert intake.read(body(image={"ref": "docker.io/library/busybox:1.36"}), None)
    assert intake.read(body(image={"ref": IMAGE}), None)
    err = rejection(intake, body(image={"ref": "127.0.0.1:5000/fem/a/b:1"}))
    assert [rule for rule, _ in err.violations] == ["policy.images"]


def test_validate_says_what_listen_says(make_config, make_intake, tmp_path):
    config = make_config(policy={"targets": {"allow": ["localhost", "gpu-*"]}})
    raw = body(target="gpu-01", network="host", resources={"memory": "64Gi"})
    expected = rejection(make_intake(config), raw)
    task_file = tmp_path / "task.json"
    task_file.write_bytes(raw)
    out = CliRunner().invoke(main, ["validate", "--config", str(tmp_path / "config.yml"),
                                    str(task_file)])
    assert out.exit_code == 3, out.output
    assert out.output.splitlines() == [f"invalid ({expected.code}):",
                                       *(f"  {r}" for r in expected.reasons)]
    assert len(expected.reasons) == 3


def test_validate_lists_the_policy_problems_past_a_wrong_node(make_config, tmp_path):
    """``listen`` stops at a wrong ``node_id`` (the contract's order); ``validate`` goes on
    to the policy so that one try lists every problem (issue 31: the sample task showed its
    policy problems only once its node_id was fixed)."""
    make_config(security={"signature": {"mode": "hmac", "key_file": str(tmp_path / "k")}})
    (tmp_path / "k").write_bytes(KEY)
    task_file = tmp_path / "task.json"
    task_file.write_bytes(body(network="host", resources={"memory": "64Gi"}))
    out = CliRunner().invoke(main, ["validate", "--config", str(tmp_path / "config.yml"),
                                    str(task_file)])
    assert out.exit_code == 3, out.output
    assert out.output.splitlines() == [
        "invalid (wrong_node):", "  signed tasks must name their node_id",
        "invalid (policy_violation):",
        "  policy.networks: network 'host' is not allowed",
        "  policy.limits.memory: asks 64 GiB, the limit is 2 GiB"], out.output


def test_submit_checks_first_unless_told_not_to(make_config, tmp_path):
    make_config()
    task_file = tmp_path / "task.json"
    task_file.write_bytes(body(network="host"))
    out = CliRunner().invoke(main, ["submit", "--config", str(tmp_path / "config.yml"),
                                    str(task_file)])
    assert out.exit_code == 3 and "policy.networks" in out.output, out.output


def test_rejections_are_journaled_and_never_block_a_valid_task(make_config, make_intake,
                                                               tmp_path):
    config = make_config()
    journal = Journal(config.work_dir / "journal.sqlite")
    node = Node(config, journal)
    with pytest.raises(RejectedError) as err:
        node.read(body(network="host", resources={"memory": "8Gi"}), None, signed=False)
    rejected = node.reject(err.value)
    assert rejected is not None and (rejected["task_id"], rejected["seq"]) == ("t1", 1)
    assert rejected["state"] == "REJECTED" and rejected["error"]["code"] == "policy_violation"
    with pytest.raises(RejectedError) as anonymous:
        node.read(b"{", None, signed=False)
    assert node.reject(anonymous.value)["task_id"] is None

    recent = journal.recent()
    assert [r.state for r in recent] == ["REJECTED", "REJECTED"]
    assert recent[1].rejection["reasons"] == list(err.value.reasons)
    assert journal.get("t1") is None  # not a task: a rejection is not an acceptance

    # The same id, now valid: accepted, its events after the rejection's.
    event, existing = node.accept(node.read(body(), None, signed=False))
    assert existing is None and event["seq"] == 2 and event["state"] == "RECEIVED"
    # A refused re-send of an accepted task does not tell the orchestrator it was refused.
    with pytest.raises(RejectedError) as resend:
        node.read(body(not_after="2000-01-01T00:00:00Z"), None, signed=False)
    assert node.reject(resend.value) is None
    assert [e["state"] for e in journal.get("t1", with_events=True).events] == [
        "REJECTED", "RECEIVED"]
    assert len(journal.rejections("t1")) == 2

    out = CliRunner().invoke(main, ["tasks", "--config", str(tmp_path / "config.yml")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert any(line.startswith("t1 ") and "REJECTED" in line and "policy.networks" in line
               and "8 GiB" in line for line in lines), lines
    assert any(line.startswith("t1 ") and "RECEIVED" in line for line in lines), lines
    detail = CliRunner().invoke(main, ["tasks", "--config", str(tmp_path / "config.yml"),
                                       "t1"])
    assert "  policy.networks: network 'host' is not allowed" in detail.output
    assert "(expired)" in detail.output


def test_the_policy_is_decided_once_per_task(make_config, monkeypatch):
    config = make_config()
    node = Node(config, Journal(config.work_dir / "journal.sqlite"))
    calls = []
    decide = policy.decide
    monkeypatch.setattr(policy, "decide", lambda *a, **k: calls.append(1) or decide(*a, **k))
    task = node.read(body(), None, signed=False)
    node.accept(task)
    run = _Execution(node, node.journal.get("t1"), threading.Event())
    spec = run._spec()
    assert spec.extravars["fem_policy"] == task.decision.policy
    assert spec.extravars["fem_datasets"] == task.decision.datasets
    assert len(calls) == 1


class _Channel:
    def __init__(self):
        self.acked, self.published = [], []
        self.is_open = True

    def basic_ack(self, tag):
        self.acked.append(tag)

    def basic_publish(self, exchange, key, body, props, mandatory=False):
        self.published.append((exchange, key, body, props))


def test_the_consumer_rejects_what_escapes_intake_and_goes_on(make_config, monkeypatch,
                                                              caplog):
    """A bug in intake (here: any exception) is no dead listener: the message is REJECTED,
    dead-lettered, acked, and logged with its traceback."""
    listener = Listener(make_config())
    ch = _Channel()
    listener._events_ch = ch

    def broken(*_a, **_k):
        raise OverflowError("int too large")

    monkeypatch.setattr(listener.node.intake, "read", broken)
    monkeypatch.setattr(listener.node.intake, "read_control", broken)
    props = SimpleNamespace(headers={"x": "y"}, content_type="application/json")
    with caplog.at_level(logging.ERROR):
        listener._on_task(ch, SimpleNamespace(delivery_tag=7), props, b"{}")
        listener._on_control(ch, SimpleNamespace(delivery_tag=8), props, b"\xff")
    assert ch.acked == [7, 8]
    dead = [p for p in ch.published if p[0] == "fem.dlx"]
    assert len(dead) == 1 and dead[0][3].headers["x-fem-reject-reason"] == "invalid_message"
    events = [json.loads(p[2]) for p in ch.published if p[0] == "fem.events"]
    assert [e["state"] for e in events] == ["REJECTED"]
    assert "OverflowError" in events[0]["error"]["message"]
    tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[0] is OverflowError]
    assert len(tracebacks) == 2  # the task and the control message
    monkeypatch.undo()
    # and the next message is read as usual
    listener._on_task(ch, SimpleNamespace(delivery_tag=9), props, b"[]")
    assert ch.acked == [7, 8, 9]
    listener.journal.close()
