"""Any bytes on the queue end as REJECTED or a task, never a dead listener (issue 18,
"Crashes"), through a real listener with hmac signatures on: the three messages that
crashed it, then a valid task, which completes; and rejected messages in
``fem-ansible tasks`` (issue 17 item 2)."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from typing import Any

import pika
import pika.data
import pytest

from fem_ansible.signatures import sign_hmac
from tests.support.harness import FEM
from tests.test_e2e_security import publish_control, site_policy

pytestmark = pytest.mark.e2e

KEY = b"the-shared-key-of-this-site"


def wait_dead_letters(orch, count: int, timeout: float = 60) -> list[tuple[dict[str, Any],
                                                                           bytes]]:
    found: list[tuple[dict[str, Any], bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found += orch.dead_letters()
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{len(found)} of {count} messages dead-lettered: {found}")


def test_crashing_messages_are_rejected_and_the_listener_goes_on(site, tmp_path):
    orch = site.orchestrator
    key_file = tmp_path / "hmac.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    pol = site_policy(site)
    pol["images"]["allow"] = [*pol["images"]["allow"], "docker.io/library/**"]
    config = site.config(security={"signature": {"mode": "hmac", "key_file": str(key_file)}},
                         policy=pol)
    listener = site.listener(config)
    node = {"node_id": site.node}

    def signed(task: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(task).encode()
        return body, {"x-fem-signature": sign_hmac(body, KEY)}

    # 1. a non-ASCII signature (hmac.compare_digest raised TypeError), on a task and on a
    #    control message
    orch.publish(json.dumps(site.task("non-ascii-sig", **node)).encode(),
                 headers={"x-fem-signature": "hmac-sha256=\u00e9"})
    publish_control(orch, json.dumps({"schema": "fem.control/v1", "action": "cancel",
                                      "task_id": "valid-after", **node}).encode(),
                    {"x-fem-signature": "hmac-sha256=\u00e9"})
    # 2. memory "<309 nines>T" (OverflowError)
    orch.publish(*signed(site.task("nines", resources={"memory": "9" * 309 + "T"}, **node)))
    # 3. an allowed image with a 510-character name (ValueError from reference parsing)
    orch.publish(*signed(site.task("long-image", image={"ref": "a" * 510}, **node)))
    # then a valid task
    orch.publish(*signed(site.task("valid-after", **node)))

    final = orch.wait_terminal("valid-after")
    assert final["state"] == "COMPLETED", (final, listener.tail())
    assert listener.alive
    dead = wait_dead_letters(orch, 3)
    bodies = [body for _headers, body in dead]
    assert any(b"non-ascii-sig" in b for b in bodies) and any(b"nines" in b for b in bodies)
    assert any(b"long-image" in b for b in bodies)
    assert all(h["x-fem-reject-reason"] in ("invalid_message", "signature_invalid")
               for h, _ in dead), dead
    orch.drain(1)
    rejected = [e for e in orch.received if e["state"] == "REJECTED"]
    assert len(rejected) == 3, rejected
    # the cancel that could not be read was refused, and cancelled nothing
    listener.wait_for_log("control message")
    assert [e["state"] for e in orch.distinct_events("valid-after")][-1] == "COMPLETED"

    # fem-ansible tasks shows the rejected messages beside the task that ran
    listener.stop()
    out = subprocess.run([FEM, "tasks", "--config", str(config)], capture_output=True,
                         text=True, check=True).stdout
    lines = out.splitlines()
    assert sum(" REJECTED " in line for line in lines) == 3, out
    assert any(line.startswith("valid-after ") and "COMPLETED" in line for line in lines), out


class _Stamp(int):
    """An AMQP timestamp header of any value (pika itself only encodes datetimes)."""


def test_headers_the_broker_or_python_cannot_take_back_do_not_stop_intake(site, tmp_path,
                                                                          monkeypatch):
    """Review of issue 26: an unsigned message with headers just under the broker's frame
    limit (its dead-lettered copy, one header more, was over it: the broker closed the
    connection) or with a timestamp past datetime's range (pika failed reading the frame)
    came back after every reconnect, and no task was taken again."""
    encode_value = pika.data.encode_value

    def encode(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, _Stamp):
            pieces.append(struct.pack(">cQ", b"T", int(value)))
            return 9
        return encode_value(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode)
    orch = site.orchestrator
    key_file = tmp_path / "hmac.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    config = site.config(security={"signature": {"mode": "hmac", "key_file": str(key_file)}})
    listener = site.listener(config)
    orch.publish(b"x", headers={"pad": "A" * 131000})
    orch.publish(b"y", headers={"ts": _Stamp(2**62)})
    publish_control(orch, b"z", {"ts": _Stamp(2**62)})
    body = json.dumps(site.task("after-headers", node_id=site.node)).encode()
    orch.publish(body, headers={"x-fem-signature": sign_hmac(body, KEY)})

    final = orch.wait_terminal("after-headers")
    assert final["state"] == "COMPLETED", (final, listener.tail())
    assert listener.alive
    dead = wait_dead_letters(orch, 2)
    by_body = {body: headers for headers, body in dead}
    assert by_body[b"x"]["x-fem-reject-reason"] == "signature_invalid"
    assert "pad" not in by_body[b"x"] and "x-fem-headers-dropped" in by_body[b"x"]
    assert by_body[b"y"]["ts"] == 2**62, by_body[b"y"]
    assert "broker connection lost" not in listener.log.read_text(errors="replace")
