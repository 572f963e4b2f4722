"""A message that can do no harm (issue 4), through a real listener, broker, engine, registry,
git daemon and upload endpoint: hostile tasks end REJECTED with the right code (and rule),
or run with every hostile string kept literal; signatures, the audit log, container
hardening, ``policy.share_logs`` and the secrets of a run."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import requests
import yaml

from fem_ansible.signatures import sign_hmac
from tests.support.archives import tar_entries, tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, Orchestrator, leftovers, task_name
from tests.support.secure_services import ProcessSampler, auth_registry, tls_broker
from tests.support.services import upload_requests

pytestmark = pytest.mark.e2e

JINJA = "{{ lookup('pipe','id') }}"
# Container paths refuse ',' (issue 18): a template that renders to "42" if ever rendered.
PATH_JINJA = "{{ 6 * 7 }}"
# What a rendered lookup('pipe','id') would have left anywhere (the listener runs as root).
RENDERED = "uid="


def pwn(marker: Path) -> str:
    """A template that, if Ansible ever rendered it, would leave ``marker`` on the host."""
    return "{{ lookup('pipe','touch " + str(marker) + "') }}"


def wait_anonymous_rejections(orch, count: int, timeout: float = 120) -> list[dict[str, Any]]:
    """The REJECTED events without a task id (refused before the body could be read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orch.drain(0.2)
        found = [e for e in orch.events(None) if e["state"] == "REJECTED"]
        if len(found) >= count:
            return found
    raise AssertionError(f"fewer than {count} anonymous REJECTED events: {orch.events(None)}")


def hostile_corpus(site, marker: Path) -> dict[str, tuple[dict[str, Any], str, str | None]]:
    """task id → (task, expected error code, expected policy rule)."""
    env = site.env
    up = env["FEM_TEST_UPLOAD_URL"]
    t = site.task
    bad = {
        # Attempts to set Ansible variables: no task field is ever a top-level variable.
        "ansible-connection": ({"ansible_connection": "local"}, "invalid_message", None),
        "ansible-become": ({"ansible_become": True, "ansible_become_user": "root"},
                           "invalid_message", None),
        "ansible-ssh-args": ({"vars": {"ansible_ssh_common_args": "-o ProxyCommand=id"}},
                             "invalid_message", None),
        # Sources: only https, ssh and git URLs on the allow-list.
        "src-ext": ({"source": {"repo": "ext::sh -c touch% " + str(marker)}},
                    "invalid_message", None),
        "src-ext-bare": ({"source": {"repo": "ext::sh"}}, "invalid_message", None),
        "src-file": ({"source": {"repo": "file:///etc"}}, "invalid_message", None),
        "src-file-host": ({"source": {"repo": "file://localhost/srv/git/sample.git"}},
                          "policy_violation", "policy.sources"),
        "src-local": ({"source": {"repo": "/srv/git/sample.git"}}, "invalid_message", None),
        "src-userinfo": ({"source": {"repo": "https://user:pw@127.0.0.1/x.git"}},
                         "invalid_message", None),
        "src-version-opt": ({"source": {"repo": env["FEM_TEST_GIT_URL"],
                                        "version": "--upload-pack=touch"}},
                            "invalid_message", None),
        "src-version-jinja": ({"source": {"repo": env["FEM_TEST_GIT_URL"], "version": JINJA}},
                              "invalid_message", None),
        # Paths: container paths absolute and normalised, input paths relative, datasets
        # only by name.
        "mount-dotdot": ({"datasets": [{"name": "cohort", "mount": "/fem/../etc"}]},
                         "invalid_message", None),
        "mount-relative": ({"datasets": [{"name": "cohort", "mount": "../etc"}]},
                           "invalid_message", None),
        "mount-proc": ({"datasets": [{"name": "cohort", "mount": "/proc/1"}]},
                       "invalid_message", None),
        "scratch-root": ({"scratch": [{"name": "s", "mount": "/"}]}, "invalid_message", None),
        "output-dotdot": ({"outputs": {"path": "/fem/output/../../etc"}},
                          "invalid_message", None),
        "output-relative": ({"outputs": {"path": "output"}}, "invalid_message", None),
        "output-in-data": ({"outputs": {"path": "/fem/data/out"}}, "invalid_message", None),
        "input-dotdot": ({"inputs": [{"url": f"{up}/x", "path": "../../etc/cron.d/x"}]},
                         "invalid_message", None),
        "input-inner-dotdot": ({"inputs": [{"url": f"{up}/x", "path": "a/../../../x"}]},
                               "invalid_message", None),
        "input-absolute": ({"inputs": [{"url": f"{up}/x", "path": "/etc/passwd"}]},
                           "invalid_message", None),
        "input-file-url": ({"inputs": [{"url": "file:///etc/shadow", "path": "s"}]},
                           "invalid_message", None),
        "dataset-dotdot": ({"datasets": [{"name": "../../etc", "mount": "/fem/data"}]},
                           "invalid_message", None),
        "dataset-absolute": ({"datasets": [{"name": "/etc", "mount": "/fem/data"}]},
                             "invalid_message", None),
        "dataset-unknown": ({"datasets": [{"name": "etc", "mount": "/fem/data"}]},
                            "policy_violation", "policy.datasets"),
        # Jinja where a pattern forbids it.
        "jinja-image": ({"image": {"ref": JINJA}}, "invalid_message", None),
        "jinja-experiment": ({"experiment_id": JINJA}, "invalid_message", None),
        "jinja-target": ({"target": JINJA}, "invalid_message", None),
        "jinja-executor": ({"executor": JINJA}, "invalid_message", None),
        "jinja-network": ({"network": JINJA}, "invalid_message", None),
        "jinja-env-name": ({"env": {JINJA: "x"}}, "invalid_message", None),
        "jinja-not-after": ({"not_after": JINJA}, "invalid_message", None),
        "jinja-input-path": ({"inputs": [{"url": f"{up}/x", "path": JINJA}]},
                             "invalid_message", None),
        # Policy: what only the sysadmin may allow.
        "net-host": ({"network": "host"}, "policy_violation", "policy.networks"),
        "upload-elsewhere": ({"outputs": {"upload": {"url": "http://127.0.0.2:8089/x"}}},
                             "policy_violation", "policy.uploads"),
        "upload-userinfo": ({"outputs": {"upload": {"url": "http://u:p@127.0.0.1:8089/x"}}},
                            "invalid_message", None),
        "image-elsewhere": ({"image": {"ref": "busybox"}}, "policy_violation", "policy.images"),
        "too-much-memory": ({"resources": {"memory": "64Gi"}}, "policy_violation",
                            "policy.limits.memory"),
        "gpus": ({"resources": {"gpus": 1}}, "policy_violation", "policy.limits.gpus"),
        "executor-unknown": ({"executor": "shell"}, "policy_violation", "policy.executors"),
        "target-unknown": ({"target": "db-server"}, "policy_violation", "policy.targets"),
    }
    return {tid: ({**t(tid), **fields}, code, rule) for tid, (fields, code, rule) in bad.items()}


def test_hostile_messages_are_rejected_and_leave_nothing(site):
    orch = site.orchestrator
    marker = Path(f"/tmp/fem-pwned-{site.node}")
    corpus = hostile_corpus(site, marker)
    site.listener(site.config(security={"max_message_bytes": 65536}))
    for task, _code, _rule in corpus.values():
        orch.publish(task)
    anonymous = [
        b"x" * 70000,                                           # oversized
        b'{"schema": "fem.task/v1", "labels": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        b'{"schema": "fem.task/v1", "task_id": "bad-utf8-\xff\xfe", "image": {}}',
        b'{"schema": "fem.task/v1", "task_id": "deep", "image": {"ref": "x"}, "labels": '
        + b'{"a": ' * 20 + b"1" + b"}" * 20 + b"}",              # deeper than 16, parses
    ]
    for body in anonymous:
        orch.publish(body)
    orch.publish(site.task("after-the-corpus"))

    assert orch.wait_terminal("after-the-corpus")["state"] == "COMPLETED"
    for tid, (_task, code, rule) in corpus.items():
        final = orch.wait_terminal(tid, timeout=30)
        assert final["state"] == "REJECTED", (tid, final)
        assert final["error"]["code"] == code, (tid, final["error"])
        if rule:
            assert final["error"]["message"].startswith(rule + ":"), (tid, final["error"])
        assert [e["state"] for e in orch.events(tid)] == ["REJECTED"], tid
    rejected = wait_anonymous_rejections(orch, len(anonymous))
    assert all(e["error"]["code"] == "invalid_message" for e in rejected)
    reasons = " | ".join(e["error"]["message"] for e in rejected)
    assert "over the 65536-byte limit" in reasons and "not UTF-8" in reasons
    assert reasons.count("nested") == 2, reasons

    dead = orch.dead_letters()
    assert len(dead) == len(corpus) + len(anonymous)
    codes = sorted(h["x-fem-reject-reason"] for h, _ in dead)
    assert codes == sorted([c for _, c, _ in corpus.values()]
                           + ["invalid_message"] * len(anonymous))
    assert not marker.exists()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    # Nothing of a refused task reached the engine or a run dir.
    runs = site.work_dir / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["after-the-corpus"]


def test_jinja_everywhere_stays_literal_and_symlinks_stay_links(site):
    """Every free-text field carries a template; the task runs and each stays text.  The
    container also plants symlinks to host files in its outputs: only the links travel."""
    env, orch = site.env, site.orchestrator
    marker = Path(f"/tmp/fem-pwned-{site.node}")
    up = f"{env['FEM_TEST_UPLOAD_URL']}/{site.node}"
    tid = "literal"
    # An input stored under a path that is itself a template (no spaces: a URL).
    input_url = f"{up}/in/{{{{lookup('pipe','id')}}}}/in.txt"
    requests.put(input_url, data=b"input " + JINJA.encode() + b"\n", timeout=10)
    out_dir = "/fem/out " + PATH_JINJA
    script = ('echo "env=$FEM_J"; echo "arg=$1"; echo "lit={{ lookup(\'pipe\',\'id\') }}"; '
              'cat /fem/input/in.txt "/fem/data ' + PATH_JINJA + '/patients.csv"; pwd; '
              'ln -s /etc/shadow shadow; ln -s / root; ln -s ../../../../etc/passwd passwd; '
              'echo ok > result.txt')
    task = site.task(
        tid,
        command=["sh", "-c", script, "sh", JINJA],
        workdir=out_dir,
        outputs={"path": out_dir, "upload": {
            "url": f"{up}/{tid}/{{{{lookup('pipe','id')}}}}/outputs.tar.gz?q={{{{x}}}}",
            "headers": {"X-Fem-Probe": JINJA}}},
        datasets=[{"name": "cohort", "mount": "/fem/data " + PATH_JINJA}],
        inputs=[{"url": input_url, "path": "in.txt", "headers": {"X-Fem-Probe": pwn(marker)}}],
        labels={JINJA: pwn(marker), "ansible_become": "true"},
    )
    task["env"] = {"FEM_J": JINJA, "FEM_T": pwn(marker), "ANSIBLE_CONNECTION": JINJA}
    task["source"]["repo"] = env["FEM_TEST_GIT_URL"]
    listener = site.listener()
    orch.publish(task)
    final = orch.wait_terminal(tid)
    assert final["state"] == "COMPLETED", final
    assert final["labels"] == {JINJA: pwn(marker), "ansible_become": "true"}
    assert final["outputs"]["url"] == f"{up}/{tid}/{{{{lookup('pipe','id')}}}}/outputs.tar.gz"

    stdout = tar_members(uploaded_file(env, final["logs"]["url"]))["stdout.log"].decode()
    assert f"env={JINJA}\n" in stdout and f"arg={JINJA}\n" in stdout
    assert f"lit={JINJA}\n" in stdout and f"input {JINJA}\n" in stdout
    assert "id,age" in stdout and f"{out_dir}\n" in stdout

    # Symlinks are archived as links; the targets' contents never are.
    outputs = uploaded_file(env, final["outputs"]["url"])
    entries = tar_entries(outputs)
    assert entries["shadow"].issym() and entries["shadow"].linkname == "/etc/shadow"
    assert entries["root"].issym() and entries["passwd"].issym()
    assert set(tar_members(outputs)) == {"result.txt"}
    raw = gzip.decompress(outputs)
    assert Path("/etc/shadow").read_bytes().splitlines()[0] not in raw
    assert Path("/etc/passwd").read_bytes().splitlines()[0] not in raw

    # The requests the node made carried the templates as text.
    reqs = [r for r in upload_requests(env) if r["path"].startswith(f"/{site.node}/")]
    download = [r for r in reqs if r["method"] == "GET" and r["path"].endswith("/in.txt")]
    assert download and download[-1]["headers"]["X-Fem-Probe"] == pwn(marker)
    put = [r for r in reqs if r["method"] == "PUT" and r["path"].endswith("outputs.tar.gz")]
    assert put[-1]["path"] == f"/{site.node}/{tid}/{{{{lookup('pipe','id')}}}}/outputs.tar.gz"
    assert put[-1]["headers"]["X-Fem-Probe"] == JINJA

    # Nothing was rendered anywhere: no id output, no marker, no leftovers.
    assert not marker.exists()
    texts = [listener.log.read_text(errors="replace"), json.dumps(orch.events(tid))]
    for path in (site.work_dir / "runs" / tid).rglob("*"):
        if path.is_file() and not path.name.endswith(".tar.gz"):
            texts.append(path.read_text(errors="replace"))
    assert not [t for t in texts if RENDERED in t]
    assert any(JINJA in t for t in texts[2:])  # the artifacts saw the template, as text
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def publish_control(orch, body: bytes, headers: dict[str, str] | None) -> None:
    orch.ch.basic_publish("fem.control", orch.node_id, body,
                          pika.BasicProperties(content_type="application/json",
                                               delivery_mode=2, headers=headers))


def audit_lines(site) -> list[dict[str, Any]]:
    path = site.work_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_signed_mode_refuses_forged_messages_and_runs_signed_ones(site, tmp_path):
    env, orch = site.env, site.orchestrator
    key, other = b"the-shared-key-of-this-site", b"someone-elses-key"
    key_file = tmp_path / "hmac.key"
    key_file.write_bytes(key + b"\n")
    key_file.chmod(0o600)
    config = site.config(security={"signature": {"mode": "hmac", "key_file": str(key_file)}},
                         policy={**site_policy(site), "share_logs": False})
    listener = site.listener(config)

    def signed(task: dict[str, Any], with_key: bytes = key) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(task).encode()
        return body, {"x-fem-signature": sign_hmac(body, with_key)}

    def send(body: bytes, headers: dict[str, str] | None) -> None:
        orch.publish(body, headers=headers)

    node = {"node_id": site.node}
    send(json.dumps(site.task("unsigned", **node)).encode(), None)
    send(*signed(site.task("wrong-key", **node), other))
    body, headers = signed(site.task("tampered", **node))
    send(body.replace(b'"memory": "128Mi"', b'"memory": "256Mi"'), headers)
    send(*signed(site.task("expired", not_after="2020-01-01T00:00:00Z", **node)))
    send(*signed(site.task("other-node", node_id="some-other-node")))
    send(*signed(site.task("no-node")))
    body, _ = signed(site.task("bad-header", **node))
    send(body, {"x-fem-signature": "hmac-sha256=" + "0" * 64})

    for tid, code in (("expired", "expired"), ("other-node", "wrong_node"),
                      ("no-node", "wrong_node")):
        final = orch.wait_terminal(tid, timeout=60)
        assert (final["state"], final["error"]["code"]) == ("REJECTED", code), final
    anonymous = wait_anonymous_rejections(orch, 4)  # before parsing: no task id
    assert {e["error"]["code"] for e in anonymous} == {"signature_invalid"}
    dead = orch.dead_letters()
    assert sorted(h["x-fem-reject-reason"] for h, _ in dead) == sorted(
        ["signature_invalid"] * 4 + ["expired", "wrong_node", "wrong_node"])

    # Control messages: an unsigned cancel is ignored, a signed one is obeyed.
    publish_control(orch, json.dumps({"schema": "fem.control/v1", "action": "cancel",
                                      "task_id": "signed-ok"}).encode(), None)
    listener.wait_for_log("ignored a control message (signature_invalid)")
    # Signed, but for any node (replayable elsewhere) or expired: ignored as well.
    for extra, code in (({}, "wrong_node"),
                        ({"node_id": site.node, "not_after": "2020-01-01T00:00:00Z"}, "expired")):
        stale = json.dumps({"schema": "fem.control/v1", "action": "cancel",
                            "task_id": "signed-ok", **extra}).encode()
        publish_control(orch, stale, {"x-fem-signature": sign_hmac(stale, key)})
        listener.wait_for_log(f"ignored a control message ({code})")
    cancel = json.dumps({"schema": "fem.control/v1", "action": "cancel",
                         "task_id": "signed-cancelled", "node_id": site.node}).encode()
    publish_control(orch, cancel, {"x-fem-signature": sign_hmac(cancel, key)})
    wait_for(lambda: any(a["decision"] == "cancel_requested" for a in audit_lines(site)),
             "the signed cancel in the audit log")
    send(*signed(site.task("signed-cancelled", **node)))
    send(*signed(site.task("signed-ok", **node)))

    cancelled = orch.wait_terminal("signed-cancelled")
    assert cancelled["state"] == "CANCELLED", cancelled
    assert [e["state"] for e in orch.events("signed-cancelled")] == ["RECEIVED", "CANCELLED"]
    final = orch.wait_terminal("signed-ok")
    assert final["state"] == "COMPLETED", final
    # policy.share_logs false: the logs stay on the node, described but not uploaded.
    assert final["logs"]["url"] is None
    kept = site.work_dir / "runs" / "signed-ok" / "archives" / "logs.tar.gz"
    assert final["logs"]["size"] == kept.stat().st_size
    assert final["logs"]["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert b"task-done" in tar_members(kept.read_bytes())["stdout.log"]
    paths = {r["path"] for r in upload_requests(env) if r["path"].startswith(f"/{site.node}/")}
    assert paths == {f"/{site.node}/signed-ok/outputs.tar.gz"}
    received = [a for a in audit_lines(site) if a["decision"] == "received"]
    assert received and all(a["key_id"] is None or a["key_id"].startswith("hmac:")
                            for a in received)
    assert key.decode() not in (site.work_dir / "audit.jsonl").read_text()
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def site_policy(site) -> dict[str, Any]:
    """The ``policy`` section ``site.config()`` writes, to extend one key of it."""
    return yaml.safe_load(site.config().read_text())["policy"]


def test_running_container_is_hardened_and_audit_survives_kill_9(site):
    """``docker inspect`` of the task's container while it runs; the listener is then
    killed with SIGKILL, and the audit log keeps whole lines in the order of the decisions."""
    env, orch = site.env, site.orchestrator
    tid = "hardened"
    name = task_name(site.node, tid)
    go = site.work_dir / "tasks" / name / "output" / "go"
    # Runs until the test lets it finish, whatever the timing.
    task = site.task(tid, command=["sh", "-c", "id; until [ -e /fem/output/go ]; do sleep 0.2;"
                                   " done; echo task-done"])
    listener = site.listener()
    orch.publish(site.task("refused", network="host"))
    orch.publish(task)
    orch.wait_state(tid, "RUNNING")

    def inspect() -> dict[str, Any] | None:
        out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True)
        return json.loads(out.stdout)[0] if out.returncode == 0 else None

    wait_for(lambda: (inspect() or {}).get("State", {}).get("Running"), "the container")
    info = inspect()
    host, cfg = info["HostConfig"], info["Config"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["PidsLimit"] == 256
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024**2
    assert host["NanoCpus"] == 1_000_000_000
    assert cfg["User"] == "65534:65534"  # the image's user is root
    assert host["PidMode"] == "" and host["IpcMode"] == "private" and host["UsernsMode"] == ""
    assert host["NetworkMode"] == "none"
    assert list(host["Tmpfs"]) == ["/tmp"] and "mode=1777" in host["Tmpfs"]["/tmp"]
    assert not host["Binds"] and not host["Devices"] and not host["DeviceRequests"]
    run_dir = str(site.work_dir / "tasks" / name)
    data_dir = str(Path(site.config().parent) / "data" / "cohort")
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in info["Mounts"]}
    assert mounts == {
        "/fem/input": (f"{run_dir}/input", False),
        "/fem/src": (f"{run_dir}/src", False),
        "/fem/output": (f"{run_dir}/output", True),
        "/fem/data": (data_dir, False),
    }
    assert {k: v for k, v in cfg["Labels"].items() if k.startswith("fem.")} == {
        "fem.node_id": site.node, "fem.task_id": tid, "fem.purpose": "task"}

    listener.kill9()
    lines = (site.work_dir / "audit.jsonl").read_bytes()
    assert lines.endswith(b"\n")
    before = [json.loads(line) for line in lines.splitlines()]  # every line whole
    go.touch()
    listener.start()
    final = orch.wait_terminal(tid)
    assert final["state"] == "COMPLETED", final
    stdout = tar_members(uploaded_file(env, final["logs"]["url"]))["stdout.log"]
    assert stdout.startswith(b"uid=65534") and b"task-done" in stdout

    audit = audit_lines(site)
    assert audit[:len(before)] == before  # appended to, never rewritten
    assert all(a["node_id"] == site.node and a["ts"] for a in audit)
    decisions = [(a["decision"], a["task_id"]) for a in audit]
    assert decisions == [
        ("received", None), ("rejected", "refused"),
        ("received", None), ("accepted", tid), ("run", tid),
        # killed here; the next listener carries the task on from its last stage
        ("run", tid), ("upload", tid), ("upload", tid), ("outcome", tid),
    ], decisions
    rejected, accepted, run1, run2, up1, up2, outcome = audit[1], *audit[3:]
    assert (rejected["code"], rejected["rule"]) == ("policy_violation", "policy.networks")
    assert accepted["image"] == env["FEM_TEST_IMAGE"] and accepted["source"] == env[
        "FEM_TEST_GIT_URL"]
    assert accepted["datasets"] == [{"name": "cohort", "host_path": data_dir,
                                     "mount": "/fem/data"}]
    for run, attempt in ((run1, 1), (run2, 2)):
        assert run["image_digest"] == env["FEM_TEST_IMAGE_DIGEST"]
        assert run["source_commit"] == env["FEM_TEST_GIT_COMMIT"]
        assert run["datasets"] == ["cohort"] and run["attempt"] == attempt
    assert [(u["archive"], u["url"]) for u in (up1, up2)] == [
        ("outputs", final["outputs"]["url"]), ("logs", final["logs"]["url"])]
    assert up1["sha256"] == final["outputs"]["sha256"]
    assert (outcome["state"], outcome["exit_code"]) == ("COMPLETED", 0)
    text = (site.work_dir / "audit.jsonl").read_text()
    assert "X-Sig" not in text and "secret" not in text and "id,age" not in text
    assert oct((site.work_dir / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_secrets_of_a_run_appear_nowhere(site, tmp_path):
    """A registry password, a git token, upload and download headers and presigned query
    strings are used by a run, and are found in no artifact, log, event, audit line, argv or
    environment of any process sampled during the run."""
    env, orch = site.env, site.orchestrator
    salt = uuid.uuid4().hex[:12]
    secrets = {"registry": f"regpw{salt}", "git": f"gittok{salt}", "upload": f"bearer{salt}",
               "presigned": f"presig{salt}", "download": f"dlhdr{salt}"}
    with auth_registry(tmp_path, env["FEM_TEST_IMAGE"], secrets["registry"]) as registry:
        (tmp_path / "registry.pw").write_text(secrets["registry"] + "\n")
        (tmp_path / "git.token").write_text(secrets["git"] + "\n")
        for f in ("registry.pw", "git.token"):
            (tmp_path / f).chmod(0o600)
        pol = site_policy(site)
        pol["images"]["allow"].append(f"{registry.host}/**")
        config = site.config(
            policy=pol,
            registries={registry.host: {"username": "fem",
                                        "password_file": str(tmp_path / "registry.pw")}},
            # git:// does not authenticate: the token still travels to fem_source's
            # credential file, so every place it passes through is checked.
            sources={"127.0.0.1": {"username": "fem", "token_file": str(tmp_path / "git.token")}},
        )
        tid = "secrets"
        content = b"input behind a presigned URL\n"
        in_url = f"{env['FEM_TEST_UPLOAD_URL']}/{site.node}/in/{tid}.txt"
        requests.put(in_url, data=content, timeout=10).raise_for_status()
        query = f"?X-Amz-Signature={secrets['presigned']}"
        task = site.task(
            tid, image={"ref": registry.image, "pull_policy": "always"},
            inputs=[{"url": in_url + query, "path": "in.txt",
                     "headers": {"X-Token": secrets["download"]}}],
            outputs={"upload": {"url": f"{env['FEM_TEST_UPLOAD_URL']}/{site.node}/{tid}/"
                                       f"outputs.tar.gz{query}",
                                "headers": {"Authorization": f"Bearer {secrets['upload']}"}}},
        )
        task["logs"]["upload"]["url"] += f"&sig={secrets['presigned']}"
        with ProcessSampler(list(secrets.values())) as sampler:
            listener = site.listener(config)
            orch.publish(task)
            final = orch.wait_terminal(tid)
            listener.stop()
        assert final["state"] == "COMPLETED", final
        assert final["image_digest"].startswith("sha256:")

    # Each secret was really used...
    reqs = [r for r in upload_requests(env) if r["path"].startswith(f"/{site.node}/")]
    put = [r for r in reqs if r["path"] == f"/{site.node}/{tid}/outputs.tar.gz"][-1]
    assert put["authorization_sha256"] == hashlib.sha256(
        f"Bearer {secrets['upload']}".encode()).hexdigest()
    assert secrets["presigned"] in put["query"]
    get = [r for r in reqs if r["method"] == "GET" and r["path"].endswith(f"/in/{tid}.txt")][-1]
    assert get["headers"].get("X-Token") == secrets["download"]
    assert secrets["presigned"] in get["query"]
    # ...and is nowhere else.
    assert sampler.samples > 20 and len(sampler.processes_seen) > 20
    assert sampler.hits == []
    found = {}
    journal = {"journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"}
    for path in site.work_dir.rglob("*"):
        if path.is_file() and path.name not in journal:
            data = path.read_bytes()
            for name, secret in secrets.items():
                if secret.encode() in data:
                    found.setdefault(name, []).append(str(path))
    texts = {"listener log": listener.log.read_text(), "events": json.dumps(orch.events(tid))}
    for where, text in texts.items():
        for name, secret in secrets.items():
            if secret in text:
                found.setdefault(name, []).append(where)
    assert found == {}
    assert list((site.work_dir / "runs" / tid / "artifacts").iterdir())  # was looked at
    for name in journal & {p.name for p in site.work_dir.iterdir()}:
        assert (site.work_dir / name).stat().st_mode & 0o077 == 0, name
    assert site.work_dir.stat().st_mode & 0o077 == 0
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_listener_runs_a_task_over_amqps_with_a_client_certificate(site, tmp_path):
    """A RabbitMQ node of the test's own that speaks only TLS and wants a client certificate
    (the shared broker is left alone); the listener connects with CA + certificate."""
    with tls_broker(tmp_path) as broker:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(broker.params(client_cert=False))
        orch = Orchestrator(site.node, broker.params())
        try:
            config = site.config(broker={
                "url": broker.url, "heartbeat_s": 5,
                "tls": {"ca_file": str(broker.ca_file), "cert_file": str(broker.cert_file),
                        "key_file": str(broker.key_file)}})
            listener = site.listener(config)
            orch.publish(site.task("over-tls"))
            final = orch.wait_terminal("over-tls")
            assert final["state"] == "COMPLETED", final
            assert "connection lost" not in listener.log.read_text()
            listener.stop()
        finally:
            orch.close()
