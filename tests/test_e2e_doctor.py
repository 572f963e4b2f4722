"""``fem-ansible doctor`` against the real services, healthy and with each piece broken:
broker down, wrong password, engine down, an unreachable inventory host (issue 8), a host
whose key is no longer known (issue 31)."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fem_ansible.cli import main
from tests.support import ssh

pytestmark = pytest.mark.e2e


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor(config) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


def line(lines: list[str], prefix: str) -> str:
    found = [x for x in lines if x.startswith(prefix)]
    assert len(found) == 1, f"{prefix!r} not once in:\n" + "\n".join(lines)
    return found[0]


def test_doctor_healthy_node(site):
    code, lines = doctor(site.config(policy={
        **yaml.safe_load(site.config().read_text())["policy"],
        "limits": {"output_bytes": "1Gi"}}))
    assert code == 0, "\n".join(lines)
    assert not [x for x in lines if x.startswith("✗")]
    for prefix in ("✓ config:", "✓ work dir:", "✓ ansible:", "✓ broker: logged in as guest@",
                   "✓ topology:", "✓ engine docker: Docker",
                   f"✓ registry {site.env['FEM_TEST_REGISTRY']}:",
                   f"✓ git {site.env['FEM_TEST_GIT_BASE_URL'].removeprefix('git://')}:",
                   "✓ host localhost:", "✓ disk:", "✓ clock:",
                   "✓ dataset cohort:", "✓ roles: the built-in roles only",
                   "✓ executor docker: role "):
        line(lines, prefix)
    # signatures off is allowed, but said
    assert "set mode hmac or ed25519" in line(lines, "! signatures:")


def test_doctor_broker_down(site):
    port = closed_port()
    code, lines = doctor(site.config(broker={"url": f"amqp://guest:guest@127.0.0.1:{port}/%2F"}))
    assert code == 1
    broken = line(lines, "✗ broker:")
    assert f"could not connect to guest@127.0.0.1:{port}: Connection refused" in broken
    assert "start RabbitMQ" in broken
    line(lines, "✓ engine docker:")  # the other checks still ran


def test_doctor_wrong_password(site):
    code, lines = doctor(site.config(broker={
        "url": "amqp://guest:not-the-password@127.0.0.1:5672/%2F"}))
    assert code == 1
    broken = line(lines, "✗ broker:")
    assert "login refused for guest@127.0.0.1:5672" in broken
    assert "not-the-password" not in "\n".join(lines)


def test_doctor_wrong_vhost_names_it(site):
    code, lines = doctor(site.config(broker={
        "url": "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"}))
    assert code == 1
    broken = line(lines, "✗ broker:")
    assert "no access to the virtual host 'no-such-vhost'" in broken, broken
    assert "rabbitmqctl set_permissions -p no-such-vhost guest" in broken and \
        "VHOST" not in broken  # the literal placeholder (issue 31)


def test_doctor_engine_down(site, monkeypatch):
    # The engine is the one DOCKER_HOST names, as for the roles' docker modules.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    code, lines = doctor(site.config())
    assert code == 1
    broken = line(lines, "✗ engine docker:")
    assert "unix:///nonexistent/docker.sock" in broken and "DOCKER_HOST" in broken
    line(lines, "✓ broker:")


def test_doctor_unreachable_host(site, tmp_path):
    port = closed_port()
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {
        "localhost": {"ansible_connection": "local"},
        "gpu1": {"ansible_host": "127.0.0.1", "ansible_port": port,
                 "ansible_connection": "ssh", "ansible_user": "fem"}}}}))
    code, lines = doctor(site.config(
        execution={"work_dir": str(site.work_dir), "inventory": str(inventory)},
        policy={**yaml.safe_load(site.config().read_text())["policy"],
                "targets": {"allow": ["localhost", "gpu*", "tpu-*"]}}))  # globs
    assert code == 1
    broken = line(lines, "✗ host gpu1: unreachable")
    line(lines, "✗ target tpu-*: not a host or group")
    assert "ansible_port" in broken
    line(lines, "✓ host localhost:")


def sessions(pid: int) -> list[int]:
    """The children of sshd ``pid``: one (or two, privilege separated) per open session."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def no_sessions_left(pid: int) -> bool:
    deadline = time.monotonic() + 10  # sshd's child notices the master's end, then exits
    while sessions(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not sessions(pid)


def test_doctor_leaves_no_ssh_master(site):
    """A master left behind answered the next doctor without the host key being checked
    again: with the known-hosts file emptied, doctor said ✓ until the master was killed
    (issue 31).  Doctor's masters are its own (its own ControlPath) and end with it."""
    ssh.ensure_user()
    control_dir = Path.home() / ".ansible" / "cp"
    before = set(control_dir.iterdir()) if control_dir.is_dir() else set()
    with ssh.addresses_held():
        base = ssh.new_dir(f"{site.node}-doctor")
        keys = ssh.SshKeys(base / "client")
        host = ssh.SshHost("127.0.0.2", base / "gpu1", keys).start()
        try:
            config = site.config(
                execution={"work_dir": str(site.work_dir),
                           "inventory": str(ssh.inventory(base / "inventory.yml",
                                                          {"gpu1": host})),
                           "ssh": {"private_key_file": str(keys.private_key),
                                   "known_hosts_file": str(keys.known_hosts)}},
                policy={**yaml.safe_load(site.config().read_text())["policy"],
                        "targets": {"allow": ["localhost", "compute"]}})
            code, lines = doctor(config)
            line(lines, "✓ host gpu1:")
            assert no_sessions_left(host.proc.pid), "doctor left an SSH session open"

            keys.known_hosts.write_text("")
            code, lines = doctor(config)
            assert code == 1
            assert "Host key verification failed" in line(lines, "✗ host gpu1: unreachable")
            assert no_sessions_left(host.proc.pid)
        finally:
            host.stop()
            shutil.rmtree(base, ignore_errors=True)
    after = set(control_dir.iterdir()) if control_dir.is_dir() else set()
    assert not after - before, f"sockets left in {control_dir}: {after - before}"
