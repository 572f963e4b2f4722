"""The resident Ansible's server and client, with a real server process (issue 30): what it
runs, what it refuses (and the client then runs cold), and which environments it serves.
tests/test_e2e_resident.py has it under a listener, with tasks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fem_ansible import cgroups, playbook_cli
from fem_ansible.doctor import check_runs
from fem_ansible.resident import CLIENT, START_WAIT_S, Servers, client_command
from fem_ansible.resident_client import PER_RUN, PROTOCOL, server_key
from fem_ansible.resident_server import resident_host
from fem_ansible.sockdir import socket_dir

# What ansible-playbook's own process runs (a lookup's shell is its child).
PLAYBOOK = """\
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.debug:
        msg: "parent: {{ lookup('ansible.builtin.pipe', 'tr -c \\"[:print:]\\" \\" \\"'
                                ~ ' < /proc/$PPID/cmdline') }}"
"""


def test_the_server_key_ignores_only_the_per_run_variables():
    env = {"PATH": "/bin", "ANSIBLE_STRATEGY": "linear"}
    per_run = {name: f"/{name}" for name in PER_RUN}
    assert server_key({**env, **per_run}) == server_key(env)
    assert server_key({**env, "ANSIBLE_STRATEGY": "free"}) != server_key(env)
    assert server_key({**env, "ANSIBLE_CALLBACK_PLUGINS": "/x"}) != server_key(env)


def test_a_changed_imported_file_is_seen(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text("x = 1\n")
    seen = {str(module): resident_host.stamp(module.stat())}
    assert resident_host.changed(seen) is None
    module.write_text("x = 22\n")
    assert resident_host.changed(seen) == str(module)
    module.unlink()
    assert resident_host.changed(seen) == str(module)
    assert sys.modules["fem_ansible.cgroups"].__file__ in resident_host.fingerprint()


@pytest.fixture
def server(tmp_path):
    """A server started as the listener starts one (its environment: a run's, less the
    per-run variables); yields (its socket, its environment)."""
    if cgroups.base() is None:
        pytest.fail("these tests need a writable cgroup v2 (CI runs as root)")
    directory = socket_dir(tmp_path, "resident", "test", 60)  # as short as the listener's
    directory.mkdir(parents=True, mode=0o700)
    # LC_ALL set: Python adds nothing to its environment (PEP 538), so a request built here
    # has the server's exactly.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
           "ANSIBLE_NOCOLOR": "True",
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    sock = directory / f"{server_key(env)}.sock"
    proc = subprocess.Popen([sys.executable, "-P", "-m", "fem_ansible.resident_server",
                             str(sock), str(os.getpid())],
                            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield sock, env
    proc.terminate()
    assert proc.wait(30) == 0


def run_client(sock: Path, env: dict[str, str], command: list[str], ident: str,
               tmp_path: Path) -> subprocess.CompletedProcess[str]:
    group = cgroups.create(ident)
    assert group is not None
    try:
        return subprocess.run([*client_command(sock), *command],
                              env={**env, cgroups.ENV: str(group)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        cgroups.remove(group)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_run_after_sighup_waits_for_the_new_server_not_the_retiring_one(tmp_path):
    """SIGHUP (Servers.replace) while a retiring server has not yet seen its signal, or
    after one was killed: the next run of its environment waits for the new server instead
    of connecting to the old socket and going cold."""
    if cgroups.base() is None:
        pytest.fail("these tests need a writable cgroup v2 (CI runs as root)")
    servers = Servers(tmp_path / "work")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    old = None
    try:
        command, old = servers.command(env, ["true"])
        assert old is not None
        sock = servers._socket(old.key)
        _wait_for(sock)
        assert servers.command(env, ["true"])[0] == [*client_command(sock, 0), "true"]
        os.kill(old.process.pid, signal.SIGSTOP)  # it has not seen SIGTERM yet
        servers.replace()
        assert not sock.exists()
        command, new = servers.command(env, ["true"])
        assert new is not None and new is not old
        assert command == [*client_command(sock, START_WAIT_S), "true"]
        os.kill(old.process.pid, signal.SIGCONT)
        assert old.process.wait(30) == 0
        _wait_for(sock)
        os.kill(new.process.pid, signal.SIGKILL)  # killed: its socket stays behind
        new.process.wait(30)
        command, third = servers.command(env, ["true"])
        assert third is not None and third is not new
        assert command == [*client_command(sock, START_WAIT_S), "true"]
    finally:
        if old is not None and old.process.poll() is None:
            os.kill(old.process.pid, signal.SIGCONT)  # whatever failed, it may end
        servers.close()


def test_a_run_is_forked_from_the_server_with_its_exit_code(server, tmp_path):
    sock, env = server
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    command = [sys.executable, "-P", "-m", playbook_cli.MODULE, "-i", "localhost,", "-c",
               "local", str(playbook)]
    done = run_client(sock, env, command, f"resident-test-{os.getpid()}.a1", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fem_ansible.resident_server" in done.stdout, done.stdout
    assert "starts its own Ansible" not in done.stderr

    failing = run_client(sock, env, [*command[:-1], str(tmp_path / "absent.yml")],
                         f"resident-test-{os.getpid()}.a2", tmp_path)
    assert failing.returncode != 0
    assert "absent.yml" in failing.stdout + failing.stderr


@pytest.mark.parametrize(("change", "why"), [
    ("command", "not fem-ansible's ansible-playbook"),
    ("env", None),
])
def test_what_the_server_does_not_serve_runs_cold(server, tmp_path, change, why):
    sock, env = server
    script = "import os, sys; print('cold', os.getppid() != 1); sys.exit(3)"
    command = [sys.executable, "-P", "-m", playbook_cli.MODULE, "--version"]
    if change == "command":
        command = [sys.executable, "-c", script]
    else:
        env = {**env, "ANSIBLE_STRATEGY": "free"}  # not the server's environment
    done = run_client(sock, env, command, f"resident-cold-{os.getpid()}.a1", tmp_path)
    if why:
        assert done.returncode == 3 and "cold True" in done.stdout, done
        assert why in done.stderr
    else:
        assert done.returncode == 0 and "ansible-playbook [core" in done.stdout, done
        assert "its Ansible environment is not the resident one's" in done.stderr


def test_doctor_says_how_runs_are_held(make_config):
    (on,) = check_runs(make_config())
    assert (on.status, on.name) == ("ok", "runs") and "resident Ansible" in on.detail, on
    (off,) = check_runs(make_config(execution={"resident_ansible": False}))
    assert "started cold (execution.resident_ansible: false)" in off.detail, off


def test_a_client_of_another_version_runs_cold(tmp_path):
    """A client file newer than the listener that runs it (an upgrade in place): it reads
    the cold command after ``--`` and runs it, whatever else it was given."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(CLIENT), "fem-resident/0", "x", "--",
         sys.executable, "-c", "raise SystemExit(5)"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 5, done
    assert "is not the listener's" in done.stderr


@pytest.mark.parametrize("group", ["{base}/..", "{base}/../fem-runs/x", "/elsewhere/x",
                                   "{base}/.hidden", ""])
def test_the_server_runs_nothing_outside_a_cgroup_of_its_own(server, tmp_path, group):
    """A request (of the listener's own user) whose cgroup is not one under the server's
    ``fem-runs/``: answered cold, nothing forked."""
    sock, env = server
    base = cgroups.base()
    request = {"protocol": PROTOCOL, "cwd": str(tmp_path),
               "command": [sys.executable, "-P", "-m", playbook_cli.MODULE, "--version"],
               "env": {**env, cgroups.ENV: group.format(base=base)}}
    body = json.dumps(request).encode()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        socket.send_fds(conn, [len(body).to_bytes(4, "big") + body], [0, 1, 2])
        reply = json.loads(conn.makefile().readline())
    assert reply == {"cold": "it has no cgroup of its own"}


def test_the_first_calls_for_the_runs_cgroup_from_several_threads_all_get_it():
    """At a restart the recoveries of several tasks asked for it at once: two probes of one
    process removed each other's directory, and the loser's "File exists" turned groups,
    and with them the resident Ansible, off for the listener's life (found by the soak with
    the resident Ansible off)."""
    import threading

    if cgroups.base() is None:
        pytest.fail("this test needs a writable cgroup v2 (CI runs as root)")
    try:
        for _ in range(20):
            cgroups._base.cache_clear()
            start = threading.Barrier(8)
            got: list[Path | None] = []

            def first_call(start: threading.Barrier, got: list[Path | None]) -> None:
                start.wait()
                got.append(cgroups.base())

            threads = [threading.Thread(target=first_call, args=(start, got))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 8 and None not in got and len(set(got)) == 1
    finally:
        cgroups._base.cache_clear()


def test_a_process_that_joins_a_group_after_its_kill_dies_with_the_next(monkeypatch):
    """A host the resident host forks for a run may join the run's group just after the
    run's kill found it empty: removing the group kills again until it can."""
    if cgroups.base() is None:
        pytest.fail("this test needs a writable cgroup v2 (CI runs as root)")
    group = cgroups.create(f"late-joiner.{time.monotonic_ns()}")
    assert group is not None
    real_kill, late = cgroups.kill, []

    def kill(path, deadline_s=10.0):
        real_kill(path, deadline_s)
        if not late:
            late.append(subprocess.Popen(
                ["sh", "-c", f"echo 0 > {path}/cgroup.procs && exec sleep 60"]))
            deadline = time.monotonic() + 10
            while not cgroups.pids(path):
                assert time.monotonic() < deadline
                time.sleep(0.01)

    monkeypatch.setattr(cgroups, "kill", kill)
    cgroups.remove(group)
    assert not group.exists()
    assert late[0].wait(timeout=10) == -signal.SIGKILL
