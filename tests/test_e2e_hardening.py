"""Issue 18, parsing level, through a real listener, broker, engine, registry, git daemon and
upload endpoint: with hmac signatures on, every hostile ``x-fem-signature`` (task and
control) and every case of the parsing corpus (tests/support/hostile_parsing.py), each
correctly signed, ends REJECTED with its code and reason and is dead-lettered; the listener
keeps consuming and runs the valid task sent after them; the audit log names the key by
its file and holds no source query."""

from __future__ import annotations

import json

import pytest

from fem_ansible.signatures import sign_hmac
from tests.support.harness import NOTHING_LEFT, leftovers
from tests.support.hostile_parsing import (
    HOSTILE_SIGNATURE_HEADERS,
    PARSING_CORPUS,
    REPO_SECRET,
    anonymous,
    case_message,
)
from tests.test_e2e_security import (
    audit_lines,
    publish_control,
    wait_anonymous_rejections,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEY = b"the-shared-key-of-this-site"
IGNORED_CONTROL = "ignored a control message (signature_invalid)"


def test_hostile_parsing_corpus_is_rejected_by_a_signed_listener(site, tmp_path):
    env, orch = site.env, site.orchestrator
    key_file = tmp_path / "site-2026.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o600)
    listener = site.listener(site.config(
        security={"signature": {"mode": "hmac", "key_file": str(key_file)}}))
    node = {"node_id": site.node}

    # Signature headers no key signed, of every AMQP type, on tasks and on cancels.
    for name, header in HOSTILE_SIGNATURE_HEADERS.items():
        body = json.dumps(site.task(f"sig-{name}", **node)).encode()
        orch.publish(body, headers={"x-fem-signature": header})
        cancel = json.dumps({"schema": "fem.control/v1", "action": "cancel",
                             "task_id": "after-the-corpus", **node}).encode()
        publish_control(orch, cancel, {"x-fem-signature": header})
    # Every parsing case, signed: the signature is good, the content is what is refused.
    for case in PARSING_CORPUS:
        body = case_message(case, site.task(case.name, **node), env)
        orch.publish(body, headers={"x-fem-signature": sign_hmac(body, KEY)})
    good = json.dumps(site.task("after-the-corpus", **node)).encode()
    orch.publish(good, headers={"x-fem-signature": sign_hmac(good, KEY)})

    final = orch.wait_terminal("after-the-corpus")
    assert final["state"] == "COMPLETED", final
    assert listener.alive
    wait_for(lambda: listener.log.read_text().count(IGNORED_CONTROL)
             == len(HOSTILE_SIGNATURE_HEADERS), "every hostile cancel ignored")

    named = [c for c in PARSING_CORPUS if not anonymous(c)]
    for case in named:
        rejected = orch.wait_terminal(case.name, timeout=30)
        assert rejected["state"] == "REJECTED", (case.name, rejected)
        assert rejected["error"]["code"] == case.code, (case.name, rejected["error"])
        assert case.reason in rejected["error"]["message"], (case.name, rejected["error"])
        assert [e["state"] for e in orch.events(case.name)] == ["REJECTED"], case.name
    unnamed = [c for c in PARSING_CORPUS if anonymous(c)]
    rejected = wait_anonymous_rejections(orch, len(unnamed) + len(HOSTILE_SIGNATURE_HEADERS))
    codes = sorted(e["error"]["code"] for e in rejected)
    assert codes == sorted([c.code for c in unnamed]
                           + ["signature_invalid"] * len(HOSTILE_SIGNATURE_HEADERS))
    for case in unnamed:
        assert any(case.reason in e["error"]["message"] for e in rejected), case.name

    dead = orch.dead_letters()
    assert len(dead) == len(PARSING_CORPUS) + len(HOSTILE_SIGNATURE_HEADERS)
    assert sorted(h["x-fem-reject-reason"] for h, _ in dead) == sorted(
        [c.code for c in PARSING_CORPUS] + ["signature_invalid"] * len(HOSTILE_SIGNATURE_HEADERS))

    # The audit log: the key by its file's name, never a digest of it; no source query.
    audit = audit_lines(site)
    key_ids = {a["key_id"] for a in audit if a["decision"] in ("received", "accepted")}
    assert key_ids == {"hmac:site-2026.key"}, key_ids
    for text in ((site.work_dir / "audit.jsonl").read_text(), listener.log.read_text(),
                 json.dumps(orch.received)):
        assert REPO_SECRET not in text and KEY.decode() not in text
    assert sorted(p.name for p in (site.work_dir / "runs").iterdir()) == ["after-the-corpus"]
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
