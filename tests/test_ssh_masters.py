"""SSH masters kept between runs (fem_ansible.ssh_masters), against a real sshd on
127.0.0.2 and the real ``ssh``: runs are played by ``ssh`` started the way Ansible and
Mitogen start it (``ControlPath=<run's dir>/%C``, ``ControlPersist``), in a run's cgroup."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fem_ansible import cgroups
from fem_ansible.runner import kill_processes, kill_task_processes
from fem_ansible.ssh_masters import ANSWERED_S, MAX_BORROWERS, KeptMasters
from tests.support import ssh

# A TCP relay for ProxyCommand: stdin to the address, the address to stdout.
PROXY = """\
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


class Site:
    """One sshd, a client key, and where runs' ControlPath dirs and the pool go."""

    def __init__(self, base: Path, host: ssh.SshHost, keys: ssh.SshKeys):
        self.base, self.host, self.keys = base, host, keys
        self.runs = 0

    def run_dir(self) -> Path:
        self.runs += 1
        path = self.base / "cp" / str(self.runs)
        path.mkdir(parents=True, mode=0o700)
        return path

    def connect(self, run_dir: Path, group: Path | None, persist_s: int = 60,
                *options: str) -> None:
        """One run's connection: ``ssh ... true`` as a run makes it, in ``group``, with the
        run's marker (the group's name is the run's ident)."""
        def join() -> None:
            if group is not None:
                cgroups.join(group)

        env = dict(os.environ, FEM_JOB_ID=group.name if group is not None else "none")

        done = subprocess.run(
            ["ssh", "-o", "ControlMaster=auto", "-o", f"ControlPersist={persist_s}s",
             "-o", f"ControlPath={run_dir}/%C", "-o", "BatchMode yes", "-o", "LogLevel ERROR",
             "-i", str(self.keys.private_key), "-o", f"UserKnownHostsFile={self.keys.known_hosts}",
             "-p", str(self.host.port), *options, f"{ssh.USER}@{self.host.address}", "true"],
            capture_output=True, text=True, timeout=30, preexec_fn=join, env=env)
        assert done.returncode == 0, done.stderr

    def logins(self) -> int:
        return self.host.log.read_text().count(f"Accepted publickey for {ssh.USER}")


@pytest.fixture
def site() -> Iterator[Site]:
    ssh.ensure_user()
    with ssh.addresses_held():
        base = ssh.new_dir("masters")
        keys = ssh.SshKeys(base / "client")
        host = ssh.SshHost("127.0.0.2", base / "host", keys).start()
        try:
            yield Site(base, host, keys)
        finally:
            host.stop(sessions=True)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def kept(site: Site) -> Iterator[KeptMasters]:
    """The listener's pool, ``control_persist_s`` 60; every master ended after the test."""
    masters = KeptMasters(site.base / "pool", 60)
    yield masters
    masters.close()


@pytest.fixture
def groups() -> Iterator[list[Path]]:
    """Runs' cgroups, removed after the test."""
    made: list[Path] = []
    yield made
    for group in made:
        cgroups.remove(group)


def _group(made: list[Path], ident: str | None = None) -> Path:
    group = cgroups.create(ident or f"masters-test.{time.monotonic_ns()}")
    assert group is not None, "the tests run where runs get cgroups"
    made.append(group)
    return group


def _run(site: Site, kept: KeptMasters, host: str, made: list[Path], *options: str,
         cancelled: bool = False, failed: bool = False, ident: str | None = None) -> Path:
    """A whole run as fem_ansible.runner makes it: lent, connected, kept unless cancelled,
    killed (``ident``: the run's marker and group name), given back.  Returns the run's
    group (removed)."""
    run_dir = site.run_dir()
    loan = kept.lend(run_dir, host)
    group = _group(made, ident)
    site.connect(run_dir, group, kept.persist_s, *options)
    if not (cancelled or failed):
        kept.keep(loan, group)
    kill_processes(group.name, kept.processes())
    cgroups.remove(group)
    kept.give_back(loan, failed)
    assert not run_dir.exists()
    return group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ended(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _pool_pids(kept: KeptMasters) -> list[int]:
    return sorted(k.pid for k in kept._kept.values())


def test_a_hosts_runs_share_one_login_and_a_cancel_does_not_end_it(site, groups, kept):
    _run(site, kept, "a", groups)
    [master] = _pool_pids(kept)
    with open(f"/proc/{master}/cgroup") as f:
        group = f.read().strip().partition("0::")[2]
    assert Path(group).parent == Path(_own_cgroup()) / "fem-ssh", group
    _run(site, kept, "a", groups, cancelled=True)
    _run(site, kept, "a", groups)
    assert site.logins() == 1
    assert _pool_pids(kept) == [master] and _alive(master)
    kept.close()
    assert _ended(master)
    assert not (site.base / "pool").exists()


def _own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def test_two_inventory_hosts_at_one_address_never_share_a_master(site, groups, kept):
    """%C hashes address, port and user, not the route: per inventory host, not per %C."""
    _run(site, kept, "behind-jump-1", groups)
    _run(site, kept, "behind-jump-2", groups)
    assert site.logins() == 2 and len(_pool_pids(kept)) == 2
    _run(site, kept, "behind-jump-1", groups)
    _run(site, kept, "behind-jump-2", groups)
    assert site.logins() == 2


def test_a_master_near_its_idle_bound_is_not_lent_and_ends(site, groups):
    kept = KeptMasters(site.base / "pool", 12)  # lent for 2 s after its last use
    try:
        _run(site, kept, "a", groups)
        [master] = _pool_pids(kept)
        time.sleep(2.5)
        run_dir = site.run_dir()
        assert kept.lend(run_dir, "a").lent == {}
        assert _pool_pids(kept) == []
        assert _ended(master)
    finally:
        kept.close()


def test_a_kept_master_that_ended_is_replaced_by_the_next_runs_own(site, groups, kept):
    """The host went away (its master with it): the next run connects anew, and its master
    is the one kept from then on."""
    _run(site, kept, "a", groups)
    [first] = _pool_pids(kept)
    os.kill(first, signal.SIGKILL)
    assert _ended(first)
    _run(site, kept, "a", groups)
    [second] = _pool_pids(kept)
    assert second != first and _alive(second)
    _run(site, kept, "a", groups)
    assert site.logins() == 2 and _pool_pids(kept) == [second]


def test_a_second_master_to_one_destination_ends_with_its_run(site, groups, kept):
    first, second = site.run_dir(), site.run_dir()
    loans = [kept.lend(first, "a"), kept.lend(second, "a")]
    made = [_group(groups), _group(groups)]
    site.connect(first, made[0])
    site.connect(second, made[1])
    assert site.logins() == 2
    masters = [cgroups.pids(group) for group in made]
    for loan, group in zip(loans, made, strict=True):
        kept.keep(loan, group)
        cgroups.remove(group)
        kept.give_back(loan, False)
    assert _pool_pids(kept) == masters[0]
    assert _ended(masters[1][0])
    _run(site, kept, "a", groups)
    assert site.logins() == 2


def test_retired_masters_serve_their_borrowers_and_then_end(site, groups, kept):
    """SIGHUP: a running task keeps the master it was lent; no new run gets it."""
    _run(site, kept, "a", groups)
    [master] = _pool_pids(kept)
    run_dir = site.run_dir()
    loan = kept.lend(run_dir, "a")
    assert loan.lent
    kept.retire()
    site.connect(run_dir, None)
    assert site.logins() == 1 and _alive(master)
    assert kept.lend(site.run_dir(), "a").lent == {}
    kept.give_back(loan, False)
    assert _ended(master)


def test_one_master_is_lent_to_at_most_so_many_runs(site, groups, kept):
    _run(site, kept, "a", groups)
    loans = [kept.lend(site.run_dir(), "a") for _ in range(MAX_BORROWERS + 1)]
    assert [bool(loan.lent) for loan in loans] == [True] * MAX_BORROWERS + [False]
    for loan in loans:
        kept.give_back(loan, False)


def test_a_proxy_command_moves_out_with_its_master(site, groups, kept):
    """A master reached through a ProxyCommand lives only as long as its proxy: both leave
    the run's cgroup, so the next run still finds the connection."""
    relay = site.base / "relay.py"
    relay.write_text(PROXY)
    proxy = f"ProxyCommand={sys.executable} {relay} %h %p"
    group = _run(site, kept, "a", groups, "-o", proxy)
    [master] = _pool_pids(kept)
    _run(site, kept, "a", groups, "-o", proxy)
    assert site.logins() == 1 and _alive(master)
    assert not group.exists()


def test_a_pool_left_by_a_killed_listener_is_ended(site, groups):
    pool = site.base / "pool"
    kept = KeptMasters(pool, 60)
    _run(site, kept, "a", groups)
    [master] = _pool_pids(kept)
    del kept  # the listener was killed: nothing ended it
    assert _alive(master)
    KeptMasters(pool, 60).close()
    assert _ended(master)


def test_a_run_that_started_before_a_sighup_keeps_nothing(site, groups, kept):
    """It may have read the inventory before it changed."""
    run_dir = site.run_dir()
    loan = kept.lend(run_dir, "a")
    group = _group(groups)
    site.connect(run_dir, group)
    kept.retire()
    kept.keep(loan, group)
    cgroups.remove(group)
    kept.give_back(loan, False)
    assert _pool_pids(kept) == []
    _run(site, kept, "a", groups)
    assert len(_pool_pids(kept)) == 1 and site.logins() == 2


def test_a_stalled_master_is_not_lent_but_ended(site, groups, kept):
    """Its host's session processes stopped (a firewall dropped the idle flow): no session
    through it within PROBE_S, so the run connects anew, and runs that start together all
    do (an outside review saw five parallel tasks lent a stalled master fail)."""
    _run(site, kept, "a", groups)
    [master] = _pool_pids(kept)
    time.sleep(ANSWERED_S)
    sessions = ssh._descendants(site.host.proc.pid)
    for pid in sessions:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(3) as pool:
            loans = list(pool.map(lambda _: kept.lend(site.run_dir(), "a"), range(3)))
        assert [loan.lent for loan in loans] == [{}, {}, {}]
        assert _pool_pids(kept) == [] and _ended(master)
    finally:
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    for loan in loans:
        kept.give_back(loan, False)
    _run(site, kept, "a", groups)
    assert site.logins() == 2


def test_a_failed_run_retires_the_master_it_was_lent(site, groups, kept):
    """A stalled connection fails every run lent it, where a new one may well work: the
    first failure retires it (ended once its other borrowers are done)."""
    _run(site, kept, "a", groups)
    [master] = _pool_pids(kept)
    other = kept.lend(site.run_dir(), "a")
    _run(site, kept, "a", groups, failed=True)
    assert _pool_pids(kept) == [] and _alive(master)
    kept.give_back(other, False)
    assert _ended(master)
    _run(site, kept, "a", groups)
    assert site.logins() == 2


def test_a_later_run_with_the_same_marker_spares_a_kept_proxy(site, groups, kept):
    """A ProxyCommand carries the marker of the run that started it; a run with the same
    ident (a run again after its resident Ansible died) must not kill it by that marker."""
    relay = site.base / "relay.py"
    relay.write_text(PROXY)
    proxy = f"ProxyCommand={sys.executable} {relay} %h %p"
    _run(site, kept, "a", groups, "-o", proxy, ident="fem-x-t.a1-stop")
    [master] = _pool_pids(kept)
    _run(site, kept, "a", groups, "-o", proxy, ident="fem-x-t.a1-stop")
    kill_task_processes("fem-x-t", kept.processes())
    assert _alive(master) and len(kept.processes()) == 2
    _run(site, kept, "a", groups, "-o", proxy)
    assert site.logins() == 1


def test_what_a_proxy_command_starts_ends_with_its_master(site, groups, kept):
    relay = site.base / "relay.py"
    relay.write_text(PROXY)
    proxy = f"ProxyCommand=sh -c 'sleep 1000 & exec {sys.executable} {relay} %h %p'"
    _run(site, kept, "a", groups, "-o", proxy)
    processes = kept.processes()
    assert len(processes) == 3  # the master, the relay, the sleep
    kept.retire()
    assert all(_ended(pid) for pid in processes)


@pytest.mark.parametrize("replaced_by", ["dir", "file"])
def test_a_pool_entry_replaced_is_no_error(site, groups, kept, replaced_by):
    _run(site, kept, "a", groups)
    [entry] = kept._kept.values()
    entry.path.unlink()
    if replaced_by == "dir":
        entry.path.mkdir()
    else:
        entry.path.write_text("")
    _run(site, kept, "a", groups)
    kept.retire()
    _run(site, kept, "a", groups)
    assert site.logins() == 3
