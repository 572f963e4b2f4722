"""Tasks on inventory hosts over real SSH (issue 6): a real ``sshd`` per loopback address
as the inventory's hosts, the real broker, engine, registry, git daemon and upload endpoint.

The "remote" hosts are this machine behind sshd on 127.0.0.2 and 127.0.0.3, so the task's
container runs on the same engine, but everything on the host side (run dir, pull,
checkout, container, archives) goes through SSH as an unprivileged user and Debian's
python3, and the archives come back to the listener by ``fetch``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fem_ansible.config import load_config
from fem_ansible.runner import collections_view
from fem_ansible.ssh_masters import ANSWERED_S
from fem_ansible.targets import Inventory, check_host, inventory_path
from tests.support import ssh
from tests.support.archives import tar_members, uploaded_file
from tests.support.harness import NOTHING_LEFT, leftovers, task_name
from tests.test_e2e_doctor import doctor, line

pytestmark = pytest.mark.e2e


@pytest.fixture
def ssh_site(site):
    """``ssh_site(up={name: address}, down={...})``: sshd hosts (those in ``down`` made but
    not started), an inventory of them in group ``compute``, and a config running tasks
    there with the test's key and known-hosts file."""
    ssh.ensure_user()
    with ssh.addresses_held():
        base = ssh.new_dir(site.node)
        keys = ssh.SshKeys(base / "client")
        hosts: list[ssh.SshHost] = []

        def make(up: dict[str, str], down: dict[str, str] | None = None,
                 target: str = "compute", **execution):
            made = {}
            for name, address in {**up, **(down or {})}.items():
                host = ssh.SshHost(address, base / name, keys)
                hosts.append(host)
                made[name] = host.start() if name in up else host
            inv = ssh.inventory(base / "inventory.yml", made)
            config = site.config(
                execution={"work_dir": str(site.work_dir), "shutdown_grace_s": 30,
                           "inventory": str(inv), "target": target,
                           "ssh": {"private_key_file": str(keys.private_key),
                                   "known_hosts_file": str(keys.known_hosts)}, **execution},
                policy={**_policy(site), "targets": {"allow": ["compute", *made]}})
            return made, config

        yield make
        for host in hosts:
            host.stop()
        shutil.rmtree(base, ignore_errors=True)


def _policy(site) -> dict:
    import yaml

    return yaml.safe_load(site.config().read_text())["policy"]


def test_task_runs_on_an_ssh_host(site, ssh_site):
    env, orch = site.env, site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, target="ssh-a")
    site.listener(config)
    orch.publish(site.task("over-ssh"))
    final = orch.wait_terminal("over-ssh")

    assert final["state"] == "COMPLETED", final
    assert [e["state"] for e in orch.events("over-ssh")] == [
        "RECEIVED", "STAGING_IN", "RUNNING", "STAGING_OUT", "COMPLETED"]
    assert {e["host"] for e in orch.events("over-ssh")[1:]} == {"ssh-a"}
    assert final["source_commit"] == env["FEM_TEST_GIT_COMMIT"]
    result = tar_members(uploaded_file(env, final["outputs"]["url"]))["result.txt"]
    assert b"id,age" in result and b"hello" in result.lower()
    assert b"task-done" in tar_members(uploaded_file(env, final["logs"]["url"]))["stdout.log"]
    # It went through that sshd, as the unprivileged user, key checked against known hosts.
    assert f"Accepted publickey for {ssh.USER}" in hosts["ssh-a"].log.read_text()
    # Nothing left on the host (its fem work dir), nor on the listener's side.
    assert [p for p in hosts["ssh-a"].leftovers() if p != "tasks"] == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    # doctor's host check, over the same connection settings, with a ControlPath dir of its
    # own and no master left (not in Ansible's default dir either).
    cfg = load_config(config, environ={})
    view = collections_view(cfg.work_dir)
    default_dir = Path.home() / ".ansible" / "cp"
    before = set(default_dir.iterdir()) if default_dir.is_dir() else set()
    checked = check_host(cfg, "ssh-a", Inventory.load(inventory_path(cfg), view), view)
    assert not (set(default_dir.iterdir()) if default_dir.is_dir() else set()) - before
    assert checked["reachable"] and checked["python"].startswith("3."), checked
    assert checked["engines"]["docker"] and checked["free_bytes"] > 0
    assert checked["work_dir"] == str(hosts["ssh-a"].work_dir)


def test_cancel_stops_a_task_on_an_ssh_host(site, ssh_site):
    """A cancel reaches a container on a remote host through the stop playbook (the
    listener creates the stop request itself only on a host of its own, issue 29)."""
    orch = site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, target="ssh-a")
    site.listener(config)
    orch.publish(site.task("ssh-cancel", command=["sh", "-c", "echo begun; sleep 300"]))
    orch.wait_state("ssh-cancel", "RUNNING")
    orch.cancel("ssh-cancel")
    final = orch.wait_terminal("ssh-cancel", timeout=120)

    assert final["state"] == "CANCELLED" and final["error"]["code"] == "cancelled", final
    assert final["exit_code"] is None
    logs = tar_members(uploaded_file(site.env, final["logs"]["url"]))
    assert b"begun" in logs["stdout.log"] and logs["exit_code"] == b"143\n"
    assert [p for p in hosts["ssh-a"].leftovers() if p != "tasks"] == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT


def test_group_with_a_host_down_completes_every_task(site, ssh_site):
    orch = site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, down={"ssh-b": "127.0.0.3"},
                             max_parallel=2)
    site.listener(config)
    ids = [f"batch-{i}" for i in range(4)]
    for tid in ids:
        orch.publish(site.task(tid, command=["sh", "-c", "echo done > /fem/output/r.txt"]))
    finals = {tid: orch.wait_terminal(tid, timeout=300) for tid in ids}

    assert {tid: e["state"] for tid, e in finals.items()} == dict.fromkeys(ids, "COMPLETED"), \
        finals
    assert {e["host"] for e in finals.values()} == {"ssh-a"}
    # The second task was given ssh-b (least busy), found it down and moved on.
    moved = [e for tid in ids for e in orch.events(tid)
             if "ssh-b is unreachable; trying ssh-a" in (e["message"] or "")]
    assert moved, [e["message"] for tid in ids for e in orch.events(tid)]
    assert [p for p in hosts["ssh-a"].leftovers() if p != "tasks"] == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT
    cfg = load_config(config, environ={})
    view = collections_view(cfg.work_dir)
    assert not check_host(cfg, "ssh-b", Inventory.load(inventory_path(cfg), view),
                          view)["reachable"]


def test_unknown_target_and_missing_executor_role_are_rejected(site, ssh_site):
    orch = site.orchestrator
    _hosts, config = ssh_site(up={}, down={"ssh-a": "127.0.0.2"}, target="ssh-a")
    import yaml

    data = yaml.safe_load(config.read_text())
    data["policy"]["targets"]["allow"].append("nowhere")
    data["policy"]["executors"] = {"allow": ["docker", "ghost"]}
    config.write_text(yaml.safe_dump(data))
    site.listener(config)
    orch.publish(site.task("to-nowhere", target="nowhere"))
    orch.publish(site.task("ghost-exec", executor="ghost"))
    nowhere = orch.wait_terminal("to-nowhere")
    ghost = orch.wait_terminal("ghost-exec")
    assert nowhere["state"] == "REJECTED" and "execution.inventory" in nowhere["error"]["message"]
    assert ghost["state"] == "REJECTED" and "fem_executor_ghost" in ghost["error"]["message"]


def test_a_host_that_goes_away_mid_task_ends_it_once_within_its_bound(site, ssh_site):
    """Issue 28: the host's sshd stopped, its sessions with it, while the task's container
    runs there: one terminal event, not COMPLETED, well within the task's timeout plus the
    playbook's margin (no hang), and the listener takes tasks again."""
    orch = site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, target="ssh-a")
    lst = site.listener(config)
    orch.publish(site.task("host-away", source=None, datasets=None, command=[
        "sh", "-c", "sleep 40; echo done > /fem/output/done"],
        resources={"memory": "128Mi", "timeout_s": 120}))
    orch.wait_state("host-away", "RUNNING", timeout=180)
    name = task_name(site.node, "host-away")
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                         capture_output=True, text=True).stdout.strip() != "true":
        assert time.monotonic() < deadline, "the task's container never ran"
        time.sleep(0.5)
    gone = time.monotonic()
    hosts["ssh-a"].stop(sessions=True)
    final = orch.wait_terminal("host-away", timeout=120 + 60)
    assert time.monotonic() - gone < 120 + 60
    assert final["state"] == "FAILED", final
    assert "unreachable" in final["error"]["message"], final
    time.sleep(2)
    orch.drain()
    terminal = [e for e in orch.distinct_events("host-away")
                if e["state"] in ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED")]
    assert len(terminal) == 1, terminal
    assert lst.alive
    # Back again: doctor lists what the task left there (it could not clean up).
    hosts["ssh-a"].start()
    _code, lines = doctor(config)
    assert f"task dirs there: {name}" in line(lines, "! host ssh-a:")
    subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)


def _masters() -> dict[int, str]:
    """The SSH masters on this machine (ssh's title ``ssh: <ControlPath> [mux]``): pid to
    its cgroup."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")
            group = Path(f"/proc/{pid}/cgroup").read_text().strip()
        except OSError:
            continue
        if title.startswith(b"ssh: ") and title.endswith(b" [mux]"):
            found[int(pid)] = group
    return found


def test_a_hosts_connection_is_kept_between_tasks_and_no_cancel_ends_it(site, ssh_site):
    """Issue 30: a host's next run reuses the SSH connection its last run opened (one login
    on the host for four tasks, a cancel among them), outside every run's cgroup, in one
    of its own under the listener's; the listener's end ends it."""
    orch = site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, target="ssh-a")
    before = set(_masters())
    lst = site.listener(config)
    own = Path(f"/proc/{lst.proc.pid}/cgroup").read_text().strip().partition("0::")[2]

    def logins() -> int:
        return hosts["ssh-a"].log.read_text().count(f"Accepted publickey for {ssh.USER}")

    orch.publish(site.task("kept-1"))
    assert orch.wait_terminal("kept-1")["state"] == "COMPLETED"
    kept = {pid: group for pid, group in _masters().items() if pid not in before}
    assert len(kept) == 1, kept
    [group] = kept.values()  # a group of its own beside the runs'
    assert Path(group.partition("0::")[2]).parent == Path(own) / "fem-ssh", (group, own)
    assert logins() == 1

    orch.publish(site.task("kept-2"))
    assert orch.wait_terminal("kept-2")["state"] == "COMPLETED"
    assert logins() == 1

    orch.publish(site.task("kept-3", command=["sh", "-c", "echo begun; sleep 300"]))
    orch.wait_state("kept-3", "RUNNING")
    orch.cancel("kept-3")
    assert orch.wait_terminal("kept-3", timeout=120)["state"] == "CANCELLED"
    orch.publish(site.task("kept-4"))
    assert orch.wait_terminal("kept-4")["state"] == "COMPLETED"
    # The task run, the cancelled task's run and its stop run, all on the one connection.
    assert logins() == 1
    assert {pid for pid in _masters() if pid not in before} == set(kept)
    assert [p for p in hosts["ssh-a"].leftovers() if p != "tasks"] == []
    assert leftovers(site.node, site.work_dir) == NOTHING_LEFT

    assert lst.stop() == 0
    assert not {pid for pid in _masters() if pid not in before}


def test_a_stalled_kept_connection_is_not_lent(site, ssh_site):
    """The kept master's connection stalls (the host's session processes stopped, as behind
    a firewall that dropped the idle flow; the sshd still takes logins): three tasks
    started together are not lent it (an outside review saw five such tasks fail as
    unreachable): each connects anew and completes."""
    orch = site.orchestrator
    hosts, config = ssh_site(up={"ssh-a": "127.0.0.2"}, target="ssh-a", max_parallel=3)
    host = hosts["ssh-a"]
    site.listener(config)
    short = {"source": None, "datasets": None,
             "command": ["sh", "-c", "echo done > /fem/output/r.txt"]}
    orch.publish(site.task("stall-0", **short))
    assert orch.wait_terminal("stall-0")["state"] == "COMPLETED"
    time.sleep(ANSWERED_S)
    sessions = ssh._descendants(host.proc.pid)
    assert sessions
    for pid in sessions:
        os.kill(pid, signal.SIGSTOP)
    try:
        for i in (1, 2, 3):
            orch.publish(site.task(f"stall-{i}", **short))
        for i in (1, 2, 3):
            final = orch.wait_terminal(f"stall-{i}", timeout=180)
            assert final["state"] == "COMPLETED", final
        assert host.log.read_text().count(f"Accepted publickey for {ssh.USER}") >= 2
    finally:
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
